//! The device-generic attention (`sdbooth_ops::generic`, what CUDA runs): forward by blocks of
//! queries, backward recomputing by blocks. Checked against the naive reference composition in
//! f64, at block sizes that split the queries unevenly (one row, 7 rows, all rows, more than all),
//! for self, cross (N ≠ M, Dv ≠ D) and causal attention, in f32, f64 and bf16; and against the CPU
//! kernel. These run the generic code directly, so they hold with or without
//! `SDBOOTH_REFERENCE_OPS`.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{check_grads, grads_of, norm_rel, Rng};
use sdbooth_ops::{self as ops, generic};

/// (name, causal, q, k, v shapes)
type Case = (&'static str, bool, [usize; 4], [usize; 4], [usize; 4]);
const CASES: [Case; 4] = [
    ("self", false, [2, 3, 23, 8], [2, 3, 23, 8], [2, 3, 23, 8]),
    ("cross", false, [1, 2, 19, 8], [1, 2, 11, 8], [1, 2, 11, 5]),
    ("causal", true, [2, 2, 23, 4], [2, 2, 23, 4], [2, 2, 23, 4]),
    // CLIP's shape: 77 tokens, causal.
    ("clip_causal", true, [1, 2, 77, 16], [1, 2, 77, 16], [1, 2, 77, 16]),
];

fn inputs(r: &mut Rng, c: &Case) -> Vec<Tensor> {
    // Scaled so the softmax is far from uniform (the statistics matter).
    [c.2, c.3, c.4].iter().map(|s| (r.randn(s) * 2.0).unwrap()).collect()
}

fn f64s(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect()
}

#[test]
fn blocks_match_the_f64_reference_forward_and_gradients() {
    let mut r = Rng::new(71);
    for case in &CASES {
        let (name, causal) = (case.0, case.1);
        let ins = inputs(&mut r, case);
        let g = r.randn(&case.2[..3].iter().copied().chain([case.4[3]]).collect::<Vec<_>>());
        let reference = |t: &[Tensor]| ops::reference::attention(&t[0], &t[1], &t[2], causal);
        let (out_ref, grads_ref) = grads_of(reference, &f64s(&ins), &g.to_dtype(DType::F64).unwrap());
        for rows in [1, 7, case.2[2], case.2[2] + 5] {
            let blocks = |t: &[Tensor]| generic::attention_in_blocks(&t[0], &t[1], &t[2], causal, rows);
            // f32: the summation order differs from the reference only.
            let (out, grads) = grads_of(blocks, &ins, &g);
            let e = norm_rel(&out, &out_ref);
            assert!(e <= 1e-6, "{name}, {rows}-row blocks, f32: output error {e:.2e}");
            for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
                let e = norm_rel(a, b);
                assert!(e <= 1e-5, "{name}, {rows}-row blocks, f32: gradient {i} error {e:.2e}");
            }
            // f64: the same algorithm, so equal to rounding.
            let (out, grads) = grads_of(blocks, &f64s(&ins), &g.to_dtype(DType::F64).unwrap());
            let e = norm_rel(&out, &out_ref);
            assert!(e <= 1e-12, "{name}, {rows}-row blocks, f64: output error {e:.2e}");
            for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
                assert!(norm_rel(a, b) <= 1e-12, "{name}, {rows}-row blocks, f64 gradient {i}");
            }
        }
    }
}

/// bf16 operands: matrix products in bf16, softmax statistics in f32; within bf16's precision
/// of the exact result.
#[test]
fn bf16_blocks_stay_within_bf16_precision() {
    let mut r = Rng::new(72);
    for case in &CASES {
        let (name, causal) = (case.0, case.1);
        let ins = inputs(&mut r, case);
        let g = r.randn(&case.2[..3].iter().copied().chain([case.4[3]]).collect::<Vec<_>>());
        let ins_bf16: Vec<Tensor> = ins.iter().map(|t| t.to_dtype(DType::BF16).unwrap()).collect();
        // The exact result for the bf16-rounded inputs.
        let reference = |t: &[Tensor]| ops::reference::attention(&t[0], &t[1], &t[2], causal);
        let (out_ref, grads_ref) = grads_of(reference, &f64s(&ins_bf16), &g.to_dtype(DType::F64).unwrap());
        let blocks = |t: &[Tensor]| generic::attention_in_blocks(&t[0], &t[1], &t[2], causal, 7);
        let (out, grads) = grads_of(blocks, &ins_bf16, &g.to_dtype(DType::BF16).unwrap());
        assert_eq!(out.dtype(), DType::BF16);
        let e = norm_rel(&out, &out_ref);
        assert!(e <= 2e-2, "{name}, bf16: output error {e:.2e}");
        for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
            assert_eq!(a.dtype(), DType::BF16);
            let e = norm_rel(a, b);
            assert!(e <= 5e-2, "{name}, bf16: gradient {i} error {e:.2e}");
        }
    }
}

