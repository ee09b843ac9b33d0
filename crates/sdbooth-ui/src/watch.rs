//! A run's progress, read from the files the trainer writes: the JSON-lines step log
//! (`<output_name>.jsonl`: step, epoch, loss, avr_loss, lr_unet, lr_text_encoder, step_seconds,
//! peak_rss_bytes), the validation log, `sample/*.png`, model files, `*-state` folders,
//! `report.html` and the child's `train.log`. Streamed to the page as server-sent events.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use serde::Serialize;
use serde_json::Value;

use crate::flags::shell_line;
use crate::runs::{self, RunMeta};
use crate::AppState;

/// A file of the run, with the URL that serves it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunFile {
    pub name: String,
    pub bytes: u64,
    /// None for a folder (a Diffusers model or a state): not downloadable as one file.
    pub url: Option<String>,
}

/// What the page shows of a run. `steps` holds the step records from byte `from_offset` of the
/// step log on (the page appends them; `from_offset` 0 means "replace").
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub meta: RunMeta,
    /// The run's command line, `cd DIR && sdbooth train ...` (empty for a run from the CLI).
    pub command: String,
    pub queue_position: Option<usize>,
    pub from_offset: u64,
    pub next_offset: u64,
    pub steps: Vec<Value>,
    pub validation: Vec<Value>,
    pub samples: Vec<RunFile>,
    pub checkpoints: Vec<RunFile>,
    pub states: Vec<RunFile>,
    pub report: Option<String>,
    pub log_tail: Vec<String>,
}

fn file_url(meta: &RunMeta, rel: &str) -> String {
    format!("/runs/{}/files/{rel}", meta.id)
}

/// Complete lines of a JSON-lines file from `offset`; a file shorter than `offset` (replaced)
/// is read from the start. Returns (records, the offset they start at, the offset after them).
pub fn read_jsonl_from(path: &Path, offset: u64) -> (Vec<Value>, u64, u64) {
    let Ok(mut f) = std::fs::File::open(path) else { return (Vec::new(), 0, 0) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = if offset > len { 0 } else { offset };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return (Vec::new(), start, start);
    }
    // A line still being written (no newline yet) waits for the next read.
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let records = String::from_utf8_lossy(&buf[..complete])
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    (records, start, start + complete as u64)
}

