//! Stopping a run: Ctrl-C saves a state that resumes; kill -9 at any moment (here: while
//! checkpoints and states are being written every step) leaves every finished file loadable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn toy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy")
}

/// `sdbooth train` on the toy set, writing into `out`, for `max_steps` steps.
fn train_command(out: &Path, max_steps: u64) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdbooth"));
    cmd.current_dir(toy())
        .args([
            "train",
            "--pretrained_model_name_or_path",
            "builtin:tiny-sd1",
            "--dataset_config",
            "dataset.toml",
        ])
        .args(["--save_model_as", "safetensors", "--learning_rate", "1e-4", "--seed", "3", "--cache_latents"])
        .args(["--output_name", "m", "--max_train_steps", &max_steps.to_string(), "--output_dir"])
        .arg(out);
    cmd
}

fn start(out: &Path, extra: &[&str]) -> Child {
    train_command(out, 100_000)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts")
}

/// Waits until the run has logged `steps` steps (its JSONL log).
fn wait_for_steps(out: &Path, steps: usize) {
    let log = out.join("m.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let n = std::fs::read_to_string(&log).map(|s| s.lines().count()).unwrap_or(0);
        if n >= steps {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the run did not reach {steps} steps");
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill runs").success();
    assert!(ok);
}

/// Starts a run into `out`, sends `sig` once it has logged `steps` steps, checks that it exits
/// non-zero saying so, and returns the state folders it left.
fn interrupt(out: &Path, sig: &str, steps: usize) -> Vec<PathBuf> {
    let child = start(out, &[]);
    wait_for_steps(out, steps);
    signal(&child, sig);
    let result = child.wait_with_output().expect("exits");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "an interrupted run does not report success ({sig})");
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().ends_with("-state"))
        .collect()
}

#[test]
fn ctrl_c_saves_a_state_that_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let states = interrupt(&dir.path().join("a"), "-INT", 3);
    let state = states.first().expect("a state folder");
    let steps: u64 =
        state.file_name().unwrap().to_string_lossy()["m-step".len().."m-step".len() + 8].parse().unwrap();
    let resumed =
        train_command(&dir.path().join("b"), steps + 2).arg("--resume").arg(state).output().expect("runs");
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(dir.path().join("b/m.safetensors").is_file());
}

/// SIGTERM (docker stop, Slurm, systemd) is the first Ctrl-C: finish the step, save a state,
/// exit non-zero.
#[test]
fn sigterm_saves_a_state_like_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let states = interrupt(&dir.path().join("t"), "-TERM", 2);
    assert_eq!(states.len(), 1, "SIGTERM saved no state");
}

#[test]
fn kill_9_while_saving_leaves_every_finished_file_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k");
    let mut child = start(&out, &["--save_every_n_steps", "1", "--save_state"]);
    wait_for_steps(&out, 4);
    // Saving happens every step, so a kill lands in or near a write.
    std::thread::sleep(Duration::from_millis(37));
    child.kill().expect("SIGKILL");
    child.wait().ok();
    let mut models = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".safetensors") {
            candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("{name} is not loadable after kill -9: {e}"));
            models += 1;
        } else if name.ends_with("-state") {
            for f in ["state.json", "weights.safetensors", "optimizer.safetensors"] {
                assert!(path.join(f).is_file(), "{name} lacks {f}");
            }
        }
    }
    assert!(models >= 3, "expected the step checkpoints, found {models}");
}
