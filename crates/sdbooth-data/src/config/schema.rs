//! kohya's DreamBooth dataset schema (config_util.ConfigSanitizer with dreambooth + dropout
//! support): which key is allowed at which level, and of which type.

use std::path::Path;

use super::tree::{Kind, Node};
use crate::error::{DataError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Bool,
    Int,
    /// float or int (kohya: `Any(float, int)`; for plain `float` keys we accept ints too).
    Num,
    Str,
    /// int or [int, int]
    Resolution,
    /// [float, float]
    FloatPair,
    Table,
    Subsets,
}

pub(crate) const G: u8 = 1;
pub(crate) const D: u8 = 2;
pub(crate) const S: u8 = 4;

/// (key, type, levels where kohya accepts it).
pub(crate) const KEYS: &[(&str, Ty, u8)] = &[
    // SUBSET_ASCENDABLE_SCHEMA
    ("color_aug", Ty::Bool, G | D | S),
    ("face_crop_aug_range", Ty::FloatPair, G | D | S),
    ("flip_aug", Ty::Bool, G | D | S),
    ("num_repeats", Ty::Int, G | D | S),
    ("random_crop", Ty::Bool, G | D | S),
    ("shuffle_caption", Ty::Bool, G | D | S),
    ("keep_tokens", Ty::Int, G | D | S),
    ("keep_tokens_separator", Ty::Str, G | D | S),
    ("secondary_separator", Ty::Str, G | D | S),
    ("caption_separator", Ty::Str, G | D | S),
    ("enable_wildcard", Ty::Bool, G | D | S),
    ("token_warmup_min", Ty::Int, G | D | S),
    ("token_warmup_step", Ty::Num, G | D | S),
    ("caption_prefix", Ty::Str, G | D | S),
    ("caption_suffix", Ty::Str, G | D | S),
    ("custom_attributes", Ty::Table, G | D | S),
    ("resize_interpolation", Ty::Str, G | D | S),
    // DO_SUBSET_ASCENDABLE_SCHEMA
    ("caption_dropout_every_n_epochs", Ty::Int, G | D | S),
    ("caption_dropout_rate", Ty::Num, G | D | S),
    ("caption_tag_dropout_rate", Ty::Num, G | D | S),
    // DB_SUBSET_ASCENDABLE_SCHEMA
    ("caption_extension", Ty::Str, G | D | S),
    ("class_tokens", Ty::Str, G | D | S),
    ("cache_info", Ty::Bool, G | D | S),
    // DB_SUBSET_DISTINCT_SCHEMA
    ("image_dir", Ty::Str, S),
    ("is_reg", Ty::Bool, S),
    ("alpha_mask", Ty::Bool, S),
    // DATASET_ASCENDABLE_SCHEMA
    ("batch_size", Ty::Int, G | D),
    ("bucket_no_upscale", Ty::Bool, G | D),
    ("bucket_reso_steps", Ty::Int, G | D),
    ("enable_bucket", Ty::Bool, G | D),
    ("max_bucket_reso", Ty::Int, G | D),
    ("min_bucket_reso", Ty::Int, G | D),
    ("validation_seed", Ty::Int, G | D),
    ("validation_split", Ty::Num, G | D),
    ("resolution", Ty::Resolution, G | D),
    ("network_multiplier", Ty::Num, G | D),
    ("subsets", Ty::Subsets, D),
];

fn level_name(level: u8) -> &'static str {
    match level {
        G => "[general]",
        D => "[[datasets]]",
        _ => "[[datasets.subsets]]",
    }
}

fn levels_text(mask: u8) -> String {
    [G, D, S].iter().filter(|l| mask & **l != 0).map(|l| level_name(*l)).collect::<Vec<_>>().join(", ")
}

/// The nearest key kohya accepts at this level, when it is close enough to be a likely typo.
pub(crate) fn suggest(key: &str, candidates: impl Iterator<Item = &'static str>) -> Option<String> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = strsim::levenshtein(key, c);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let limit = (key.chars().count() / 3).max(2);
    best.filter(|(d, _)| *d <= limit).map(|(_, c)| c.to_string())
}

