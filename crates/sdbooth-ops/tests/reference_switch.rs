//! `SDBOOTH_REFERENCE_OPS=1` sends the CPU down the path a device without our kernels takes:
//! every public op then gives exactly (bit for bit) what its device-generic implementation gives
//! (`sdbooth_ops::generic` for conv2d and attention, the reference composition for the others),
//! forward and backward. The switch is read once per process, so this file holds one test and
//! sets it before any op runs.

mod common;

use candle_core::{Result, Tensor, Var};
use common::Rng;
use sdbooth_ops as ops;

type Op = Box<dyn Fn(&[Tensor], bool) -> Result<Tensor>>;

/// Output and gradients (of `Σ out·g`, every operand tracked), as f32 vectors.
fn run(f: &Op, inputs: &[Tensor], public: bool, g: &Tensor) -> Vec<Vec<f32>> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs, public).unwrap();
    let grads = (&out * g).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    std::iter::once(flat(&out)).chain(xs.iter().map(|x| flat(grads.get(x).unwrap()))).collect()
}

#[test]
fn reference_switch_makes_every_op_the_reference() {
    // Edition 2021: set_var is safe; no other thread runs yet in this one-test binary.
    std::env::set_var(ops::REFERENCE_OPS_ENV, "1");
    assert!(ops::reference_ops_forced());
    let mut r = Rng::new(51);
    let cases: Vec<(&str, Op, Vec<Tensor>)> = vec![
        (
            "conv2d",
            Box::new(|t, public| {
                let f = if public { ops::conv2d } else { ops::generic::conv2d };
                f(&t[0], &t[1], Some(&t[2]), 2, 1)
            }),
            vec![r.randn(&[2, 3, 7, 6]), r.randn(&[4, 3, 3, 3]), r.randn(&[4])],
        ),
        (
            "linear",
            Box::new(|t, public| {
                let f = if public { ops::linear } else { ops::reference::linear };
                f(&t[0], &t[1], Some(&t[2]))
            }),
            vec![r.randn(&[2, 3, 6]), r.randn(&[5, 6]), r.randn(&[5])],
        ),
        (
            "group_norm_silu",
            Box::new(|t, public| {
                let f = if public { ops::group_norm_silu } else { ops::reference::group_norm_silu };
                f(&t[0], 3, &t[1], &t[2], 1e-6)
            }),
            vec![r.randn(&[2, 6, 3, 4]), r.randn(&[6]), r.randn(&[6])],
        ),
        (
            "layer_norm",
            Box::new(|t, public| {
                let f = if public { ops::layer_norm } else { ops::reference::layer_norm };
                f(&t[0], &t[1], &t[2], 1e-5)
            }),
            vec![r.randn(&[2, 5, 12]), r.randn(&[12]), r.randn(&[12])],
        ),
        (
            "softmax",
            Box::new(|t, public| {
                let f = if public { ops::softmax_last_dim } else { ops::reference::softmax_last_dim };
                f(&t[0])
            }),
            vec![r.randn(&[3, 4, 9])],
        ),
        (
            "attention_causal",
            Box::new(|t, public| {
                let f = if public { ops::attention } else { ops::generic::attention };
                f(&t[0], &t[1], &t[2], true)
            }),
            vec![r.randn(&[1, 2, 9, 4]), r.randn(&[1, 2, 9, 4]), r.randn(&[1, 2, 9, 4])],
        ),
    ];
    for (name, f, ins) in &cases {
        let g = r.randn(f(ins, false).unwrap().dims());
        assert_eq!(
            run(f, ins, true, &g),
            run(f, ins, false, &g),
            "{name}: public op differs from the generic path"
        );
    }
}
