//! PyTorch golden tests: fixtures written by `tools/goldens/ops.py` (PyTorch 2.6, computed in
//! f64 from f32 inputs). For each case: output within norm-relative 1e-5, every input/weight
//! gradient of `Σ out·g` within 1e-4. Tests never need Python.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{grads_of, norm_rel};
use sdbooth_ops as ops;
use std::collections::HashMap;

fn fixtures() -> HashMap<String, Tensor> {
    // Through the crates folder: sdbooth-train's generic_path test compiles this file in too.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdbooth-ops/tests/fixtures/ops.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("fixture file (run tools/goldens/ops.py)")
}

/// Runs `f` on the case's inputs (in `names` order) and compares output and gradients.
fn check<F>(fx: &HashMap<String, Tensor>, case: &str, names: &[&str], f: F)
where
    F: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
{
    let get = |k: String| fx.get(&k).unwrap_or_else(|| panic!("fixture lacks {k}")).clone();
    let ins: Vec<Tensor> = names.iter().map(|n| get(format!("{case}.in.{n}"))).collect();
    let out_t = get(format!("{case}.out"));
    let g = get(format!("{case}.g"));
    let grad_names: Vec<usize> =
        (0..names.len()).filter(|&i| fx.contains_key(&format!("{case}.grad.{}", names[i]))).collect();
    if grad_names.is_empty() {
        let out = f(&ins).unwrap();
        let e = norm_rel(&out, &out_t);
        assert!(e <= 1e-5, "{case}: output error {e:.2e}");
        return;
    }
    let (out, grads) = grads_of(f, &ins, &g);
    let e = norm_rel(&out, &out_t);
    assert!(e <= 1e-5, "{case}: output error {e:.2e}");
    for i in grad_names {
        let e = norm_rel(&grads[i], &get(format!("{case}.grad.{}", names[i])));
        assert!(e <= 1e-4, "{case}: gradient of {} error {e:.2e}", names[i]);
    }
}

#[test]
fn golden_conv2d() {
    let fx = fixtures();
    for (case, stride, pad) in
        [("conv3x3_s1", 1, 1), ("conv3x3_s2", 2, 1), ("conv3x3_s2_odd", 2, 1), ("conv1x1", 1, 0)]
    {
        check(&fx, case, &["x", "w", "b"], |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad));
    }
}

#[test]
fn golden_linear() {
    check(&fixtures(), "linear", &["x", "w", "b"], |t| ops::linear(&t[0], &t[1], Some(&t[2])));
}

#[test]
fn golden_norms_and_softmax() {
    let fx = fixtures();
    let gb = ["x", "gamma", "beta"];
    check(&fx, "group_norm", &gb, |t| ops::group_norm(&t[0], 4, &t[1], &t[2], 1e-5));
    check(&fx, "group_norm_silu", &gb, |t| ops::group_norm_silu(&t[0], 4, &t[1], &t[2], 1e-6));
    check(&fx, "layer_norm", &gb, |t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5));
    check(&fx, "softmax", &["x"], |t| ops::softmax_last_dim(&t[0]));
}

#[test]
fn golden_attention() {
    let fx = fixtures();
    for (case, causal) in [
        ("attention", false),
        ("attention_causal", true),
        ("attention_cross", false),
        ("attention_long", false),
        ("attention_long_causal", true),
    ] {
        check(&fx, case, &["q", "k", "v"], |t| ops::attention(&t[0], &t[1], &t[2], causal));
    }
}

#[test]
fn golden_activations() {
    let fx = fixtures();
    check(&fx, "gelu_erf", &["x"], |t| ops::gelu_erf(&t[0]));
    check(&fx, "quick_gelu", &["x"], |t| ops::quick_gelu(&t[0]));
    check(&fx, "silu", &["x"], |t| ops::silu(&t[0]));
    check(&fx, "geglu", &["x"], |t| ops::geglu(&t[0]));
}

#[test]
fn golden_embedding_upsample_timestep() {
    let fx = fixtures();
    let ids = fx["embedding.in.ids"].to_dtype(DType::U32).unwrap();
    check(&fx, "embedding", &["table"], |t| ops::embedding(&ids, &t[0]));
    check(&fx, "upsample", &["x"], |t| ops::upsample_nearest2x(&t[0]));
    check(&fx, "timestep_sd", &["t"], |t| ops::timestep_embedding(&t[0], 32, true, 0.0));
    check(&fx, "timestep_odd", &["t"], |t| ops::timestep_embedding(&t[0], 31, false, 1.0));
}

/// The candle-composed reference ops are what CUDA/Metal devices run; they must meet the same
/// bar (this is the CPU run of exactly that code path).
#[test]
fn golden_reference_fallbacks() {
    use ops::reference as r;
    let fx = fixtures();
    for (case, stride, pad) in
        [("conv3x3_s1", 1, 1), ("conv3x3_s2", 2, 1), ("conv3x3_s2_odd", 2, 1), ("conv1x1", 1, 0)]
    {
        check(&fx, case, &["x", "w", "b"], |t| r::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad));
    }
    let gb = ["x", "gamma", "beta"];
    check(&fx, "group_norm", &gb, |t| r::group_norm(&t[0], 4, &t[1], &t[2], 1e-5));
    check(&fx, "group_norm_silu", &gb, |t| r::group_norm_silu(&t[0], 4, &t[1], &t[2], 1e-6));
    check(&fx, "layer_norm", &gb, |t| r::layer_norm(&t[0], &t[1], &t[2], 1e-5));
    check(&fx, "softmax", &["x"], |t| r::softmax_last_dim(&t[0]));
    for (case, causal) in [("attention", false), ("attention_causal", true), ("attention_cross", false)] {
        check(&fx, case, &["q", "k", "v"], |t| r::attention(&t[0], &t[1], &t[2], causal));
    }
}
