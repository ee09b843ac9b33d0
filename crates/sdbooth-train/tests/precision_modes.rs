//! Every precision and memory mode trains: fp16 (loss scaling), bf16, --full_bf16 with the fused
//! backward and AdamW8bit, gradient accumulation, weighted captions and long prompts.

use std::path::Path;

use sdbooth_train::args::TrainArgs;
use sdbooth_train::trainer::train_checked;

fn run(out: &Path, extra: &[&str]) -> f64 {
    let toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy/dataset.toml");
    let mut v: Vec<String> =
        ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--max_train_steps", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    v.extend(
        ["--cache_latents", "--learning_rate", "1e-4", "--save_model_as", "safetensors"]
            .iter()
            .map(|s| s.to_string()),
    );
    v.extend(["--dataset_config".to_string(), toml.display().to_string()]);
    v.extend(["--output_dir".to_string(), out.display().to_string()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    let summary =
        train_checked(&TrainArgs::try_parse_from(v).unwrap()).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
    assert_eq!(summary.global_step, 3, "{extra:?}");
    assert!(out.join("last.safetensors").is_file(), "{extra:?}: no model");
    summary.final_loss
}

#[test]
fn every_mode_trains() {
    let dir = tempfile::tempdir().unwrap();
    let modes: [&[&str]; 7] = [
        &["--mixed_precision", "fp16"],
        &["--mixed_precision", "bf16"],
        &["--full_bf16", "--fused_backward_pass", "--optimizer_type", "AdamW8bit"],
        &["--fused_backward_pass", "--optimizer_type", "Lion"],
        &["--gradient_accumulation_steps", "2", "--gradient_checkpointing"],
        &["--weighted_captions", "--max_token_length", "150"],
        &["--stop_text_encoder_training", "1", "--optimizer_type", "Adafactor"],
    ];
    for (i, mode) in modes.iter().enumerate() {
        let loss = run(&dir.path().join(i.to_string()), mode);
        assert!(loss.is_finite(), "{mode:?}: loss {loss}");
    }
}

#[test]
fn fused_backward_refuses_accumulation_and_fp16() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [
        &["--fused_backward_pass", "--gradient_accumulation_steps", "2"][..],
        &["--fused_backward_pass", "--mixed_precision", "fp16"][..],
    ] {
        let toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy/dataset.toml");
        let mut v: Vec<String> =
            ["--pretrained_model_name_or_path", "builtin:tiny-sd1"].iter().map(|s| s.to_string()).collect();
        v.extend(["--dataset_config".to_string(), toml.display().to_string()]);
        v.extend(["--output_dir".to_string(), dir.path().display().to_string()]);
        v.extend(mode.iter().map(|s| s.to_string()));
        let err = train_checked(&TrainArgs::try_parse_from(v).unwrap()).expect_err("refused");
        assert!(err.to_string().contains("--fused_backward_pass"), "{mode:?}: {err}");
    }
}
