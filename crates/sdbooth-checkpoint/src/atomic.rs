//! Atomic file writes: a crash or a full disk never leaves a half-written file under the final
//! name. Data goes to a temporary file in the destination folder (same filesystem, so the rename
//! is atomic), is fsynced, then renamed over the target; the folder is fsynced so the rename itself
//! survives a power cut.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{name}.tmp-{}-{n}", std::process::id());
    path.with_file_name(tmp)
}

/// Writes `path` atomically: `write` gets a buffered writer on a temporary file beside `path`;
/// when it returns Ok the data is flushed, fsynced and renamed over `path`. On error the temporary
/// file is removed and `path` is untouched.
pub fn atomic_write<E, F>(path: &Path, write: F) -> Result<(), E>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<(), E>,
    E: From<std::io::Error>,
{
    atomic_write_file(path, |file| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.flush()?;
        Ok(w.into_inner().map_err(|e| e.into_error())?)
    })
}

/// Like [`atomic_write`] but for code that needs the raw `File` (e.g. a zip writer that seeks).
pub fn atomic_write_file<E, F>(path: &Path, write: F) -> Result<(), E>
where
    F: FnOnce(File) -> Result<File, E>,
    E: From<std::io::Error>,
{
    let tmp = temp_path_for(path);
    let result = (|| -> Result<(), E> {
        let file = File::create(&tmp)?;
        let file = write(file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_parent(path);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a whole byte buffer atomically (configs, JSON reports, small state files).
pub fn atomic_write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    atomic_write(path, |w| w.write_all(bytes))
}

/// Writes a folder atomically: `fill` writes into a temporary sibling folder
/// (`.NAME.tmp-PID`), whose files are fsynced (one level of sub-folders too) before it is renamed
/// to `dir`. An existing `dir` is first moved aside (`.NAME.old-PID`) and removed after the new one
/// is in place, so at any moment `dir` is either the old folder or the complete new one. `io`
/// turns an I/O error on a path into the caller's error, so every error names its path.
pub fn atomic_write_dir<E>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
    io: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
    let written = fill(&tmp).and_then(|()| fsync_tree(&tmp, 2).map_err(|(p, e)| io(&p, e)));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{pid}"));
    let replaced = dir.exists();
    if replaced {
        fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    if let Err(e) = fs::rename(&tmp, dir) {
        // Put the old folder back: the new one stays under its temporary name.
        if replaced {
            let _ = fs::rename(&old, dir);
        }
        return Err(io(dir, e));
    }
    sync_parent(dir);
    if replaced {
        fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    Ok(())
}

/// fsyncs every file of `dir` and its sub-folders down to `depth` levels, then `dir` itself.
fn fsync_tree(dir: &Path, depth: u32) -> Result<(), (PathBuf, std::io::Error)> {
    let rd = fs::read_dir(dir).map_err(|e| (dir.to_path_buf(), e))?;
    for entry in rd {
        let p = entry.map_err(|e| (dir.to_path_buf(), e))?.path();
        if p.is_file() {
            File::open(&p).and_then(|f| f.sync_all()).map_err(|e| (p.clone(), e))?;
        } else if p.is_dir() && depth > 1 {
            fsync_tree(&p, depth - 1)?;
        }
    }
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| (dir.to_path_buf(), e))
}

fn sync_parent(path: &Path) {
    // Best effort: not every platform lets a directory be opened for fsync.
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_write_replaces_whole_or_not_at_all() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        let io = |p: &Path, e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", p.display()));
        atomic_write_dir(&dir, |d| fs::write(d.join("a"), b"old"), io).unwrap();
        // A failing fill leaves the old folder as it was and no temporary folder.
        let r = atomic_write_dir(
            &dir,
            |d| {
                fs::write(d.join("a"), b"new")?;
                Err(std::io::Error::other("killed"))
            },
            io,
        );
        assert!(r.is_err());
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"old");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
        atomic_write_dir(
            &dir,
            |d| fs::create_dir(d.join("sub")).and_then(|()| fs::write(d.join("sub/b"), b"new")),
            io,
        )
        .unwrap();
        assert!(!dir.join("a").exists(), "the old folder's files are gone");
        assert_eq!(fs::read(dir.join("sub/b")).unwrap(), b"new");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_leaves_target_untouched_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.safetensors");
        fs::write(&target, b"old").unwrap();
        let r: std::io::Result<()> = atomic_write(&target, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temp file was left behind");
        atomic_write_bytes(&target, b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
