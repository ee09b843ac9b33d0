//! Helpers of the CLI tests: run the binary, make small datasets and files.
// Each test file is its own crate and uses some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn sdbooth(dir: &Path, args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_sdbooth")).current_dir(dir).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run sdbooth: {e}"),
    }
}

/// Runs a command that must fail cleanly; returns its stderr.
pub fn refused(dir: &Path, args: &[&str]) -> String {
    let out = sdbooth(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail with exit 1:\n{err}");
    for bad in ["panicked", "internal error", "RUST_BACKTRACE", "memory allocation"] {
        assert!(!err.contains(bad), "{args:?}: {bad}:\n{err}");
    }
    err
}

pub fn png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 128]));
    if let Err(e) = img.save(path) {
        panic!("cannot write {}: {e}", path.display());
    }
}

pub fn mkdir(p: &Path) {
    if let Err(e) = std::fs::create_dir_all(p) {
        panic!("{}: {e}", p.display());
    }
}

pub fn write(p: &Path, text: &str) {
    if let Err(e) = std::fs::write(p, text) {
        panic!("{}: {e}", p.display());
    }
}

pub fn tempdir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

pub fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

pub fn toy_train(out: &Path, extra: &[&str]) -> Output {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    let out_s = out.display().to_string();
    let mut args = vec![
        "train",
        "--dataset_config",
        "dataset.toml",
        "--output_dir",
        &out_s,
        "--output_name",
        "m",
        "--save_model_as",
        "safetensors",
    ];
    args.extend(extra);
    sdbooth(&toy, &args)
}

/// The (width, height) of a PNG file.
pub fn png_size(path: &Path) -> (u32, u32) {
    match image::image_dimensions(path) {
        Ok(d) => d,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}