fn type_ok(ty: Ty, k: &Kind) -> bool {
    match (ty, k) {
        (Ty::Bool, Kind::Bool(_)) | (Ty::Int, Kind::Int(_)) | (Ty::Str, Kind::Str(_)) => true,
        (Ty::Num, Kind::Int(_) | Kind::Float(_)) => true,
        (Ty::Resolution, Kind::Int(_)) => true,
        (Ty::Resolution, Kind::Array(a)) => a.len() == 2 && a.iter().all(|n| matches!(n.kind, Kind::Int(_))),
        (Ty::FloatPair, Kind::Array(a)) => {
            a.len() == 2 && a.iter().all(|n| matches!(n.kind, Kind::Int(_) | Kind::Float(_)))
        }
        (Ty::Table, Kind::Table(_)) => true,
        (Ty::Subsets, Kind::Array(a)) => a.iter().all(|n| matches!(n.kind, Kind::Table(_))),
        _ => false,
    }
}

fn expected(ty: Ty) -> &'static str {
    match ty {
        Ty::Bool => "a boolean (true/false)",
        Ty::Int => "an integer",
        Ty::Num => "a number",
        Ty::Str => "a string",
        Ty::Resolution => "an integer or [width, height]",
        Ty::FloatPair => "[lower, upper] (two numbers)",
        Ty::Table => "a table",
        Ty::Subsets => "an array of tables ([[datasets.subsets]])",
    }
}

/// Checks every key of one table of the given level: unknown keys (with "did you mean"), keys
/// that belong to another level, and value types.
pub(crate) fn check_table(path: &Path, level: u8, entries: &[(String, Node)]) -> Result<()> {
    for (key, node) in entries {
        match KEYS.iter().find(|(k, _, _)| k == key) {
            None => {
                let cands = KEYS.iter().filter(|(_, _, m)| m & level != 0).map(|(k, _, _)| *k);
                return Err(DataError::ConfigUnknownKey {
                    path: path.to_path_buf(),
                    line: node.line,
                    key: key.clone(),
                    table: level_name(level).into(),
                    suggestion: suggest(key, cands),
                });
            }
            Some((_, _, mask)) if mask & level == 0 => {
                return Err(DataError::ConfigValue {
                    path: path.to_path_buf(),
                    line: node.line,
                    key: key.clone(),
                    message: format!(
                        "not allowed in {}; kohya accepts it only in {}",
                        level_name(level),
                        levels_text(*mask)
                    ),
                });
            }
            Some((_, ty, _)) if !type_ok(*ty, &node.kind) => {
                return Err(DataError::ConfigType {
                    path: path.to_path_buf(),
                    line: node.line,
                    key: key.clone(),
                    expected: expected(*ty).into(),
                    found: node.kind.type_name().into(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks the top level: only `general` (a table) and `datasets` (an array of tables).
pub(crate) fn check_root(path: &Path, entries: &[(String, Node)]) -> Result<()> {
    for (key, node) in entries {
        let ok = match key.as_str() {
            "general" => matches!(node.kind, Kind::Table(_)),
            "datasets" => {
                matches!(&node.kind, Kind::Array(a) if a.iter().all(|n| matches!(n.kind, Kind::Table(_))))
            }
            _ => {
                // A dataset key written at the top level is a common slip: point at [general].
                let hint = if KEYS.iter().any(|(k, _, m)| k == key && m & G != 0) {
                    Some(format!("[general] {key}"))
                } else {
                    suggest(key, ["general", "datasets"].into_iter())
                };
                return Err(DataError::ConfigUnknownKey {
                    path: path.to_path_buf(),
                    line: node.line,
                    key: key.clone(),
                    table: "the top level".into(),
                    suggestion: hint,
                });
            }
        };
        if !ok {
            return Err(DataError::ConfigType {
                path: path.to_path_buf(),
                line: node.line,
                key: key.clone(),
                expected: if key == "general" {
                    "a table ([general])"
                } else {
                    "an array of tables ([[datasets]])"
                }
                .into(),
                found: node.kind.type_name().into(),
            });
        }
    }
    Ok(())
}
