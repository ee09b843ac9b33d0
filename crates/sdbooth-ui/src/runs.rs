//! Runs on disk. Each run started from the UI has a folder `<workdir>/<id>/` holding `run.json`
//! (its command line and state), `train.log` (the child's stdout and stderr) and, unless the
//! form named another output folder, the run's outputs. A folder of the workdir with a `*.jsonl`
//! training log but no `run.json` is a run started from the CLI, listed too.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub const META_FILE: &str = "run.json";
pub const LOG_FILE: &str = "train.log";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    /// Exited with success.
    Finished,
    /// Stopped from the UI (a state is saved when it was running).
    Stopped,
    Failed,
    /// Taken off the queue before it started.
    Cancelled,
    /// Ended while no UI was watching it: the exit code is unknown.
    Exited,
    /// Started from the CLI: the UI only reads its files.
    External,
}

/// `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMeta {
    pub id: String,
    /// Seconds since 1970 when it was queued.
    pub created: u64,
    /// `sdbooth train` arguments (without `train` and without `--resume`).
    pub argv: Vec<String>,
    /// The folder the child runs in (kohya resolves a dataset TOML's `image_dir` from it).
    pub cwd: PathBuf,
    pub output_dir: PathBuf,
    pub output_name: String,
    /// From the dry run at queueing: `max_train_steps` of the step plan.
    pub total_steps: Option<u64>,
    pub status: Status,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub started: Option<u64>,
    pub ended: Option<u64>,
    #[serde(default)]
    pub stop_requested: bool,
    /// The saved state the next start resumes from (`--resume`).
    #[serde(default)]
    pub resume_from: Option<String>,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Temp file, fsync, rename (sdbooth-checkpoint's): a crash never leaves half a file.
pub use sdbooth_checkpoint::atomic::atomic_write_bytes as write_atomic;

impl RunMeta {
    /// A run not started yet, created now: no command line, pid or times.
    pub fn new(
        id: String,
        cwd: PathBuf,
        output_dir: PathBuf,
        output_name: String,
        status: Status,
    ) -> RunMeta {
        RunMeta {
            id,
            created: now_secs(),
            argv: Vec::new(),
            cwd,
            output_dir,
            output_name,
            total_steps: None,
            status,
            pid: None,
            exit_code: None,
            started: None,
            ended: None,
            stop_requested: false,
            resume_from: None,
        }
    }

    pub fn dir(&self, workdir: &Path) -> PathBuf {
        workdir.join(&self.id)
    }

    pub fn save(&self, workdir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(&self.dir(workdir).join(META_FILE), text.as_bytes())
    }

    /// The training log the trainer appends to.
    pub fn jsonl(&self) -> PathBuf {
        self.output_dir.join(format!("{}.jsonl", self.output_name))
    }

    pub fn validation_jsonl(&self) -> PathBuf {
        self.output_dir.join(format!("{}.validation.jsonl", self.output_name))
    }

    pub fn is_active(&self) -> bool {
        matches!(self.status, Status::Queued | Status::Running)
    }
}

/// A run id: UTC time and the output name, e.g. `20261129-153000-toy`, unique in the workdir.
pub fn new_run_id(workdir: &Path, name: &str) -> String {
    let stamp = sdbooth_checkpoint::time::UtcTime::from_unix(now_secs()).compact();
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(40)
        .collect();
    let base = format!("{}-{}-{clean}", &stamp[..8], &stamp[8..]);
    let mut id = base.clone();
    let mut n = 2;
    while workdir.join(&id).exists() {
        id = format!("{base}-{n}");
        n += 1;
    }
    id
}

/// Whether process `pid` is alive and is an `sdbooth` (a recycled pid is not our run).
pub fn process_alive(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // A zombie (state Z) has exited; its parent has not collected it yet.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    state != Some("Z") && String::from_utf8_lossy(&cmdline).contains("sdbooth")
}

/// Reads `<dir>/run.json`; a folder with a training log and no run.json is an external run.
pub fn load(dir: &Path) -> Option<RunMeta> {
    let id = dir.file_name()?.to_string_lossy().into_owned();
    if let Ok(text) = std::fs::read_to_string(dir.join(META_FILE)) {
        return serde_json::from_str(&text).ok();
    }
    let jsonl = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.ends_with(".jsonl") && !name.ends_with(".validation.jsonl")
    })?;
    let output_name = jsonl.file_stem()?.to_string_lossy().into_owned();
    let created = std::fs::metadata(&jsonl).and_then(|m| m.modified()).ok();
    let created = created.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    let mut meta = RunMeta::new(id, dir.to_path_buf(), dir.to_path_buf(), output_name, Status::External);
    meta.created = created;
    Some(meta)
}

/// Every run of the workdir, oldest first.
pub fn list(workdir: &Path) -> Vec<RunMeta> {
    let mut runs: Vec<RunMeta> = std::fs::read_dir(workdir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .filter_map(|p| load(&p))
                .collect()
        })
        .unwrap_or_default();
    runs.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    runs
}

/// A file the run wrote, by a path relative to its output folder (or its run folder, for the
/// log): `None` for anything outside those folders (`..`, links out, absolute paths).
pub fn resolve_file(meta: &RunMeta, workdir: &Path, rel: &str) -> Option<PathBuf> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|part| part == "..") {
        return None;
    }
    for root in [&meta.output_dir, &meta.dir(workdir)] {
        let Ok(root) = std::fs::canonicalize(root) else { continue };
        let Ok(path) = std::fs::canonicalize(root.join(rel)) else { continue };
        if path.starts_with(&root) && path.is_file() {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(dir: &Path) -> RunMeta {
        RunMeta::new("r".into(), dir.to_path_buf(), dir.join("r"), "m".into(), Status::Queued)
    }

    #[test]
    fn files_outside_the_run_are_not_served() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let m = meta(dir.path());
        assert!(std::fs::create_dir_all(dir.path().join("r/sample")).is_ok());
        assert!(std::fs::write(dir.path().join("r/sample/a.png"), b"x").is_ok());
        assert!(std::fs::write(dir.path().join("secret"), b"x").is_ok());
        assert!(resolve_file(&m, dir.path(), "sample/a.png").is_some());
        assert!(resolve_file(&m, dir.path(), "../secret").is_none());
        assert!(resolve_file(&m, dir.path(), "sample/../../secret").is_none());
        assert!(resolve_file(&m, dir.path(), "/etc/passwd").is_none());
        assert!(resolve_file(&m, dir.path(), "sample").is_none());
    }

    #[test]
    fn run_json_round_trips_and_cli_runs_are_found() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let m = meta(dir.path());
        assert!(std::fs::create_dir_all(m.dir(dir.path())).is_ok());
        assert!(m.save(dir.path()).is_ok());
        assert!(std::fs::create_dir_all(dir.path().join("cli")).is_ok());
        assert!(std::fs::write(dir.path().join("cli/toy.jsonl"), b"").is_ok());
        let runs = list(dir.path());
        let ids: Vec<(&str, Status)> = runs.iter().map(|r| (r.id.as_str(), r.status)).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&("r", Status::Queued)) && ids.contains(&("cli", Status::External)));
        let cli = runs.iter().find(|r| r.id == "cli").map(|r| r.output_name.clone());
        assert_eq!(cli.as_deref(), Some("toy"));
    }

    #[test]
    fn run_ids_are_unique() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let a = new_run_id(dir.path(), "my model!");
        assert!(a.ends_with("-my_model_"), "{a}");
        assert!(std::fs::create_dir(dir.path().join(&a)).is_ok());
        assert_ne!(new_run_id(dir.path(), "my model!"), a);
    }
}
