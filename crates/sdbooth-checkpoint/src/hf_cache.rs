//! HF model ids (`org/name`) resolved in the local Hugging Face cache, offline:
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, then
//! `models--org--name/snapshots/<refs/main or the only snapshot>/`.

use std::path::PathBuf;

use crate::error::{CheckpointError, Result};

pub fn cache_root() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot folder of `spec` if it looks like an HF id and is cached; Ok(None) if not cached.
pub fn resolve(spec: &str) -> Result<Option<PathBuf>> {
    let Some((org, name)) = spec.split_once('/') else { return Ok(None) };
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid(org) || !valid(name) || name.contains('/') || org.starts_with('.') {
        return Ok(None);
    }
    let Some(root) = cache_root() else { return Ok(None) };
    resolve_in(&root, org, name, spec)
}

pub fn resolve_in(root: &std::path::Path, org: &str, name: &str, spec: &str) -> Result<Option<PathBuf>> {
    let repo = root.join(format!("models--{org}--{name}"));
    if !repo.is_dir() {
        return Ok(None);
    }
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Ok(Some(p));
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    match dirs.len() {
        1 => Ok(dirs.pop()),
        0 => Err(CheckpointError::NotFound {
            spec: spec.into(),
            reason: format!("{} has no snapshot", repo.display()),
        }),
        _ => Err(CheckpointError::NotFound {
            spec: spec.into(),
            reason: format!(
                "{} has several snapshots and no refs/main; pass the snapshot folder",
                repo.display()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_snapshot_refs_main_points_to() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--org--model");
        for rev in ["aaa", "bbb"] {
            std::fs::create_dir_all(repo.join("snapshots").join(rev)).unwrap();
        }
        assert!(resolve_in(root.path(), "org", "model", "org/model").is_err(), "two snapshots, no ref");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "bbb\n").unwrap();
        let got = resolve_in(root.path(), "org", "model", "org/model").unwrap().unwrap();
        assert_eq!(got, repo.join("snapshots/bbb"));
        assert!(resolve_in(root.path(), "org", "other", "org/other").unwrap().is_none());
        assert!(resolve("../etc").unwrap().is_none());
    }
}
