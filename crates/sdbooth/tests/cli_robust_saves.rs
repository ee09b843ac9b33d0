//! Issue 11, outputs and states: what a run leaves on disk and what it says when the disk or a
//! saved state is not as expected (items 12, 16, 17 and 21).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{mkdir, tempdir, toy_train};

const TINY: [&str; 2] = ["--pretrained_model_name_or_path", "builtin:tiny-sd1"];

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Item 12: 100,000 loader threads are capped at the CPU count (kohya's rule), and the run says
/// so; it used to start 100,000 threads and run past 5 minutes.
#[test]
fn a_huge_loader_thread_count_is_capped_at_the_cpu_count() {
    let dir = tempdir();
    let started = Instant::now();
    let mut args = TINY.to_vec();
    args.extend(["--max_train_steps", "1", "--max_data_loader_n_workers", "100000"]);
    let o = toy_train(&dir.path().join("out"), &args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let note = format!("--max_data_loader_n_workers 100000 is capped at the CPU count, {cpus}");
    assert!(err.contains(&note), "{err}");
    assert!(started.elapsed() < Duration::from_secs(120), "took {:?}", started.elapsed());
}

/// Item 16: temporary folders that a killed run left under this output name are removed when a
/// run starts; those of another output name or of a live process stay.
#[test]
fn stale_temporary_saves_are_removed_at_start() {
    let dir = tempdir();
    let out = dir.path().join("out");
    // Above the largest pid Linux allows (2^22), so never a live process.
    let dead = ".m-step00000003-state.tmp-4194305";
    let live = format!(".m-step00000004-state.tmp-{}", std::process::id());
    let other = ".n-state.tmp-4194305";
    for name in [dead, live.as_str(), other] {
        mkdir(&out.join(name).join("sub"));
    }
    let mut args = TINY.to_vec();
    args.extend(["--max_train_steps", "1"]);
    let o = toy_train(&out, &args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!out.join(dead).exists(), "{err}");
    assert!(
        err.contains(&format!("removed {} (left by an interrupted save)", out.join(dead).display())),
        "{err}"
    );
    assert!(out.join(&live).is_dir() && out.join(other).is_dir(), "{err}");
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    mkdir(to);
    for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
        if let Err(err) = std::fs::copy(e.path(), to.join(e.file_name())) {
            panic!("{}: {err}", e.path().display());
        }
    }
}

/// Items 21 and 17: every file of a saved state has the mode of the other outputs (the weights
/// were 0600); resuming a state whose weights are missing or truncated, or whose optimizer file
/// is missing, names that file.
#[test]
fn state_files_have_the_output_mode_and_broken_ones_are_named() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let mut args = TINY.to_vec();
    args.extend(["--max_train_steps", "1", "--save_state_on_train_end"]);
    let o = toy_train(&out, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let state = out.join("m-state");
    let model_mode = mode(&out.join("m.safetensors"));
    for f in ["state.json", "weights.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            mode(&state.join(f)),
            model_mode,
            "{f}: {:o} vs the model's {model_mode:o}",
            mode(&state.join(f))
        );
    }

    let broken = |name: &str, breaks: &dyn Fn(&Path)| {
        let copy = dir.path().join(name);
        copy_dir(&state, &copy);
        breaks(&copy);
        let copy_s = copy.display().to_string();
        let mut args = TINY.to_vec();
        args.extend(["--max_train_steps", "2", "--resume", &copy_s]);
        let o = toy_train(&dir.path().join(format!("{name}-out")), &args);
        assert!(!o.status.success());
        stderr(&o)
    };
    let remove = |f: &'static str| move |d: &Path| std::fs::remove_file(d.join(f)).unwrap_or_default();
    let err = broken("no-weights", &remove("weights.safetensors"));
    assert!(err.contains("no-weights/weights.safetensors"), "{err}");
    let err = broken("no-optimizer", &remove("optimizer.safetensors"));
    assert!(err.contains("no-optimizer/optimizer.safetensors"), "{err}");
    let err = broken("cut-weights", &|d: &Path| {
        let w = d.join("weights.safetensors");
        let bytes = std::fs::read(&w).unwrap_or_default();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap_or_default();
    });
    assert!(err.contains("cut-weights/weights.safetensors"), "{err}");
    for bad in ["panicked", "internal error"] {
        assert!(!err.contains(bad), "{err}");
    }
}

/// Runs `sdbooth train` with its output folder on a fresh tmpfs of `size` (a mount namespace of
/// its own, as an unprivileged user where the kernel allows it); `None` where no tmpfs can be
/// mounted.
fn train_on_small_disk(out: &Path, size: &str, extra: &[&str]) -> Option<Output> {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    mkdir(out);
    let probe = Command::new("unshare")
        .args(["--mount", "--map-root-user", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$0\""])
        .arg(out)
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return None;
    }
    let out_s = out.display().to_string();
    let mount = format!("mount -t tmpfs -o size={size} tmpfs \"$0\" && exec \"$@\"");
    let mut args =
        vec!["--mount", "--map-root-user", "sh", "-c", &mount, &out_s, env!("CARGO_BIN_EXE_sdbooth")];
    args.extend(["train", "--dataset_config", "dataset.toml", "--output_dir", &out_s, "--output_name", "m"]);
    args.extend(["--save_model_as", "safetensors"]);
    args.extend(extra);
    Command::new("unshare").current_dir(toy).args(&args).output().ok()
}

/// Item 17: running out of space while saving a state names the file being written (it was a
/// bare "No space left on device"). The disk (20 MiB) holds the tiny model (14 MiB) but not the
/// state after it (39 MiB).
#[test]
fn out_of_space_during_a_state_save_names_the_file() {
    let dir = tempdir();
    let out = dir.path().join("small-disk");
    let mut args = TINY.to_vec();
    args.extend(["--max_train_steps", "1", "--save_state_on_train_end"]);
    let Some(o) = train_on_small_disk(&out, "20m", &args) else {
        eprintln!("skipped: no tmpfs can be mounted here (unshare --mount --map-root-user failed)");
        return;
    };
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("saved ") && err.contains("m.safetensors"), "the model did not fit: {err}");
    let named = err
        .lines()
        .filter(|l| l.contains("No space left on device"))
        .all(|l| l.contains(&format!("{}/.m-", out.display())) && l.contains("-state.tmp-"));
    assert!(err.contains("No space left on device") && named, "{err}");
    assert!(err.contains("weights.safetensors") || err.contains("optimizer.safetensors"), "{err}");
    for bad in ["panicked", "internal error"] {
        assert!(!err.contains(bad), "{err}");
    }
}
