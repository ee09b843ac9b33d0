//! `--device` and `sdbooth selftest` through the binary, on a machine without a GPU (CI): the
//! selftest compares the reference ops with the CPU kernels and passes; `--device cuda` fails
//! with a message saying why; `auto` runs on the CPU.

use std::process::{Command, Output};

fn sdbooth(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_sdbooth")).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run sdbooth: {e}"),
    }
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The ops this build computes with, compared op by op in f32 and f16 (the CPU's dtypes): the
/// table lists each op and the run passes.
#[test]
fn selftest_on_the_cpu_compares_every_op_and_passes() {
    let o = sdbooth(&["selftest", "--device", "cpu"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "selftest failed:\n{out}\n{err}");
    assert!(err.contains("device: CPU"), "{err}");
    assert!(out.contains("reference ops on cpu vs ops on cpu"), "{out}");
    for op in [
        "conv2d 3x3 s1",
        "conv2d 3x3 s2",
        "conv2d 1x1",
        "linear",
        "group_norm+silu",
        "layer_norm",
        "softmax",
        "attention self",
        "attention cross",
        "attention causal",
        "gelu",
        "geglu",
        "silu",
        "embedding",
        "upsample nearest 2x",
        "timestep embedding",
    ] {
        for dtype in ["f32", "f16"] {
            let line = out.lines().find(|l| l.starts_with(op) && l.contains(&format!(" {dtype} ")));
            assert!(line.is_some_and(|l| l.ends_with("ok")), "{op} {dtype}:\n{out}");
        }
    }
    // Gradients are compared, not only outputs.
    assert!(out.lines().any(|l| l.starts_with("attention causal") && l.contains(" dk ")), "{out}");
    // The optimizers' device implementations against their CPU kernels (bf16: stochastic rounding).
    for (optimizer, dtype) in [
        ("AdamW", "f32"),
        ("AdamW8bit", "f32"),
        ("Lion", "f32"),
        ("SGDNesterov", "f32"),
        ("Adafactor", "f32"),
        ("AdamW8bit", "bf16"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("optimizer {optimizer} ")) && l.contains(&format!(" {dtype} ")));
        assert!(line.is_some_and(|l| l.ends_with("ok")), "optimizer {optimizer} {dtype}:\n{out}");
    }
    assert!(out.contains("compared tensors within bounds"), "{out}");
}

#[test]
fn selftest_rejects_an_unknown_device_or_dtype() {
    let (_, err) = text(&sdbooth(&["selftest", "--device", "tpu"]));
    assert!(err.contains("use auto, cpu, cuda or cuda:N"), "{err}");
    let (_, err) = text(&sdbooth(&["selftest", "--dtypes", "f64"]));
    assert!(err.contains("use f32, bf16 or f16"), "{err}");
}

/// Without a usable GPU, an explicit CUDA device is an error naming the reason: no CUDA in the
/// build, or (CUDA build) the missing driver. `auto` falls back to the CPU.
#[test]
fn device_cuda_without_a_gpu_fails_clearly() {
    let o = sdbooth(&["selftest", "--device", "cuda:0", "--dtypes", "f32"]);
    let (_, err) = text(&o);
    if o.status.success() {
        return; // a machine with a usable GPU
    }
    assert!(err.contains("--device cuda:0"), "{err}");
    assert!(
        err.contains("built without CUDA") || err.contains("driver") || err.contains("cannot be loaded"),
        "{err}"
    );
    let o = sdbooth(&["selftest", "--device", "auto", "--dtypes", "f32"]);
    let (_, err) = text(&o);
    assert!(o.status.success() && err.contains("device: CPU"), "{err}");
}

/// `--allow_tf32` would have no effect on the CPU, so a run that is on the CPU (`--device cpu`,
/// or `auto` without a GPU) refuses it by name before reading the dataset or the model.
#[test]
fn allow_tf32_is_refused_on_the_cpu() {
    for device in ["cpu", "auto"] {
        let o = sdbooth(&[
            "train",
            "--device",
            device,
            "--allow_tf32",
            "--pretrained_model_name_or_path",
            "missing.safetensors",
            "--train_data_dir",
            "missing-folder",
        ]);
        let (_, err) = text(&o);
        if err.contains("device: cuda") {
            return; // `auto` on a machine with a usable GPU
        }
        assert!(!o.status.success(), "{device}: {err}");
        assert!(err.contains("--allow_tf32: TF32 is a mode of NVIDIA GPUs"), "{device}: {err}");
        assert!(!err.contains("missing"), "{device}: read the dataset or model first: {err}");
    }
}