/// The generic path and the CPU kernel (the fast path's attention) agree in f32.
#[test]
fn blocks_match_the_cpu_kernel() {
    let mut r = Rng::new(73);
    for case in &CASES {
        let (name, causal) = (case.0, case.1);
        let ins = inputs(&mut r, case);
        let g = r.randn(&case.2[..3].iter().copied().chain([case.4[3]]).collect::<Vec<_>>());
        let kernel = |t: &[Tensor]| ops::attention(&t[0], &t[1], &t[2], causal);
        let (out_k, grads_k) = grads_of(kernel, &ins, &g);
        let (out, grads) = grads_of(|t| generic::attention(&t[0], &t[1], &t[2], causal), &ins, &g);
        assert!(norm_rel(&out, &out_k) <= 1e-6, "{name}: output differs from the CPU kernel");
        for (i, (a, b)) in grads.iter().zip(&grads_k).enumerate() {
            assert!(norm_rel(a, b) <= 1e-5, "{name}: gradient {i} differs from the CPU kernel");
        }
    }
}

/// Finite differences, independent of any other implementation.
#[test]
fn blocks_pass_finite_differences() {
    let mut r = Rng::new(74);
    let s = vec![r.randn(&[1, 2, 9, 4]), r.randn(&[1, 2, 9, 4]), r.randn(&[1, 2, 9, 4])];
    let c = vec![r.randn(&[1, 2, 9, 4]), r.randn(&[1, 2, 6, 4]), r.randn(&[1, 2, 6, 3])];
    let blocks = |causal| move |t: &[Tensor]| generic::attention_in_blocks(&t[0], &t[1], &t[2], causal, 4);
    check_grads("generic_attention", blocks(false), &s, 1e-2, 2e-2);
    check_grads("generic_attention_causal", blocks(true), &s, 1e-2, 2e-2);
    check_grads("generic_attention_cross", blocks(false), &c, 1e-2, 2e-2);
}

/// Only tracked operands get gradients; with none tracked the output is a plain tensor.
#[test]
fn untracked_operands_get_no_gradient() {
    let mut r = Rng::new(75);
    let (q, kv) = (r.randn(&[1, 2, 10, 4]), r.randn(&[1, 2, 6, 4]));
    let k = Var::from_tensor(&kv).unwrap();
    let o = generic::attention_in_blocks(&q, k.as_tensor(), &kv, false, 3).unwrap();
    let grads = o.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&q).is_none());
    let (_, want) = grads_of(
        |t| ops::reference::attention(&q, &t[0], &kv, false),
        std::slice::from_ref(&kv),
        &Tensor::ones(o.dims(), DType::F32, o.device()).unwrap(),
    );
    assert!(norm_rel(grads.get(k.as_tensor()).unwrap(), &want[0]) <= 1e-5);

    let plain = generic::attention_in_blocks(&q, &kv, &kv, false, 3).unwrap();
    assert!(!plain.track_op());
    assert!(norm_rel(&plain, &o.detach()) == 0.0);
}

#[test]
fn bad_operands_are_refused() {
    let mut r = Rng::new(76);
    let (q, k) = (r.randn(&[1, 2, 4, 4]), r.randn(&[1, 2, 5, 3]));
    let err = generic::attention(&q, &k, &k, false).unwrap_err().to_string();
    assert!(err.contains("incompatible shapes"), "{err}");
    let err = generic::attention_in_blocks(&q, &q, &q, false, 0).unwrap_err().to_string();
    assert!(err.contains("zero rows"), "{err}");
    let err = generic::attention(&q, &q.to_dtype(DType::F64).unwrap(), &q, false).unwrap_err().to_string();
    assert!(err.contains("dtypes differ"), "{err}");
}
