//! Finite-difference gradient tests for every op and every float operand (f32, directional
//! central differences; see `common::check_grads`), plus per-element comparison of the custom
//! CPU kernels against the candle-composed reference ops evaluated in f64.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{check_grads, grads_of, norm_rel, Rng};
use sdbooth_ops as ops;

const EPS: f64 = 1e-2;
const TOL: f64 = 5e-3;

#[test]
fn fd_conv2d_3x3_stride1() {
    let mut r = Rng::new(1);
    let ins = [r.randn(&[2, 3, 6, 5]), r.randn(&[4, 3, 3, 3]), r.randn(&[4])];
    check_grads("conv3x3_s1", |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), 1, 1), &ins, EPS, TOL);
}

#[test]
fn fd_conv2d_3x3_stride2() {
    let mut r = Rng::new(2);
    let ins = [r.randn(&[2, 3, 7, 6]), r.randn(&[4, 3, 3, 3]), r.randn(&[4])];
    check_grads("conv3x3_s2", |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), 2, 1), &ins, EPS, TOL);
}

#[test]
fn fd_conv2d_1x1() {
    let mut r = Rng::new(3);
    let ins = [r.randn(&[2, 5, 4, 4]), r.randn(&[3, 5, 1, 1])];
    check_grads("conv1x1", |t| ops::conv2d(&t[0], &t[1], None, 1, 0), &ins, EPS, TOL);
}

#[test]
fn fd_linear() {
    let mut r = Rng::new(4);
    let ins = [r.randn(&[2, 3, 6]), r.randn(&[5, 6]), r.randn(&[5])];
    check_grads("linear", |t| ops::linear(&t[0], &t[1], Some(&t[2])), &ins, EPS, TOL);
}

#[test]
fn fd_group_norm_and_silu() {
    let mut r = Rng::new(5);
    let ins = [r.randn(&[2, 6, 3, 4]), r.randn(&[6]), r.randn(&[6])];
    check_grads("group_norm", |t| ops::group_norm(&t[0], 3, &t[1], &t[2], 1e-5), &ins, EPS, TOL);
    check_grads("group_norm_silu", |t| ops::group_norm_silu(&t[0], 3, &t[1], &t[2], 1e-6), &ins, EPS, TOL);
}

#[test]
fn fd_layer_norm() {
    let mut r = Rng::new(6);
    // 70 rows: more than two of the kernel's 32-row parameter-gradient chunks.
    let ins = [r.randn(&[2, 35, 12]), r.randn(&[12]), r.randn(&[12])];
    check_grads("layer_norm", |t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5), &ins, EPS, TOL);
}

#[test]
fn fd_softmax() {
    let mut r = Rng::new(7);
    check_grads("softmax", |t| ops::softmax_last_dim(&t[0]), &[r.randn(&[3, 4, 9])], EPS, TOL);
}

#[test]
fn fd_attention_self_cross_causal() {
    let mut r = Rng::new(8);
    let s = [r.randn(&[1, 2, 9, 4]), r.randn(&[1, 2, 9, 4]), r.randn(&[1, 2, 9, 4])];
    check_grads("attention", |t| ops::attention(&t[0], &t[1], &t[2], false), &s, EPS, TOL);
    check_grads("attention_causal", |t| ops::attention(&t[0], &t[1], &t[2], true), &s, EPS, TOL);
    let c = [r.randn(&[2, 1, 7, 4]), r.randn(&[2, 1, 5, 4]), r.randn(&[2, 1, 5, 4])];
    check_grads("attention_cross", |t| ops::attention(&t[0], &t[1], &t[2], false), &c, EPS, TOL);
}

#[test]
fn fd_activations() {
    let mut r = Rng::new(9);
    let x = [r.randn(&[3, 10])];
    check_grads("gelu_erf", |t| ops::gelu_erf(&t[0]), &x, EPS, TOL);
    check_grads("quick_gelu", |t| ops::quick_gelu(&t[0]), &x, EPS, TOL);
    check_grads("silu", |t| ops::silu(&t[0]), &x, EPS, TOL);
    check_grads("geglu", |t| ops::geglu(&t[0]), &[r.randn(&[2, 3, 8])], EPS, TOL);
}

#[test]
fn fd_embedding_and_upsample() {
    let mut r = Rng::new(10);
    let ids = Tensor::new(&[[0u32, 4, 2], [4, 4, 1]], &Device::Cpu).unwrap();
    check_grads("embedding", |t| ops::embedding(&ids, &t[0]), &[r.randn(&[5, 3])], EPS, TOL);
    check_grads("upsample", |t| ops::upsample_nearest2x(&t[0]), &[r.randn(&[1, 2, 3, 4])], EPS, TOL);
}

