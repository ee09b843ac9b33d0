//! End to end: the tiny built-in model trains on examples/toy, saves, and resumes exactly.

mod common;

use std::path::Path;

use common::{tensors, tiny_args, toy_toml, TOY_FLAGS};
use sdbooth_train::trainer::train_checked;

fn run(out: &Path, extra: &[&str]) -> sdbooth_train::trainer::TrainSummary {
    let flags: Vec<&str> = TOY_FLAGS.iter().chain(extra).copied().collect();
    train_checked(&tiny_args(&toy_toml(), out, &flags)).expect("training runs")
}

#[test]
fn trains_saves_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let full = run(&a, &["--max_train_steps", "6", "--save_every_n_steps", "3", "--save_state"]);
    assert_eq!(full.global_step, 6);
    assert!(a.join("m.safetensors").is_file());
    assert!(a.join("m-step00000003.safetensors").is_file());
    let state = a.join("m-step00000003-state");
    assert!(state.is_dir());
    assert!(full.final_loss.is_finite());

    let state_arg = state.display().to_string();
    let resumed = run(&b, &["--max_train_steps", "6", "--resume", &state_arg]);
    assert_eq!(resumed.global_step, 6);
    let (x, y) = (tensors(&a.join("m.safetensors")), tensors(&b.join("m.safetensors")));
    assert!(x == y, "the resumed run differs from the uninterrupted one");
    let start = tensors(&a.join("m-step00000003.safetensors"));
    let changed = x.iter().zip(&start).filter(|(after, before)| after.1 != before.1).count();
    assert!(changed > 100, "training steps 4-6 changed only {changed} tensors");
}
