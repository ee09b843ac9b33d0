//! A kohya dataset TOML written from instance and regularization folders chosen in the form.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The dataset part of the form when no TOML is given.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct DatasetFolders {
    pub instance_dir: String,
    pub instance_repeats: u32,
    /// e.g. "sks dog": the caption of images without a caption file.
    pub class_tokens: String,
    #[serde(default)]
    pub reg_dir: String,
    #[serde(default = "one")]
    pub reg_repeats: u32,
    /// e.g. "dog".
    #[serde(default)]
    pub reg_class_tokens: String,
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    #[serde(default = "one")]
    pub batch_size: u32,
    #[serde(default)]
    pub enable_bucket: bool,
}

fn one() -> u32 {
    1
}

fn default_resolution() -> u32 {
    512
}

/// The file name of the TOML the UI writes beside the folders (never a user's own file name).
pub const TOML_NAME: &str = "sdbooth-ui-dataset.toml";

fn absolute(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p.trim());
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn table(entries: &[(&str, toml::Value)]) -> toml::Value {
    toml::Value::Table(entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
}

/// kohya's format: `[general]`, one `[[datasets]]`, a subset per folder.
pub fn toml_text(d: &DatasetFolders, base: &Path) -> Result<String, String> {
    let instance = absolute(base, &d.instance_dir);
    if d.instance_dir.trim().is_empty() || !instance.is_dir() {
        return Err(format!("instance folder {}: not a folder", instance.display()));
    }
    if d.instance_repeats == 0 {
        return Err("instance repeats: at least 1".into());
    }
    if d.class_tokens.trim().is_empty() {
        return Err("class tokens: give the instance's tokens, e.g. \"sks dog\"".into());
    }
    let mut subsets = vec![table(&[
        ("image_dir", instance.display().to_string().into()),
        ("class_tokens", d.class_tokens.trim().into()),
        ("num_repeats", i64::from(d.instance_repeats).into()),
    ])];
    if !d.reg_dir.trim().is_empty() {
        let reg = absolute(base, &d.reg_dir);
        if !reg.is_dir() {
            return Err(format!("regularization folder {}: not a folder", reg.display()));
        }
        if d.reg_class_tokens.trim().is_empty() {
            return Err("regularization class tokens: give the class, e.g. \"dog\"".into());
        }
        subsets.push(table(&[
            ("image_dir", reg.display().to_string().into()),
            ("class_tokens", d.reg_class_tokens.trim().into()),
            ("num_repeats", i64::from(d.reg_repeats.max(1)).into()),
            ("is_reg", true.into()),
        ]));
    }
    let dataset = table(&[
        ("resolution", i64::from(d.resolution).into()),
        ("batch_size", i64::from(d.batch_size.max(1)).into()),
        ("subsets", toml::Value::Array(subsets)),
    ]);
    let doc = table(&[
        ("general", table(&[("enable_bucket", d.enable_bucket.into())])),
        ("datasets", toml::Value::Array(vec![dataset])),
    ]);
    let body = toml::to_string(&doc).map_err(|e| format!("cannot format the dataset TOML: {e}"))?;
    Ok(format!("# Written by sdbooth ui from the folders chosen in the form (kohya's dataset_config format).\n{body}"))
}

/// Writes the TOML beside the instance folder and returns its path.
pub fn write_beside(d: &DatasetFolders, base: &Path) -> Result<PathBuf, String> {
    let text = toml_text(d, base)?;
    let instance = absolute(base, &d.instance_dir);
    let dir = instance.parent().map(Path::to_path_buf).unwrap_or_else(|| base.to_path_buf());
    let path = dir.join(TOML_NAME);
    crate::runs::write_atomic(&path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_become_a_dataset_toml() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { return };
        for sub in ["inst", "reg"] {
            assert!(std::fs::create_dir(dir.path().join(sub)).is_ok());
        }
        let d = DatasetFolders {
            instance_dir: "inst".into(),
            instance_repeats: 10,
            class_tokens: "sks dog".into(),
            reg_dir: "reg".into(),
            reg_repeats: 1,
            reg_class_tokens: "dog".into(),
            resolution: 128,
            batch_size: 2,
            enable_bucket: true,
        };
        let text = toml_text(&d, dir.path()).unwrap_or_default();
        let parsed: toml::Table = toml::from_str(&text).unwrap_or_default();
        let subsets = parsed["datasets"][0]["subsets"].as_array().cloned().unwrap_or_default();
        assert_eq!(subsets.len(), 2, "{text}");
        assert_eq!(subsets[0]["num_repeats"].as_integer(), Some(10));
        assert_eq!(subsets[1]["is_reg"].as_bool(), Some(true));
        assert_eq!(parsed["datasets"][0]["resolution"].as_integer(), Some(128));
        let d = DatasetFolders { instance_dir: "nope".into(), ..d };
        assert!(toml_text(&d, dir.path()).is_err_and(|e| e.contains("nope")));
    }
}
