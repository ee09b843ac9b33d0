//! Flags this build does not implement are refused by name, never ignored.

use std::process::{Command, Output};

fn sdbooth(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_sdbooth")).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run sdbooth: {e}"),
    }
}

fn failing_stderr(args: &[&str]) -> String {
    let out = sdbooth(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn out_of_scope_flags_say_so() {
    for (flags, name) in [
        (vec!["--deepspeed"], "--deepspeed"),
        (vec!["--zero_stage", "3"], "--zero_stage"),
        (vec!["--ddp_static_graph"], "--ddp_static_graph"),
        (vec!["--torch_compile"], "--torch_compile"),
        (vec!["--dynamo_backend", "eager"], "--dynamo_backend"),
        (vec!["--fp8_base"], "--fp8_base"),
        (vec!["--huggingface_repo_id", "me/x"], "--huggingface_repo_id"),
        (vec!["--log_with", "wandb"], "--log_with"),
    ] {
        let mut args = vec!["train"];
        args.extend(flags);
        let err = failing_stderr(&args);
        assert!(err.contains(&format!("{name} is out of scope: ")), "{args:?}: {err}");
    }
}

#[test]
fn unimplemented_flags_are_listed_together() {
    let err =
        failing_stderr(&["train", "--full_fp16", "--log_config", "--learning_rate", "1e-6", "--deepspeed"]);
    assert!(err.contains("--full_fp16 is not supported yet"), "{err}");
    assert!(err.contains("--log_config is not supported yet"), "{err}");
    assert!(!err.contains("--learning_rate"), "an implemented flag was refused: {err}");
    assert!(err.contains("--deepspeed is out of scope"), "{err}");
}

#[test]
fn training_without_a_dataset_says_what_is_missing() {
    let err = failing_stderr(&["train", "--pretrained_model_name_or_path", "builtin:tiny-sd1"]);
    assert!(err.contains("--dataset_config or --train_data_dir is required"), "{err}");
}

#[test]
fn dry_run_refuses_out_of_scope_flags_too() {
    let err = failing_stderr(&["train", "--dry_run", "--deepspeed", "--train_data_dir", "nowhere"]);
    assert!(err.contains("--deepspeed is out of scope"), "{err}");
}

#[test]
fn json_needs_dry_run() {
    let err = failing_stderr(&["train", "--json", "x.json"]);
    assert!(err.contains("--dry_run"), "{err}");
}