/// Per-element check of the custom CPU kernels against the reference ops run in f64: outputs
/// and every gradient, at shapes that cross the kernels' tile and chunk boundaries (attention:
/// 64-row query tiles, 256-row key tiles).
#[test]
fn custom_kernels_match_f64_reference() {
    type Op = Box<dyn Fn(&[Tensor], bool) -> candle_core::Result<Tensor>>;
    let mut r = Rng::new(11);
    let cases: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "conv3x3_s1",
            Box::new(|t, custom| {
                let f = if custom { ops::conv2d } else { ops::reference::conv2d };
                f(&t[0], &t[1], Some(&t[2]), 1, 1)
            }),
            vec![r.randn(&[2, 5, 9, 7]), r.randn(&[6, 5, 3, 3]), r.randn(&[6])],
        ),
        (
            "conv3x3_s2",
            Box::new(|t, custom| {
                let f = if custom { ops::conv2d } else { ops::reference::conv2d };
                f(&t[0], &t[1], None, 2, 1)
            }),
            vec![r.randn(&[1, 4, 9, 10]), r.randn(&[3, 4, 3, 3])],
        ),
        (
            "conv1x1",
            Box::new(|t, custom| {
                let f = if custom { ops::conv2d } else { ops::reference::conv2d };
                f(&t[0], &t[1], None, 1, 0)
            }),
            vec![r.randn(&[2, 8, 3, 5]), r.randn(&[4, 8, 1, 1])],
        ),
        (
            // 150 rows: more than two of the bias-gradient's 64-row chunks.
            "linear_bias",
            Box::new(|t, custom| {
                let f = if custom { ops::linear } else { ops::reference::linear };
                f(&t[0], &t[1], Some(&t[2]))
            }),
            vec![r.randn(&[2, 75, 12]), r.randn(&[9, 12]), r.randn(&[9])],
        ),
        (
            "linear_2d_no_bias",
            Box::new(|t, custom| {
                let f = if custom { ops::linear } else { ops::reference::linear };
                f(&t[0], &t[1], None)
            }),
            vec![r.randn(&[7, 12]), r.randn(&[5, 12])],
        ),
        (
            "group_norm_silu",
            Box::new(|t, custom| {
                let f = if custom { ops::group_norm_silu } else { ops::reference::group_norm_silu };
                f(&t[0], 4, &t[1], &t[2], 1e-6)
            }),
            vec![(r.randn(&[2, 8, 5, 3]) * 3.0).unwrap(), r.randn(&[8]), r.randn(&[8])],
        ),
        (
            "layer_norm",
            Box::new(|t, custom| {
                let f = if custom { ops::layer_norm } else { ops::reference::layer_norm };
                f(&t[0], &t[1], &t[2], 1e-5)
            }),
            vec![r.randn(&[3, 33, 20]), r.randn(&[20]), r.randn(&[20])],
        ),
        (
            "softmax",
            Box::new(|t, custom| {
                let f = if custom { ops::softmax_last_dim } else { ops::reference::softmax_last_dim };
                f(&(&t[0] * 3.0)?)
            }),
            vec![r.randn(&[4, 5, 31])],
        ),
        (
            "attention_tiles",
            Box::new(|t, custom| {
                let f = if custom { ops::attention } else { ops::reference::attention };
                f(&t[0], &t[1], &t[2], false)
            }),
            vec![r.randn(&[1, 3, 200, 8]), r.randn(&[1, 3, 300, 8]), r.randn(&[1, 3, 300, 8])],
        ),
        (
            "attention_tiles_causal",
            Box::new(|t, custom| {
                let f = if custom { ops::attention } else { ops::reference::attention };
                f(&t[0], &t[1], &t[2], true)
            }),
            vec![r.randn(&[2, 2, 300, 8]), r.randn(&[2, 2, 300, 8]), r.randn(&[2, 2, 300, 8])],
        ),
    ];
    for (name, f, ins) in cases {
        let ins64: Vec<Tensor> = ins.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        let g = r.randn(f(&ins64, false).unwrap().dims());
        let (out_ref, gr_ref) = grads_of(|t| f(t, false), &ins64, &g.to_dtype(DType::F64).unwrap());
        let (out, gr) = grads_of(|t| f(t, true), &ins, &g);
        let e = norm_rel(&out, &out_ref);
        assert!(e <= 1e-6, "{name}: output error {e:.2e}");
        for (i, (a, b)) in gr.iter().zip(&gr_ref).enumerate() {
            let e = norm_rel(a, b);
            assert!(e <= 1e-5, "{name}: gradient {i} error {e:.2e}");
        }
    }
}

/// An untracked operand (frozen weight / frozen input) gets no gradient while the tracked one
/// still gets the right one.
#[test]
fn untracked_operands_get_no_gradient() {
    let mut r = Rng::new(12);
    let x = r.randn(&[1, 3, 5, 5]);
    let w = candle_core::Var::from_tensor(&r.randn(&[2, 3, 3, 3])).unwrap();
    let y = ops::conv2d(&x, w.as_tensor(), None, 1, 1).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    let dw = grads.get(w.as_tensor()).expect("weight gradient");
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let y2 = ops::reference::conv2d(xv.as_tensor(), w.as_tensor(), None, 1, 1).unwrap();
    let g2 = y2.sum_all().unwrap().backward().unwrap();
    assert!(norm_rel(dw, g2.get(w.as_tensor()).unwrap()) < 1e-5);

    // Frozen linear weight and bias, tracked input: only the input gets a gradient.
    let xv = candle_core::Var::from_tensor(&r.randn(&[2, 3, 4])).unwrap();
    let (lw, lb) = (r.randn(&[5, 4]), r.randn(&[5]));
    let y = ops::linear(xv.as_tensor(), &lw, Some(&lb)).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(xv.as_tensor()).is_some() && grads.get(&lw).is_none() && grads.get(&lb).is_none());

    let q = candle_core::Var::from_tensor(&r.randn(&[1, 2, 6, 4])).unwrap();
    let kv = r.randn(&[1, 2, 6, 4]);
    let o = ops::attention(q.as_tensor(), &kv, &kv, false).unwrap();
    let grads = o.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(q.as_tensor()).is_some() && grads.get(&kv).is_none());
}

