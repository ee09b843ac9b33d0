//! One run at a time (one device), the others wait in a queue, as in ai-toolkit.
//!
//! A run is `sdbooth train ...` in a child process of its own process group, with stdout and
//! stderr going to `train.log` in its run folder: Ctrl-C in the UI's terminal does not reach it,
//! and it goes on if the UI stops or crashes. A UI started later finds it by its pid in
//! `run.json` and waits for it before starting the next one.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::runs::{self, RunMeta, Status};
use crate::AppState;

pub struct Queue {
    exe: PathBuf,
    workdir: PathBuf,
    waiting: Mutex<VecDeque<String>>,
    /// Held while a run.json is read, changed and written (the scheduler, a run's end and the
    /// Stop button may touch the same one).
    meta_lock: Mutex<()>,
    /// Pids of the children this UI started and waits for.
    own: Mutex<HashSet<u32>>,
    /// Wakes the scheduler: a run was queued or has ended.
    wake: Notify,
}

impl Queue {
    /// The queue of `workdir`, with the runs that were queued when a previous UI stopped.
    pub fn new(exe: PathBuf, workdir: PathBuf) -> Queue {
        let waiting =
            runs::list(&workdir).into_iter().filter(|r| r.status == Status::Queued).map(|r| r.id).collect();
        Queue {
            exe,
            workdir,
            waiting: Mutex::new(waiting),
            meta_lock: Mutex::new(()),
            own: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        }
    }

    fn waiting(&self) -> MutexGuard<'_, VecDeque<String>> {
        lock(&self.waiting)
    }

    /// Loads run `id`, applies `f` and saves it, under the run.json lock.
    pub fn update<R>(&self, id: &str, f: impl FnOnce(&mut RunMeta) -> R) -> Option<(RunMeta, R)> {
        let _guard = lock(&self.meta_lock);
        let mut meta = runs::load(&self.workdir.join(id))?;
        let r = f(&mut meta);
        if meta.status != Status::External {
            let _ = meta.save(&self.workdir);
        }
        Some((meta, r))
    }

    /// Queues a run whose folder and run.json exist.
    pub fn push(&self, id: String) {
        self.waiting().push_back(id);
        self.wake.notify_one();
    }

    /// Position in the queue (0: next), if waiting.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.waiting().iter().position(|w| w == id)
    }

    /// Takes a waiting run off the queue; false if it was not waiting.
    pub fn cancel(&self, id: &str) -> bool {
        let mut w = self.waiting();
        let before = w.len();
        w.retain(|x| x != id);
        before != w.len()
    }

    /// A run of the workdir whose process is alive (started by this UI or an earlier one).
    fn running(&self) -> Option<RunMeta> {
        runs::list(&self.workdir)
            .into_iter()
            .find(|r| r.status == Status::Running && r.pid.is_some_and(runs::process_alive))
    }

    /// Starts `meta`'s child; the returned child is waited for by the caller.
    fn spawn(&self, meta: &mut RunMeta) -> Result<tokio::process::Child, String> {
        let dir = meta.dir(&self.workdir);
        let log_path = dir.join(runs::LOG_FILE);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("train").args(&meta.argv);
        if let Some(state) = &meta.resume_from {
            cmd.arg(format!("--resume={state}"));
        }
        // NO_COLOR: the log is a file, not a terminal.
        cmd.current_dir(&meta.cwd).env("NO_COLOR", "1").stdin(Stdio::null()).stdout(log).stderr(log2);
        // Its own process group: the UI's Ctrl-C is not the run's.
        #[cfg(unix)]
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        meta.status = Status::Running;
        meta.pid = child.id();
        meta.started = Some(runs::now_secs());
        meta.ended = None;
        meta.exit_code = None;
        meta.stop_requested = false;
        Ok(child)
    }
}

/// Whether a run is stopped or cancelled by [`stop`].
pub enum StopOutcome {
    Cancelled,
    Signalled,
    AlreadyStopping,
    NotActive,
}

