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

/// `--masked_loss` with `alpha_mask`: the trainer resizes each image's alpha mask to the latents'
/// size on the host and weights the loss by it. With an opaque image (mask 1 everywhere) the
/// losses are bit for bit those of the run without `--masked_loss`; with the left half
/// transparent they differ, and the run trains.
#[test]
fn masked_loss_weights_the_loss_by_the_alpha_channel() {
    let dir = tempfile::tempdir().unwrap();
    let losses = |name: &str, transparent_half: bool, masked: bool| -> Vec<f64> {
        let images = dir.path().join(name).join("img");
        std::fs::create_dir_all(&images).unwrap();
        let img = image::RgbaImage::from_fn(64, 64, |x, y| {
            let alpha = if transparent_half && x < 32 { 0 } else { 255 };
            image::Rgba([(x * 3) as u8, (y * 5) as u8, 128, alpha])
        });
        img.save(images.join("a.png")).unwrap();
        let toml = dir.path().join(name).join("d.toml");
        std::fs::write(
            &toml,
            "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"img\"\n\
             class_tokens = \"sks\"\nalpha_mask = true\n",
        )
        .unwrap();
        let out = dir.path().join(name).join("out");
        let (toml_s, out_s) = (toml.display().to_string(), out.display().to_string());
        let mut args = vec!["train", "--pretrained_model_name_or_path", "builtin:tiny-sd1"];
        args.extend(["--dataset_config", &toml_s, "--output_dir", &out_s, "--max_train_steps", "3"]);
        args.extend(["--seed", "7", "--learning_rate", "1e-4", "--save_model_as", "safetensors"]);
        if masked {
            args.push("--masked_loss");
        }
        let o = Command::new(env!("CARGO_BIN_EXE_sdbooth")).args(&args).output().expect("runs");
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let log = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    };
    let plain = losses("opaque-plain", false, false);
    let opaque = losses("opaque-masked", false, true);
    let half = losses("half-masked", true, true);
    assert_eq!(plain.len(), 3);
    assert_eq!(opaque, plain, "a mask of ones changed the loss");
    assert!(half.iter().all(|l| l.is_finite()), "{half:?}");
    assert!(half[0] != plain[0], "the transparent half did not change the loss: {half:?} vs {plain:?}");
}
