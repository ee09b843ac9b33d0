//! The legacy layout: `--train_data_dir` / `--reg_data_dir` whose sub-folders are named
//! `<repeats>_<class tokens>` (config_util.generate_dreambooth_subsets_config_by_subdirs).
//!
//! kohya walks the folders in filesystem order (Path.iterdir), which differs between machines and
//! changes which reg images get the extra repeats in the balancing loop; we sort them by name.

use std::path::{Path, PathBuf};

use super::spec::DatasetGroupSpec;
use super::{resolve_dataset, resolve_subset, Levels};
use crate::error::{DataError, Result};
use crate::options::DatasetOptions;

/// Splits a folder name into (repeats, class tokens), or None when it has no numeric prefix.
pub(crate) fn parse_folder_name(name: &str) -> Option<(i64, String)> {
    let mut it = name.splitn(2, '_');
    let first = it.next()?.trim();
    let n: i64 = match first.parse() {
        Ok(n) => n,
        // All digits but too large for i64: a repeat count, refused later as too large.
        Err(_) if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) => i64::MAX,
        Err(_) => return None,
    };
    Some((n, it.next().unwrap_or("").to_string()))
}

fn subdirs(base: &Path, is_reg: bool, notes: &mut Vec<String>) -> Result<Vec<(PathBuf, i64, bool, String)>> {
    let rd = std::fs::read_dir(base).map_err(|e| DataError::Io { path: base.to_path_buf(), source: e })?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::Io { path: base.to_path_buf(), source: e })?;
        let p = entry.path();
        if p.is_dir() {
            dirs.push(p);
        }
    }
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match parse_folder_name(&name) {
            None => notes
                .push(format!("ignored folder without a <repeats>_ prefix (as kohya does): {}", d.display())),
            Some((n, _)) if n < 1 => {
                notes.push(format!("ignored folder with repeats < 1 (as kohya does): {}", d.display()))
            }
            Some((n, class)) => out.push((d, n, is_reg, class)),
        }
    }
    Ok(out)
}

/// Builds the one dataset kohya makes from `--train_data_dir` and `--reg_data_dir`. Relative
/// folders are taken from `cwd` (the working directory, as kohya).
pub fn legacy_dataset_config(opts: &DatasetOptions, cwd: &Path) -> Result<DatasetGroupSpec> {
    opts.validate()?;
    let mut notes = Vec::new();
    let mut found = Vec::new();
    let Some(train) = &opts.train_data_dir else {
        return Err(DataError::InvalidOption {
            key: "--train_data_dir".into(),
            message: "either --dataset_config or --train_data_dir is required".into(),
        });
    };
    for (dir, is_reg) in [(Some(train), false), (opts.reg_data_dir.as_ref(), true)] {
        let Some(dir) = dir else { continue };
        let base = cwd.join(dir);
        let base = base.as_path();
        if !base.is_dir() {
            let flag = if is_reg { "--reg_data_dir" } else { "--train_data_dir" };
            return Err(DataError::EmptyDataset {
                detail: format!("{flag} {} is not a directory", base.display()),
            });
        }
        found.extend(subdirs(base, is_reg, &mut notes)?);
    }
    if opts.resolution.is_none() {
        return Err(DataError::InvalidOption { key: "--resolution".into(), message: "is required".into() });
    }
    let file = Path::new("<command line>");
    let lv = Levels { file, subset: None, dataset: &[], general: &[] };
    let mut subsets = Vec::new();
    for (dir, n, is_reg, class) in found {
        subsets.push(resolve_subset(&lv, opts, dir, Some((n, is_reg, class)))?);
    }
    let ds = resolve_dataset(&lv, opts, subsets, 0)?;
    Ok(DatasetGroupSpec { datasets: vec![ds], notes, config_file: None })
}
