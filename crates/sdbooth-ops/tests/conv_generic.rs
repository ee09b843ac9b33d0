//! The device-generic conv2d (`sdbooth_ops::generic`, what CUDA runs without our kernels):
//! candle's forward, the input gradient as a forward convolution of the dilated output gradient,
//! the weight gradient as im2col + GEMM. Checked against the reference composition in f64 (whose
//! backward is candle's autograd on an exact-fit input) at geometries covering stride 2 with and
//! without a remainder row, 1x1, no padding, a non-square kernel with stride 3 and padding 2, and
//! batches of one and more; in f32 and f64 (bf16: the weight gradient); against finite differences and the CPU kernel.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{check_grads, grads_of, norm_rel, Rng};
use sdbooth_ops::{self as ops, generic};

/// (name, x shape, w shape, stride, padding)
type Case = (&'static str, [usize; 4], [usize; 4], usize, usize);
const CASES: [Case; 7] = [
    ("3x3_s1", [2, 5, 9, 7], [6, 5, 3, 3], 1, 1),
    // SD's downsampler on an even size: (8 + 2 − 3) % 2 = 1, the last padded row is never read.
    ("3x3_s2_even", [1, 4, 8, 10], [3, 4, 3, 3], 2, 1),
    ("3x3_s2_odd", [2, 3, 9, 7], [4, 3, 3, 3], 2, 1),
    ("1x1", [2, 8, 3, 5], [4, 8, 1, 1], 1, 0),
    ("3x3_p0", [1, 3, 6, 6], [2, 3, 3, 3], 1, 0),
    ("5x3_s3_p2", [2, 3, 11, 8], [4, 3, 5, 3], 3, 2),
    ("1x1_s2", [1, 4, 7, 6], [3, 4, 1, 1], 2, 0),
];

fn inputs(r: &mut Rng, c: &Case) -> Vec<Tensor> {
    vec![r.randn(&c.1), r.randn(&c.2), r.randn(&[c.2[0]])]
}

fn f64s(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect()
}

fn out_shape(c: &Case) -> Vec<usize> {
    let (s, p) = (c.3, c.4);
    vec![c.1[0], c.2[0], (c.1[2] + 2 * p - c.2[2]) / s + 1, (c.1[3] + 2 * p - c.2[3]) / s + 1]
}

#[test]
fn generic_conv_matches_the_f64_reference() {
    let mut r = Rng::new(81);
    for case in &CASES {
        let (name, stride, pad) = (case.0, case.3, case.4);
        let ins = inputs(&mut r, case);
        let g = r.randn(&out_shape(case));
        let reference = |t: &[Tensor]| ops::reference::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad);
        let generic = |t: &[Tensor]| generic::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad);
        let (out_ref, grads_ref) = grads_of(reference, &f64s(&ins), &g.to_dtype(DType::F64).unwrap());
        let (out, grads) = grads_of(generic, &ins, &g);
        let e = norm_rel(&out, &out_ref);
        assert!(e <= 1e-6, "{name}, f32: output error {e:.2e}");
        for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
            assert_eq!(a.dims(), b.dims(), "{name}: gradient {i} shape");
            let e = norm_rel(a, b);
            assert!(e <= 1e-5, "{name}, f32: gradient {i} error {e:.2e}");
        }
        let (out, grads) = grads_of(generic, &f64s(&ins), &g.to_dtype(DType::F64).unwrap());
        assert!(norm_rel(&out, &out_ref) <= 1e-12, "{name}, f64 output");
        for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
            assert!(norm_rel(a, b) <= 1e-12, "{name}, f64 gradient {i}");
        }
    }
}

