//! End to end: the tiny built-in model trains on examples/toy, saves, and resumes exactly.

use std::path::{Path, PathBuf};

use sdbooth_train::args::TrainArgs;
use sdbooth_train::trainer::train_checked;

fn toy_toml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy/dataset.toml")
}

fn args(out: &Path, extra: &[&str]) -> TrainArgs {
    let mut v: Vec<String> = [
        "--pretrained_model_name_or_path",
        "builtin:tiny-sd1",
        "--save_model_as",
        "safetensors",
        "--learning_rate",
        "1e-4",
        "--optimizer_type",
        "AdamW",
        "--seed",
        "7",
        "--cache_latents",
        "--output_name",
        "m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("--dataset_config".into());
    v.push(toy_toml().display().to_string());
    v.push("--output_dir".into());
    v.push(out.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    TrainArgs::try_parse_from(v).expect("flags parse")
}

fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).expect("saved model loads")
}

#[test]
fn trains_saves_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let full =
        train_checked(&args(&a, &["--max_train_steps", "6", "--save_every_n_steps", "3", "--save_state"]))
            .expect("training runs");
    assert_eq!(full.global_step, 6);
    assert!(a.join("m.safetensors").is_file());
    assert!(a.join("m-step00000003.safetensors").is_file());
    let state = a.join("m-step00000003-state");
    assert!(state.is_dir());
    assert!(full.final_loss.is_finite());

    let state_arg = state.display().to_string();
    let resumed =
        train_checked(&args(&b, &["--max_train_steps", "6", "--resume", &state_arg])).expect("resume runs");
    assert_eq!(resumed.global_step, 6);
    let (x, y) = (tensors(&a.join("m.safetensors")), tensors(&b.join("m.safetensors")));
    assert_eq!(x.len(), y.len());
    let mut changed = 0;
    let start = tensors(&a.join("m-step00000003.safetensors"));
    for (k, t) in &x {
        let u = &y[k];
        let (tv, uv) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(tv == uv, "{k} differs after resume");
        if start[k].flatten_all().unwrap().to_vec1::<f32>().unwrap() != tv {
            changed += 1;
        }
    }
    assert!(changed > 100, "training steps 4-6 changed only {changed} tensors");
}
