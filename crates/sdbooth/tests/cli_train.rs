//! The training issue's contract command lines, run from examples/toy exactly as written.

use std::path::{Path, PathBuf};
use std::process::Command;

fn toy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy")
}

fn train(out: &Path, extra: &[&str]) {
    let out_s = out.display().to_string();
    let mut args = vec![
        "train",
        "--pretrained_model_name_or_path",
        "builtin:tiny-sd1",
        "--dataset_config",
        "dataset.toml",
        "--save_model_as",
        "safetensors",
        "--learning_rate",
        "1e-4",
        "--optimizer_type",
        "AdamW",
        "--seed",
        "7",
        "--cache_latents",
        "--output_dir",
        &out_s,
        "--output_name",
        "m",
        "--max_train_steps",
        "20",
    ];
    args.extend(extra);
    let o =
        Command::new(env!("CARGO_BIN_EXE_sdbooth")).current_dir(toy()).args(&args).output().expect("runs");
    assert!(o.status.success(), "{args:?}\n{}", String::from_utf8_lossy(&o.stderr));
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let map = candle_core::safetensors::load(p, &candle_core::Device::Cpu).expect("loads");
    let mut v: Vec<(String, Vec<f32>)> = map
        .into_iter()
        .map(|(k, t)| {
            (k, t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn train_save_state_and_resume_match_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, saved, resumed) =
        (dir.path().join("plain"), dir.path().join("saved"), dir.path().join("resumed"));
    train(&plain, &[]);
    assert!(plain.join("m.safetensors").is_file());

    train(&saved, &["--save_every_n_steps", "10", "--save_state"]);
    let state = saved.join("m-step00000010-state");
    assert!(state.is_dir(), "no state folder");
    let state_s = state.display().to_string();
    train(&resumed, &["--save_every_n_steps", "10", "--save_state", "--resume", &state_s]);

    let (a, b, c) = (
        tensors(&plain.join("m.safetensors")),
        tensors(&saved.join("m.safetensors")),
        tensors(&resumed.join("m.safetensors")),
    );
    assert_eq!(a.len(), c.len());
    for ((ka, va), ((kb, vb), (kc, vc))) in a.iter().zip(b.iter().zip(c.iter())) {
        assert_eq!((ka, ka), (kb, kc));
        assert!(va == vb, "{ka}: saving states changed training");
        assert!(va == vc, "{ka}: the resumed run differs from the uninterrupted one");
    }
}
