//! `sdbooth generate` as the sampling issue's contract states it: PNGs with A1111 parameters,
//! identical files for the same command.

use std::process::Command;

fn generate(outdir: &std::path::Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_sdbooth"))
        .args(["generate", "--ckpt", "builtin:tiny-sd1", "--prompt", "a photo of sks dog", "--steps", "4"])
        .args(["--seed", "3", "--W", "64", "--H", "64", "--sampler", "euler_a", "--outdir"])
        .arg(outdir)
        .status()
        .expect("runs");
    assert!(status.success());
}

#[test]
fn same_command_same_png_with_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    generate(&a);
    generate(&b);
    let files: Vec<_> = std::fs::read_dir(&a).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap();
    let (x, y) = (std::fs::read(&files[0]).unwrap(), std::fs::read(b.join(name)).unwrap());
    assert_eq!(x, y, "same command, different bytes");
    let decoder = png::Decoder::new(std::io::Cursor::new(&x));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (64, 64));
    let params =
        info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").expect("parameters chunk");
    assert!(params
        .text
        .starts_with("a photo of sks dog\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 3"));
}

#[test]
fn bad_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sdbooth"))
        .args(["generate", "--ckpt", "builtin:tiny-sd1", "--prompt", "x", "--W", "60", "--outdir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 8"));
}
