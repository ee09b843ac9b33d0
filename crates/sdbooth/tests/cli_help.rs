//! `sdbooth train --help` and clap's handling of unknown flags, through the built binary.

use std::process::{Command, Output};

fn sdbooth(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_sdbooth")).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run sdbooth: {e}"),
    }
}

#[test]
fn help_lists_every_kohya_flag_and_ours() {
    let out = sdbooth(&["train", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let kohya = include_str!("cli_kohya_train_db_flags.txt");
    let flags: Vec<&str> = kohya.lines().filter(|l| l.starts_with("--")).collect();
    assert_eq!(flags.len(), 169);
    let ours = [
        "--dry_run",
        "--json",
        "--skip_bad_images",
        "--ignore_exif_orientation",
        "--validation_split",
        "--validation_seed",
        "--fused_backward_pass",
        "--full_bf16",
        "--device",
        "--allow_tf32",
    ];
    let missing: Vec<&str> = flags
        .iter()
        .chain(ours.iter())
        .copied()
        // A flag is listed when it appears followed by a space, '=' or end of line
        // (so --save_state does not count as listed because of --save_state_on_train_end).
        .filter(|f| !help.lines().any(|l| l.split_whitespace().any(|w| w.trim_end_matches(',') == *f)))
        .collect();
    assert!(missing.is_empty(), "missing from --help: {missing:?}");
    for heading in [
        "Model:",
        "Dataset:",
        "Training:",
        "Optimizer:",
        "Memory and precision:",
        "Saving:",
        "Sampling:",
        "Logging:",
    ] {
        assert!(help.contains(heading), "no {heading} group in --help");
    }
}

#[test]
fn unknown_flag_fails_with_a_suggestion() {
    let out = sdbooth(&["train", "--learning_rat", "1e-6"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--learning_rat"), "{err}");
    assert!(err.contains("--learning_rate"), "no suggestion in: {err}");
}

#[test]
fn invalid_choice_is_rejected() {
    let out = sdbooth(&["train", "--max_token_length", "100"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("150 or 225"), "{err}");
    let out = sdbooth(&["train", "--mixed_precision", "fp32"]);
    assert!(!out.status.success());
}

#[test]
fn kebab_case_spelling_is_accepted() {
    let out = sdbooth(&["train", "--learning-rate", "1e-6", "--output-config"]);
    // It parses (the error is about --output_config needing --config_file, not an unknown flag).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--output_config needs --config_file"), "{err}");
}
