//! `sdbooth train --dry_run` on a legacy folder layout: the wiring from flags to sdbooth-data's
//! dataset report, the JSON file, and bad files (abort, or skip with --skip_bad_images).

use std::path::Path;
use std::process::{Command, Output};

fn sdbooth(dir: &Path, args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_sdbooth")).current_dir(dir).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run sdbooth: {e}"),
    }
}

fn png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 128]));
    if let Err(e) = img.save(path) {
        panic!("cannot write {}: {e}", path.display());
    }
}

/// train/5_sks dog: 2 images; reg/1_dog: 3 images.
fn legacy_layout(root: &Path) {
    let t = root.join("train/5_sks dog");
    let r = root.join("reg/1_dog");
    for d in [&t, &r] {
        if let Err(e) = std::fs::create_dir_all(d) {
            panic!("{e}");
        }
    }
    png(&t.join("a.png"), 64, 64);
    png(&t.join("b.png"), 96, 64);
    for n in ["c", "d", "e"] {
        png(&r.join(format!("{n}.png")), 64, 64);
    }
}

const BASE: [&str; 17] = [
    "train",
    "--dry_run",
    "--pretrained_model_name_or_path",
    "builtin:tiny-sd1",
    "--train_data_dir",
    "train",
    "--reg_data_dir",
    "reg",
    "--resolution",
    "64",
    "--output_dir",
    "out",
    "--enable_bucket",
    "--min_bucket_reso",
    "64",
    "--max_bucket_reso",
    "128",
];

#[test]
fn dry_run_reports_and_writes_json() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    legacy_layout(dir.path());
    let mut args = BASE.to_vec();
    args.extend(["--json", "report.json"]);
    let out = sdbooth(dir.path(), &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("num train images * repeats: 10"), "{stdout}");
    assert!(stdout.contains("total optimization steps: 1600"), "{stdout}");
    let json = std::fs::read_to_string(dir.path().join("report.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    assert_eq!(v["num_train_images"], 10, "{json}");
    // Nothing is trained or written to the output folder.
    assert!(!dir.path().join("out").exists());
}

#[test]
fn bad_files_abort_or_are_skipped() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    legacy_layout(dir.path());
    let t = dir.path().join("train/5_sks dog");
    assert!(std::fs::write(t.join("empty.png"), b"").is_ok());
    assert!(std::fs::write(t.join("text.jpg"), b"not an image at all").is_ok());
    let out = sdbooth(dir.path(), &BASE);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty.png") && err.contains("text.jpg"), "{err}");

    let mut args = BASE.to_vec();
    args.push("--skip_bad_images");
    let out = sdbooth(dir.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The README's main command, from examples/toy, as written there except for `--output_dir`
/// (a temporary folder, so the test leaves the checkout clean): it trains, and the model it
/// writes opens in `sdbooth inspect` and `sdbooth generate`.
#[test]
fn readme_main_command_on_examples_toy() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
        .unwrap_or_default();
    let line = readme.lines().find(|l| l.starts_with("cd examples/toy && cargo run")).unwrap_or_default();
    let mut args: Vec<String> = match line.split_once(" -- ") {
        Some((_, rest)) => rest.split_whitespace().map(str::to_string).collect(),
        None => panic!("README's first command is not `cd examples/toy && cargo run … -- <args>`"),
    };
    assert_eq!(args.first().map(String::as_str), Some("train"));
    let out_dir = tempfile::tempdir().unwrap();
    let i = args.iter().position(|a| a == "--output_dir").expect("the README command names --output_dir");
    args[i + 1] = out_dir.path().display().to_string();
    let name =
        args.iter().position(|a| a == "--output_name").map(|i| args[i + 1].clone()).expect("--output_name");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sdbooth(&toy, &argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("reg balancing"), "the run shows the dataset first: {stderr}");
    let model = out_dir.path().join(format!("{name}.safetensors"));
    assert!(model.is_file(), "{stderr}");
    let model_s = model.display().to_string();
    let inspect = sdbooth(&toy, &["inspect", &model_s]);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let samples = out_dir.path().join("samples");
    let samples_s = samples.display().to_string();
    let generate = sdbooth(
        &toy,
        &[
            "generate",
            "--ckpt",
            &model_s,
            "--prompt",
            "a photo of sks dog",
            "--steps",
            "4",
            "--W",
            "64",
            "--H",
            "64",
            "--outdir",
            &samples_s,
        ],
    );
    assert!(generate.status.success(), "{}", String::from_utf8_lossy(&generate.stderr));
    assert_eq!(std::fs::read_dir(&samples).map(|d| d.count()).unwrap_or(0), 1);
}

#[test]
fn debug_dataset_prints_each_image() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    legacy_layout(dir.path());
    let mut args: Vec<&str> = BASE.iter().copied().filter(|a| *a != "--dry_run").collect();
    args.push("--debug_dataset");
    let out = sdbooth(dir.path(), &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("a.png: 64x64 -> bucket"), "{stdout}");
    assert!(stdout.contains("e.png: 64x64 -> bucket") && stdout.contains(", reg, caption: dog"), "{stdout}");
}
