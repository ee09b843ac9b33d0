//! kohya's --config_file / --output_config through the binary.

use std::process::{Command, Output};

fn sdbooth(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_sdbooth")).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run sdbooth: {e}"),
    }
}

#[test]
fn output_config_then_config_file_round_trip() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let cfg = dir.path().join("flags.toml");
    let cfg_s = cfg.to_string_lossy().to_string();
    // kohya appends .toml when the name lacks it.
    let stem = cfg_s.trim_end_matches(".toml");
    let write = sdbooth(&[
        "train",
        "--config_file",
        stem,
        "--output_config",
        "--learning_rate",
        "1e-6",
        "--xformers",
        "--mixed_precision",
        "bf16",
        "--max_train_steps",
        "1600",
        "--full_fp16",
    ]);
    assert!(write.status.success(), "{}", String::from_utf8_lossy(&write.stderr));
    let text = std::fs::read_to_string(&cfg).unwrap_or_default();
    let doc: toml::Table = text.parse().unwrap_or_default();
    let lr = doc.get("optimizer").and_then(|o| o.get("learning_rate")).and_then(|v| v.as_float());
    assert_eq!(lr, Some(1e-6), "{text}");
    assert!(text.contains("xformers = true"), "{text}");
    assert!(text.contains("mixed_precision = \"bf16\""), "{text}");
    // Equal to kohya's default: not written, as kohya.
    assert!(!text.contains("max_train_steps"), "{text}");

    // Writing over an existing file is refused, as kohya.
    let again = sdbooth(&["train", "--config_file", &cfg_s, "--output_config"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // Reading it back: the values take effect (here: --full_fp16, which this build refuses by
    // name, which proves it was read from the file).
    let read = sdbooth(&["train", "--config_file", &cfg_s]);
    assert!(!read.status.success());
    let err = String::from_utf8_lossy(&read.stderr);
    assert!(err.contains("--full_fp16 is not supported yet"), "{err}");
}

#[test]
fn config_file_errors_name_file_line_and_key() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let cfg = dir.path().join("bad.toml");
    assert!(std::fs::write(&cfg, "[training]\nmax_train_step = 10\n").is_ok());
    let out = sdbooth(&["train", "--config_file", &cfg.to_string_lossy()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("line 2: max_train_step: unknown key (did you mean 'max_train_steps'?)"), "{err}");
}