/// The last `n` lines of a text file (reads at most its last 64 KiB).
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = strip_ansi(&String::from_utf8_lossy(&buf));
    // Progress output rewrites its line with '\r': keep the latest version of each line.
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l).to_string())
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Drops terminal colour codes (`ESC [ ... letter`), which a log written by a CLI run may hold.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn entries(dir: &Path) -> Vec<(String, std::fs::Metadata)> {
    let mut v: Vec<(String, std::fs::Metadata)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), e.metadata().ok()?)))
                .filter(|(name, _)| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn folder_bytes(dir: &Path) -> u64 {
    entries(dir).iter().map(|(n, m)| if m.is_dir() { folder_bytes(&dir.join(n)) } else { m.len() }).sum()
}

/// Model files (`.safetensors`, `.ckpt`) and Diffusers folders in the output folder, and saved
/// states (`*-state` folders).
pub fn outputs(meta: &RunMeta) -> (Vec<RunFile>, Vec<RunFile>) {
    let mut models = Vec::new();
    let mut states = Vec::new();
    for (name, m) in entries(&meta.output_dir) {
        let path = meta.output_dir.join(&name);
        if m.is_dir() && name.ends_with("-state") {
            states.push(RunFile { bytes: folder_bytes(&path), name, url: None });
        } else if m.is_dir() && path.join("model_index.json").is_file() {
            models.push(RunFile { bytes: folder_bytes(&path), name, url: None });
        } else if m.is_file() && (name.ends_with(".safetensors") || name.ends_with(".ckpt")) {
            let url = Some(file_url(meta, &name));
            models.push(RunFile { bytes: m.len(), name, url });
        }
    }
    (models, states)
}

/// Sample images in `<output_dir>/sample`, in name order (kohya's names sort by step).
pub fn samples(meta: &RunMeta) -> Vec<RunFile> {
    entries(&meta.output_dir.join("sample"))
        .into_iter()
        .filter(|(name, m)| m.is_file() && (name.ends_with(".png") || name.ends_with(".jpg")))
        .map(|(name, m)| RunFile {
            url: Some(file_url(meta, &format!("sample/{name}"))),
            bytes: m.len(),
            name,
        })
        .collect()
}

pub fn snapshot(state: &AppState, meta: RunMeta, offset: u64) -> Snapshot {
    let (steps, from_offset, next_offset) = read_jsonl_from(&meta.jsonl(), offset);
    let (validation, _, _) = read_jsonl_from(&meta.validation_jsonl(), 0);
    // Only what the chart needs of validation records (they also hold per-image lists).
    let validation = validation
        .into_iter()
        .map(|v| serde_json::json!({"step": v.get("step"), "loss": v.get("loss")}))
        .collect();
    let (checkpoints, states) = outputs(&meta);
    let report = meta.output_dir.join("report.html").is_file().then(|| file_url(&meta, "report.html"));
    let log_tail = tail(&meta.dir(&state.workdir).join(runs::LOG_FILE), 60);
    let command = if meta.argv.is_empty() {
        String::new()
    } else {
        let mut words = vec!["sdbooth".to_string(), "train".to_string()];
        words.extend(meta.argv.iter().cloned());
        words.extend(meta.resume_from.as_ref().map(|s| format!("--resume={s}")));
        format!("cd {} && {}", shell_line(&[meta.cwd.display().to_string()]), shell_line(&words))
    };
    Snapshot {
        command,
        queue_position: state.queue.position(&meta.id),
        samples: samples(&meta),
        meta,
        from_offset,
        next_offset,
        steps,
        validation,
        checkpoints,
        states,
        report,
        log_tail,
    }
}

/// The event stream of one run: a `snapshot` event every second while it is queued or running,
/// then a last one and an `end` event (the page closes the stream; EventSource would reconnect).
pub fn events(
    state: Arc<AppState>,
    id: String,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> {
    enum Phase {
        First,
        Live(u64),
        End,
        Done,
    }
    futures_util::stream::unfold(Phase::First, move |phase| {
        let state = state.clone();
        let id = id.clone();
        async move {
            let offset = match phase {
                Phase::Done => return None,
                Phase::End => return Some((Ok(Event::default().event("end").data("{}")), Phase::Done)),
                Phase::First => 0,
                Phase::Live(o) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    o
                }
            };
            let Some(meta) = runs::load(&state.workdir.join(&id)) else {
                return Some((Ok(Event::default().event("end").data("{}")), Phase::Done));
            };
            let active = meta.is_active();
            let snap = snapshot(&state, meta, offset);
            let next = if active { Phase::Live(snap.next_offset) } else { Phase::End };
            let data = serde_json::to_string(&snap).unwrap_or_else(|_| "{}".into());
            Some((Ok(Event::default().event("snapshot").data(data)), next))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn jsonl_is_read_in_complete_lines_from_an_offset() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let p = dir.path().join("m.jsonl");
        assert!(std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"st").is_ok());
        let (r, from, next) = read_jsonl_from(&p, 0);
        assert_eq!((r.len(), from), (2, 0));
        let (r, _, next2) = read_jsonl_from(&p, next);
        assert_eq!((r.len(), next2), (0, next));
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&p) {
            let _ = f.write_all(b"ep\":3}\n");
        }
        let (r, _, _) = read_jsonl_from(&p, next);
        assert_eq!(r.first().and_then(|v| v["step"].as_u64()), Some(3));
        // A shorter file (a new log) starts over.
        assert!(std::fs::write(&p, "{\"step\":9}\n").is_ok());
        let (r, from, _) = read_jsonl_from(&p, 1000);
        assert_eq!((r.len(), from), (1, 0));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let p = dir.path().join("log");
        assert!(std::fs::write(&p, "a\nb\rc\n\u{1b}[32mINFO\u{1b}[0m d\n").is_ok());
        assert_eq!(tail(&p, 2), vec!["c".to_string(), "INFO d".to_string()]);
    }
}