/// Stops a run: a queued one leaves the queue; a running one gets SIGINT, kohya's Ctrl-C path
/// in `sdbooth train` (finish the step, save a state, exit). A second SIGINT would quit without
/// saving, so a second stop does nothing.
pub fn stop(queue: &Queue, meta: &mut RunMeta) -> Result<StopOutcome, String> {
    match meta.status {
        Status::Queued => {
            queue.cancel(&meta.id);
            meta.status = Status::Cancelled;
            meta.ended = Some(runs::now_secs());
            Ok(StopOutcome::Cancelled)
        }
        Status::Running if meta.stop_requested => Ok(StopOutcome::AlreadyStopping),
        Status::Running => {
            let Some(pid) = meta.pid.filter(|&p| runs::process_alive(p)) else {
                return Ok(StopOutcome::NotActive);
            };
            let ok = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .map_err(|e| format!("cannot run kill: {e}"))?
                .success();
            if !ok {
                return Err(format!("kill -INT {pid} failed"));
            }
            meta.stop_requested = true;
            Ok(StopOutcome::Signalled)
        }
        _ => Ok(StopOutcome::NotActive),
    }
}

/// Marks runs that say "running" but whose process is gone and was not this UI's child (the UI
/// was not there to see it end).
fn settle_orphans(q: &Queue) {
    for r in runs::list(&q.workdir) {
        let ours = r.pid.is_some_and(|p| lock(&q.own).contains(&p));
        if r.status == Status::Running && !ours && !r.pid.is_some_and(runs::process_alive) {
            q.update(&r.id, |m| {
                if m.status == Status::Running {
                    m.status = if m.stop_requested { Status::Stopped } else { Status::Exited };
                    m.ended.get_or_insert_with(runs::now_secs);
                }
            });
        }
    }
}

/// A poisoned lock still holds usable data (a list of ids, a set of pids, nothing).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The scheduler: starts the next queued run when nothing runs.
pub fn start_scheduler(state: Arc<AppState>) {
    tokio::spawn(async move {
        loop {
            schedule_once(&state);
            // Woken by a new run or an end; the timeout catches runs of an earlier UI ending.
            let _ = tokio::time::timeout(Duration::from_secs(2), state.queue.wake.notified()).await;
        }
    });
}

fn schedule_once(state: &Arc<AppState>) {
    let q = &state.queue;
    settle_orphans(q);
    if q.running().is_some() {
        return;
    }
    let Some(id) = q.waiting().pop_front() else { return };
    let started = q.update(&id, |meta| {
        if meta.status != Status::Queued {
            return None;
        }
        match q.spawn(meta) {
            Ok(child) => Some(child),
            Err(e) => {
                append_log(&meta.dir(&q.workdir), &format!("sdbooth ui: {e}"));
                meta.status = Status::Failed;
                meta.ended = Some(runs::now_secs());
                None
            }
        }
    });
    match started {
        Some((_, Some(child))) => {
            if let Some(pid) = child.id() {
                lock(&q.own).insert(pid);
            }
            tokio::spawn(wait_for_end(state.clone(), id, child));
        }
        _ => q.wake.notify_one(),
    }
}

async fn wait_for_end(state: Arc<AppState>, id: String, mut child: tokio::process::Child) {
    let pid = child.id();
    let status = child.wait().await;
    let q = &state.queue;
    q.update(&id, |meta| {
        meta.exit_code = status.as_ref().ok().and_then(|s| s.code());
        meta.ended = Some(runs::now_secs());
        meta.status = match status {
            Ok(s) if s.success() => Status::Finished,
            _ if meta.stop_requested => Status::Stopped,
            _ => Status::Failed,
        };
    });
    if let Some(pid) = pid {
        lock(&q.own).remove(&pid);
    }
    q.wake.notify_one();
}

fn append_log(dir: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(runs::LOG_FILE)) {
        let _ = writeln!(f, "{line}");
    }
}