/// Every backward op for every subset of tracked operands (one tracked, all but one tracked):
/// the tracked operands' gradients match the f64 reference and the untracked get none. This
/// covers the kernels' partial paths (e.g. a norm's parameter gradients without dx, attention's
/// dk without dq, a conv's bias gradient alone).
#[test]
fn partial_gradients_match_reference() {
    type Op = Box<dyn Fn(&[Tensor], bool) -> candle_core::Result<Tensor>>;
    let mut r = Rng::new(13);
    let cases: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "conv3x3_bias",
            Box::new(|t, custom| {
                let f = if custom { ops::conv2d } else { ops::reference::conv2d };
                f(&t[0], &t[1], Some(&t[2]), 1, 1)
            }),
            vec![r.randn(&[2, 3, 6, 5]), r.randn(&[4, 3, 3, 3]), r.randn(&[4])],
        ),
        (
            "linear_bias",
            Box::new(|t, custom| {
                let f = if custom { ops::linear } else { ops::reference::linear };
                f(&t[0], &t[1], Some(&t[2]))
            }),
            vec![r.randn(&[2, 70, 6]), r.randn(&[5, 6]), r.randn(&[5])],
        ),
        (
            "group_norm",
            Box::new(|t, custom| {
                let f = if custom { ops::group_norm } else { ops::reference::group_norm };
                f(&t[0], 3, &t[1], &t[2], 1e-5)
            }),
            vec![r.randn(&[2, 6, 3, 4]), r.randn(&[6]), r.randn(&[6])],
        ),
        (
            "group_norm_silu",
            Box::new(|t, custom| {
                let f = if custom { ops::group_norm_silu } else { ops::reference::group_norm_silu };
                f(&t[0], 3, &t[1], &t[2], 1e-6)
            }),
            vec![r.randn(&[2, 6, 3, 4]), r.randn(&[6]), r.randn(&[6])],
        ),
        (
            "layer_norm",
            Box::new(|t, custom| {
                let f = if custom { ops::layer_norm } else { ops::reference::layer_norm };
                f(&t[0], &t[1], &t[2], 1e-5)
            }),
            vec![r.randn(&[2, 35, 12]), r.randn(&[12]), r.randn(&[12])],
        ),
        (
            "attention_cross",
            Box::new(|t, custom| {
                let f = if custom { ops::attention } else { ops::reference::attention };
                f(&t[0], &t[1], &t[2], false)
            }),
            vec![r.randn(&[2, 1, 70, 4]), r.randn(&[2, 1, 9, 4]), r.randn(&[2, 1, 9, 4])],
        ),
    ];
    for (name, f, ins) in cases {
        let n = ins.len();
        let masks = (0..n).flat_map(|i| {
            let one: Vec<bool> = (0..n).map(|j| j == i).collect();
            let all_but_one: Vec<bool> = (0..n).map(|j| j != i).collect();
            [one, all_but_one]
        });
        for tracked in masks {
            let run = |inputs: &[Tensor], custom: bool, g: &Tensor| {
                let vars: Vec<Option<candle_core::Var>> = inputs
                    .iter()
                    .zip(&tracked)
                    .map(|(t, &on)| on.then(|| candle_core::Var::from_tensor(t).unwrap()))
                    .collect();
                let xs: Vec<Tensor> = vars
                    .iter()
                    .zip(inputs)
                    .map(|(v, t)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()))
                    .collect();
                let out = f(&xs, custom).unwrap();
                let grads = (&out * &g.to_dtype(out.dtype()).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                xs.iter().map(|x| grads.get(x).cloned()).collect::<Vec<_>>()
            };
            let ins64: Vec<Tensor> = ins.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
            let g = r.randn(f(&ins, true).unwrap().dims());
            let custom = run(&ins, true, &g);
            let reference = run(&ins64, false, &g);
            for (i, ((c, rf), &on)) in custom.iter().zip(&reference).zip(&tracked).enumerate() {
                match (c, rf, on) {
                    (Some(c), Some(rf), true) => {
                        let e = norm_rel(c, rf);
                        assert!(e <= 1e-5, "{name} tracked {tracked:?}: gradient {i} error {e:.2e}");
                    }
                    // candle's autograd may hand out gradients of untracked operands too; the
                    // custom kernels must not compute them.
                    (None, _, false) => {}
                    _ => panic!("{name} tracked {tracked:?}: operand {i} gradient presence is wrong"),
                }
            }
        }
    }
}
