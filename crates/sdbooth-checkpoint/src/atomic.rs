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
    let tmp = temp_path_for(path);
    let result = (|| -> Result<(), E> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.flush()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
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
