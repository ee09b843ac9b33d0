//! Base models to offer in the form: the builtin models, the models of the local Hugging Face
//! cache (offline), and model files or Diffusers folders under the UI's folder and the workdir.

use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelChoice {
    /// What goes into `--pretrained_model_name_or_path`.
    pub value: String,
    /// "builtin", "hf-cache", "file" or "diffusers".
    pub kind: &'static str,
}

/// Folders never searched for models (build output, dependencies, version control).
const SKIPPED_DIRS: &[&str] = &["target", "node_modules", ".git", "sample", ".checks"];
const MAX_FOUND: usize = 200;

pub fn choices(roots: &[&Path]) -> Vec<ModelChoice> {
    let mut out: Vec<ModelChoice> = sdbooth_models::config::BUILTIN_NAMES
        .iter()
        .map(|n| ModelChoice { value: n.to_string(), kind: "builtin" })
        .collect();
    if let Some(cache) = sdbooth_checkpoint::hf_cache::cache_root() {
        out.extend(hf_cache_ids(&cache).into_iter().map(|value| ModelChoice { value, kind: "hf-cache" }));
    }
    for root in roots {
        find_models(root, 3, &mut out);
    }
    out.dedup_by(|a, b| a.value == b.value);
    out
}

/// `org/name` of each `models--org--name` folder with a snapshot.
pub fn hf_cache_ids(cache: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(cache)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("snapshots").is_dir())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let (org, model) = name.strip_prefix("models--")?.split_once("--")?;
                    Some(format!("{org}/{model}"))
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn find_models(dir: &Path, depth: usize, out: &mut Vec<ModelChoice>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if out.len() >= MAX_FOUND {
            return;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') || SKIPPED_DIRS.contains(&name.as_str()) {
            continue;
        }
        if path.is_dir() {
            if path.join("model_index.json").is_file() {
                out.push(ModelChoice { value: path.display().to_string(), kind: "diffusers" });
            } else if depth > 0 && !name.ends_with("-state") {
                find_models(&path, depth - 1, out);
            }
        } else if name.ends_with(".safetensors") || name.ends_with(".ckpt") {
            out.push(ModelChoice { value: path.display().to_string(), kind: "file" });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_builtins_cache_entries_files_and_diffusers_folders() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let root = dir.path();
        let made = [
            std::fs::create_dir_all(root.join("cache/models--org--sd/snapshots/abc")),
            std::fs::create_dir_all(root.join("work/diff")),
            std::fs::write(root.join("work/diff/model_index.json"), "{}"),
            std::fs::write(root.join("work/a.safetensors"), ""),
            std::fs::write(root.join("work/notes.txt"), ""),
        ];
        assert!(made.iter().all(|r| r.is_ok()));
        assert_eq!(hf_cache_ids(&root.join("cache")), vec!["org/sd".to_string()]);
        let found = choices(&[&root.join("work")]);
        assert!(found.iter().any(|c| c.value == "builtin:tiny-sd1" && c.kind == "builtin"));
        assert!(found.iter().any(|c| c.value.ends_with("a.safetensors") && c.kind == "file"));
        assert!(found.iter().any(|c| c.value.ends_with("diff") && c.kind == "diffusers"));
        assert!(!found.iter().any(|c| c.value.ends_with("notes.txt")));
    }
}