/// bf16: candle's CPU conv2d has no bf16 kernel (its CUDA one has), so here only the weight
/// gradient (im2col + GEMM, which the CPU runs in bf16) is checked in bf16; forward and input
/// gradient in bf16 are compared with the CPU by `sdbooth selftest --device cuda` on a GPU.
#[test]
fn generic_weight_gradient_bf16_stays_within_bf16_precision() {
    let mut r = Rng::new(82);
    for case in &CASES {
        let (name, stride, pad) = (case.0, case.3, case.4);
        let geom = ops::kernels::Conv2dGeom::new(&case.1, &case.2, stride, pad).unwrap();
        let (x, dy) = (r.randn(&case.1).to_dtype(DType::BF16).unwrap(), r.randn(&out_shape(case)));
        let dy = dy.to_dtype(DType::BF16).unwrap();
        let want = generic::conv2d_grad_weight(
            &geom,
            &x.to_dtype(DType::F64).unwrap(),
            &dy.to_dtype(DType::F64).unwrap(),
        )
        .unwrap();
        let got = generic::conv2d_grad_weight(&geom, &x, &dy).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let e = norm_rel(&got, &want);
        assert!(e <= 1e-2, "{name}, bf16: weight gradient error {e:.2e}");
    }
}

#[test]
fn generic_conv_matches_the_cpu_kernel() {
    let mut r = Rng::new(83);
    for case in &CASES {
        let (name, stride, pad) = (case.0, case.3, case.4);
        let ins = inputs(&mut r, case);
        let g = r.randn(&out_shape(case));
        let (out_k, grads_k) = grads_of(|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad), &ins, &g);
        let (out, grads) = grads_of(|t| generic::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad), &ins, &g);
        assert!(norm_rel(&out, &out_k) <= 1e-6, "{name}: output differs from the CPU kernel");
        for (i, (a, b)) in grads.iter().zip(&grads_k).enumerate() {
            assert!(norm_rel(a, b) <= 1e-5, "{name}: gradient {i} differs from the CPU kernel");
        }
    }
}

#[test]
fn generic_conv_passes_finite_differences() {
    let mut r = Rng::new(84);
    let s2 = vec![r.randn(&[1, 2, 6, 5]), r.randn(&[3, 2, 3, 3]), r.randn(&[3])];
    check_grads("generic_conv_s2", |t| generic::conv2d(&t[0], &t[1], Some(&t[2]), 2, 1), &s2, 1e-2, 1e-2);
    let s1 = vec![r.randn(&[2, 2, 5, 4]), r.randn(&[2, 2, 3, 3])];
    check_grads("generic_conv_s1", |t| generic::conv2d(&t[0], &t[1], None, 1, 1), &s1, 1e-2, 1e-2);
}

/// Only tracked operands get gradients (a frozen weight, a frozen input); with none tracked the
/// output is a plain tensor.
#[test]
fn untracked_operands_get_no_gradient() {
    let mut r = Rng::new(85);
    let (x, w) = (r.randn(&[1, 3, 6, 6]), r.randn(&[2, 3, 3, 3]));
    let wv = Var::from_tensor(&w).unwrap();
    let y = generic::conv2d(&x, wv.as_tensor(), None, 2, 1).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    assert!(grads.get(wv.as_tensor()).is_some());
    let xv = Var::from_tensor(&x).unwrap();
    let y = generic::conv2d(xv.as_tensor(), &w, None, 2, 1).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none());
    assert!(grads.get(xv.as_tensor()).is_some());
    assert!(!generic::conv2d(&x, &w, None, 2, 1).unwrap().track_op());
}

#[test]
fn bad_operands_are_refused() {
    let mut r = Rng::new(86);
    let (x, w) = (r.randn(&[1, 3, 6, 6]), r.randn(&[2, 4, 3, 3]));
    let err = generic::conv2d(&x, &w, None, 1, 1).unwrap_err().to_string();
    assert!(err.contains("channels"), "{err}");
    let w = r.randn(&[2, 3, 3, 3]);
    let err = generic::conv2d(&x, &w, Some(&r.randn(&[3])), 1, 1).unwrap_err().to_string();
    assert!(err.contains("bias"), "{err}");
    let err = generic::conv2d(&x, &w.to_dtype(DType::F64).unwrap(), None, 1, 1).unwrap_err().to_string();
    assert!(err.contains("dtype"), "{err}");
}
