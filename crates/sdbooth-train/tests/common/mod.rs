//! Shared by the training tests: command lines for the tiny built-in model on examples/toy.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};

use sdbooth_train::args::TrainArgs;

pub fn toy_toml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy/dataset.toml")
}

/// The flags the toy training tests share: safetensors output named `m`, AdamW at 1e-4, seed 7,
/// cached latents.
pub const TOY_FLAGS: [&str; 11] = [
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
];

/// `builtin:tiny-sd1` on `dataset` writing into `out`, with `flags` (kohya names) appended.
pub fn tiny_args(dataset: &Path, out: &Path, flags: &[&str]) -> TrainArgs {
    let mut v: Vec<String> = vec!["--pretrained_model_name_or_path".into(), "builtin:tiny-sd1".into()];
    v.extend(["--dataset_config".to_string(), dataset.display().to_string()]);
    v.extend(["--output_dir".to_string(), out.display().to_string()]);
    v.extend(flags.iter().map(|s| s.to_string()));
    TrainArgs::try_parse_from(v).expect("flags parse")
}

/// A saved model's tensors as f32 vectors, sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu).expect("saved model loads");
    let mut v: Vec<(String, Vec<f32>)> = map
        .into_iter()
        .map(|(k, t)| {
            (k, t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
