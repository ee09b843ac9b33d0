//! Sampling and validation during training on examples/toy with the tiny model: kohya's sample
//! file names, `loss/validation` records, report.html; sampling leaves training bit-identical,
//! and a run resumed from a mid-run state ends with the uninterrupted run's weights.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{tiny_args, toy_toml, TOY_FLAGS};
use sdbooth_train::args::TrainArgs;
use sdbooth_train::trainer::train_checked;

fn args(out: &Path, extra: &[&str]) -> TrainArgs {
    let mut flags: Vec<&str> = TOY_FLAGS.to_vec();
    flags.extend(["--validation_split", "0.4", "--validation_seed", "3"]);
    if !extra.contains(&"--max_train_steps") {
        flags.extend(["--max_train_steps", "6"]);
    }
    flags.extend(extra);
    tiny_args(&toy_toml(), out, &flags)
}

fn tensors(path: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .expect("saved model loads")
        .into_iter()
        .map(|(k, t)| {
            (k, t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap())
        })
        .collect()
}

fn assert_same_weights(a: &Path, b: &Path, what: &str) {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(x.len(), y.len());
    for (k, v) in &x {
        assert!(v == &y[k], "{what}: {k} differs");
    }
}

fn samples(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("sample"))
        .map(|rd| rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// kohya's `{output_name}_{num_suffix}_{i:02d}_{%Y%m%d%H%M%S}{_seed}.png`.
fn check_name(name: &str, num_suffix: &str, index: usize, seed: Option<u64>) -> bool {
    let Some(rest) = name.strip_prefix(&format!("m_{num_suffix}_{index:02}_")) else { return false };
    let Some(rest) = rest.strip_suffix(".png") else { return false };
    let (ts, tail) = rest.split_at(rest.len().min(14));
    ts.len() == 14
        && ts.bytes().all(|b| b.is_ascii_digit())
        && match seed {
            Some(s) => tail == format!("_{s}"),
            None => tail.is_empty(),
        }
}

#[test]
fn samples_validation_report_and_exact_resume() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# sample prompts\na photo of sks dog --w 64 --h 64 --s 2 --d 5\na dog on a beach --n blurry --w 64 --h 64 --s 2 --l 5\n",
    )
    .unwrap();
    let p = prompts.display().to_string();
    let sampling = [
        "--sample_prompts",
        &p,
        "--sample_every_n_steps",
        "3",
        "--sample_at_first",
        "--sample_sampler",
        "euler_a",
    ];
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));

    // The full run: samples at steps 0 (sample_at_first), 3 and 6; state saved at step 3.
    let mut extra = vec!["--save_every_n_steps", "3", "--save_state", "--logging_dir"];
    let logs = dir.path().join("logs").display().to_string();
    extra.push(&logs);
    extra.extend(sampling);
    let full = train_checked(&args(&a, &extra)).expect("training with sampling runs");
    assert_eq!(full.global_step, 6);

    let names = samples(&a);
    assert_eq!(names.len(), 6, "{names:?}");
    for (suffix, i, seed) in
        [("e000000", 0, Some(5)), ("e000000", 1, None), ("000003", 0, Some(5)), ("000006", 1, None)]
    {
        assert!(names.iter().any(|n| check_name(n, suffix, i, seed)), "no {suffix} #{i} in {names:?}");
    }
    // Samples carry A1111 parameters.
    let png = std::fs::read(a.join("sample").join(&names[0])).unwrap();
    assert!(png.windows(10).any(|w| w == b"parameters"));

    // Validation: 2 of the 5 instance images held out; evaluated at 0, 3 and 6.
    let val = std::fs::read_to_string(a.join("m.validation.jsonl")).expect("validation log");
    let recs: Vec<serde_json::Value> = val.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<u64> = recs.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 3, 6]);
    for r in &recs {
        assert_eq!(r["per_image"].as_array().unwrap().len(), 2);
        assert!(r["loss"].as_f64().unwrap().is_finite());
    }

    let html = std::fs::read_to_string(a.join("report.html")).expect("report.html");
    assert!(html.contains("<svg") && html.contains("<polyline"), "curves");
    assert!(html.contains("validation loss"));
    assert!(html.contains("data:image/png;base64,"), "sample thumbnails");
    assert!(html.contains("m-step00000003.safetensors"), "checkpoint list");
    assert!(!html.contains("src=\"http"), "no network");

    // The same run without sampling: identical weights (sampling draws from no training stream).
    train_checked(&args(&c, &[])).expect("training without sampling runs");
    assert_same_weights(&a.join("m.safetensors"), &c.join("m.safetensors"), "sampling on vs off");

    // Resume at step 3 with sampling on: identical final weights, samples from step 6 only.
    let state = a.join("m-step00000003-state").display().to_string();
    let mut extra = vec!["--resume", state.as_str()];
    extra.extend(sampling);
    let resumed = train_checked(&args(&b, &extra)).expect("resume runs");
    assert_eq!(resumed.global_step, 6);
    assert_same_weights(&a.join("m.safetensors"), &b.join("m.safetensors"), "resumed vs uninterrupted");
    let names = samples(&b);
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("m_000006_")));
    assert!(b.join("report.html").is_file());
}

#[test]
fn samples_at_epoch_end_and_validates_there() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.toml");
    std::fs::write(&prompts, "[[prompt]]\nprompt = \"sks dog\"\nwidth = 64\nheight = 64\nsample_steps = 2\n")
        .unwrap();
    let p = prompts.display().to_string();
    let out = dir.path().join("e");
    // Training stops inside epoch 1; kohya still runs the epoch-end sampling then.
    let extra = ["--max_train_steps", "2", "--sample_prompts", &p, "--sample_every_n_epochs", "1"];
    let a = args(&out, &extra);
    assert_eq!(a.training.max_train_steps, 2);
    train_checked(&a).expect("training runs");
    let names = samples(&out);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(check_name(&names[0], "e000001", 0, None), "{names:?}");
    let val = std::fs::read_to_string(out.join("m.validation.jsonl")).unwrap();
    let steps: Vec<u64> = val
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 2]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("epoch 1 (step 2)"), "sample group label");
}
