//! bf16 / f16 operands: kernels widen to f32, accumulate in f32 and round once on output.
//!
//! Stated bound: against the f32 computation on the same (already rounded) inputs, outputs and
//! gradients are within norm-relative 8e-3 for bf16 (≈ two bf16 roundings: 2 × 2⁻⁸ at worst,
//! ~2.3e-3 RMS) and 1e-3 for f16.

mod common;

use candle_core::{DType, Tensor};
use common::{grads_of, norm_rel, Rng};
use sdbooth_ops as ops;

type Op = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

#[test]
fn half_precision_within_stated_bounds() {
    let mut r = Rng::new(31);
    let cases: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "conv3x3_bias",
            Box::new(|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), 1, 1)),
            vec![r.randn(&[1, 16, 8, 8]), (r.randn(&[8, 16, 3, 3]) * 0.1).unwrap(), r.randn(&[8])],
        ),
        (
            "conv3x3_s2",
            Box::new(|t| ops::conv2d(&t[0], &t[1], None, 2, 1)),
            vec![r.randn(&[1, 8, 8, 8]), (r.randn(&[8, 8, 3, 3]) * 0.1).unwrap()],
        ),
        (
            "linear_bias",
            Box::new(|t| ops::linear(&t[0], &t[1], Some(&t[2]))),
            vec![r.randn(&[2, 9, 32]), (r.randn(&[12, 32]) * 0.1).unwrap(), r.randn(&[12])],
        ),
        (
            "attention",
            Box::new(|t| ops::attention(&t[0], &t[1], &t[2], false)),
            vec![r.randn(&[1, 2, 70, 16]), r.randn(&[1, 2, 70, 16]), r.randn(&[1, 2, 70, 16])],
        ),
        (
            "group_norm_silu",
            Box::new(|t| ops::group_norm_silu(&t[0], 4, &t[1], &t[2], 1e-5)),
            vec![r.randn(&[1, 8, 6, 6]), r.randn(&[8]), r.randn(&[8])],
        ),
        (
            "layer_norm",
            Box::new(|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            vec![r.randn(&[2, 7, 32]), r.randn(&[32]), r.randn(&[32])],
        ),
        ("softmax", Box::new(|t| ops::softmax_last_dim(&t[0])), vec![r.randn(&[4, 50])]),
    ];
    for (dtype, bound) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for (name, f, ins) in &cases {
            let low: Vec<Tensor> = ins.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
            let same_f32: Vec<Tensor> = low.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
            let g = r.randn(f(&same_f32).unwrap().dims()).to_dtype(dtype).unwrap();
            let (out_ref, gr_ref) = grads_of(f, &same_f32, &g.to_dtype(DType::F32).unwrap());
            let (out, gr) = grads_of(f, &low, &g);
            assert_eq!(out.dtype(), dtype, "{name}: output keeps the input dtype");
            let e = norm_rel(&out, &out_ref);
            assert!(e <= bound, "{name} {dtype:?}: output error {e:.2e} > {bound:e}");
            for (i, (a, b)) in gr.iter().zip(&gr_ref).enumerate() {
                assert_eq!(a.dtype(), dtype, "{name}: gradient {i} keeps the operand dtype");
                let e = norm_rel(a, b);
                assert!(e <= bound, "{name} {dtype:?}: gradient {i} error {e:.2e} > {bound:e}");
            }
        }
    }
}

/// The parallel f32 ↔ bf16 cast gives candle's `to_dtype` values exactly (round to nearest even),
/// over more elements than one conversion chunk, and its gradient comes back in the source dtype.
#[test]
fn cast_matches_candle_and_casts_the_gradient_back() {
    let mut r = Rng::new(5);
    let x = candle_core::Var::from_tensor(&(r.randn(&[3, 70_000]) * 3.0).unwrap()).unwrap();
    let low = ops::cast(x.as_tensor(), DType::BF16).unwrap();
    let want = x.as_tensor().to_dtype(DType::BF16).unwrap();
    assert_eq!(low.dtype(), DType::BF16);
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
    assert_eq!(bits(&low), bits(&want));
    let back = ops::cast(&low, DType::F32).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), want.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap());
    let g = r.randn(&[3, 70_000]).to_dtype(DType::BF16).unwrap();
    let grads = (low.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = grads.get(x.as_tensor()).unwrap();
    assert_eq!(dx.dtype(), DType::F32);
    assert_eq!(dx.to_vec2::<f32>().unwrap(), g.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap());
}
