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

/// f32 → bf16 rounding (the cast, and the same function rounds f32 operands as the bf16 GEMM
/// packs them) is `half`'s bit for bit: every low half-word under a few high ones (all ties, the
/// carries into the exponent, the largest finite values), infinities, NaNs and subnormals.
#[test]
fn bf16_rounding_matches_half_on_edge_values() {
    let mut v: Vec<f32> = Vec::new();
    for hi in
        [0x0000u32, 0x0001, 0x3F80, 0x3FFF, 0x7F7F, 0x7F80, 0x7FC0, 0x8000, 0xBF81, 0xFF7F, 0xFF80, 0xFFFF]
    {
        v.extend((0..=0xFFFFu32).map(|lo| f32::from_bits((hi << 16) | lo)));
    }
    let t = Tensor::from_vec(v.clone(), v.len(), &candle_core::Device::Cpu).unwrap();
    let got: Vec<u16> = ops::cast(&t, DType::BF16)
        .unwrap()
        .to_vec1::<half::bf16>()
        .unwrap()
        .iter()
        .map(|b| b.to_bits())
        .collect();
    for (x, g) in v.iter().zip(&got) {
        assert_eq!(*g, half::bf16::from_f32(*x).to_bits(), "{:#010x}", x.to_bits());
    }
}

/// `--mixed_precision bf16` on the CPU: f32 activations with bf16 weights. linear and conv2d
/// round the f32 operand to bf16 (to nearest even) as they pack it and sum in f32, so they agree
/// with f32 ops on the rounded values up to the order of the sums; the output and the input
/// gradient stay f32, the weight gradient comes back in the weight's dtype (bf16).
#[test]
fn f32_activations_with_bf16_weights_round_the_activations_once() {
    let mut r = Rng::new(77);
    let cases: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "conv3x3_bias",
            Box::new(|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), 1, 1)),
            vec![r.randn(&[2, 16, 8, 8]), (r.randn(&[8, 16, 3, 3]) * 0.1).unwrap(), r.randn(&[8])],
        ),
        (
            "conv1x1",
            Box::new(|t| ops::conv2d(&t[0], &t[1], None, 1, 0)),
            vec![r.randn(&[1, 24, 5, 7]), (r.randn(&[8, 24, 1, 1]) * 0.1).unwrap()],
        ),
        (
            "linear_bias",
            Box::new(|t| ops::linear(&t[0], &t[1], Some(&t[2]))),
            vec![r.randn(&[2, 9, 33]), (r.randn(&[12, 33]) * 0.1).unwrap(), r.randn(&[12])],
        ),
    ];
    let rounded = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    for (name, f, ins) in &cases {
        // x f32 (not representable in bf16), w bf16, bias f32.
        let mut mixed = ins.clone();
        mixed[1] = ins[1].to_dtype(DType::BF16).unwrap();
        let mut same_f32 = ins.clone();
        same_f32[0] = rounded(&ins[0]);
        same_f32[1] = rounded(&ins[1]);
        // An output gradient already in bf16 values, so rounding it when packed changes nothing.
        let g = rounded(&r.randn(f(&same_f32).unwrap().dims()));
        let (out_ref, gr_ref) = grads_of(f, &same_f32, &g);
        let (out, gr) = grads_of(f, &mixed, &g);
        assert_eq!(out.dtype(), DType::F32, "{name}: output in the activations' dtype");
        let e = norm_rel(&out, &out_ref);
        assert!(e <= 1e-5, "{name}: output differs from f32 on rounded operands by {e:.2e}");
        assert_eq!(gr[0].dtype(), DType::F32, "{name}: input gradient in the input's dtype");
        let e = norm_rel(&gr[0], &gr_ref[0]);
        assert!(e <= 1e-5, "{name}: input gradient differs by {e:.2e}");
        assert_eq!(gr[1].dtype(), DType::BF16, "{name}: weight gradient in the weight's dtype");
        // One bf16 rounding of the result: at most 2⁻⁸ relative per element.
        let e = norm_rel(&gr[1].to_dtype(DType::F32).unwrap(), &gr_ref[1]);
        assert!(e <= 4e-3, "{name}: weight gradient differs by {e:.2e}");
    }
}

/// `Precision::Bf16` with f32 operands (`--mixed_precision bf16` on the CPU: f32 master weights
/// passed as stored): every product, the weight gradient's too, rounds its operands to bf16 as it
/// packs them and sums in f32, so all results equal f32 ops on the rounded operands up to the
/// order of the sums, and all come back in f32 (no bf16 tensor anywhere, no cast in the graph).
#[test]
fn bf16_precision_on_f32_operands_rounds_every_product_operand_once() {
    let mut r = Rng::new(78);
    let bf16 = ops::Precision::Bf16;
    let cases: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "conv3x3_stride2_bias",
            Box::new(move |t| ops::conv2d_with(&t[0], &t[1], Some(&t[2]), 2, 1, bf16)),
            vec![r.randn(&[2, 16, 9, 8]), (r.randn(&[8, 16, 3, 3]) * 0.1).unwrap(), r.randn(&[8])],
        ),
        (
            "conv1x1",
            Box::new(move |t| ops::conv2d_with(&t[0], &t[1], None, 1, 0, bf16)),
            vec![r.randn(&[1, 24, 5, 7]), (r.randn(&[8, 24, 1, 1]) * 0.1).unwrap()],
        ),
        (
            "linear_bias",
            Box::new(move |t| ops::linear_with(&t[0], &t[1], Some(&t[2]), bf16)),
            vec![r.randn(&[2, 9, 33]), (r.randn(&[12, 33]) * 0.1).unwrap(), r.randn(&[12])],
        ),
    ];
    let rounded = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    for (name, f, ins) in &cases {
        let mut same_f32 = ins.clone();
        same_f32[0] = rounded(&ins[0]);
        same_f32[1] = rounded(&ins[1]);
        // An output gradient already in bf16 values, so rounding it when packed changes nothing.
        let g = rounded(&r.randn(f(&same_f32).unwrap().dims()));
        let (out_ref, gr_ref) = grads_of(f, &same_f32, &g);
        let (out, gr) = grads_of(f, ins, &g);
        assert_eq!(out.dtype(), DType::F32, "{name}: output in f32");
        let e = norm_rel(&out, &out_ref);
        assert!(e <= 1e-5, "{name}: output differs from f32 on rounded operands by {e:.2e}");
        // The operands are not bf16 values, so matching the rounded run means they were rounded.
        assert!(norm_rel(&ins[0], &same_f32[0]) > 1e-4 && norm_rel(&ins[1], &same_f32[1]) > 1e-4);
        for (i, what) in ["input", "weight"].iter().enumerate() {
            assert_eq!(gr[i].dtype(), DType::F32, "{name}: {what} gradient in f32");
            let e = norm_rel(&gr[i], &gr_ref[i]);
            assert!(e <= 1e-5, "{name}: {what} gradient differs from f32 on rounded operands by {e:.2e}");
        }
    }
}
