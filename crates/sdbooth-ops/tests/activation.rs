//! The activation kernels (GELU, GEGLU, QuickGELU) against candle's own arithmetic: forward and
//! gradient bit for bit equal to the reference composition of candle primitives (which is what
//! the CPU computed before the kernels existed), at sizes spanning several kernel chunks, on
//! values that include zeros of both signs, tiny, huge and non-finite inputs.

mod common;

use candle_core::{Device, Tensor};
use common::Rng;
use sdbooth_ops as ops;

type Op = fn(&Tensor) -> candle_core::Result<Tensor>;

/// Normal samples with special values mixed in (every 97th element).
fn values(r: &mut Rng, shape: &[usize]) -> Tensor {
    let special = [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e6, -1e6, f32::INFINITY, f32::NEG_INFINITY];
    let n = shape.iter().product();
    let mut v = r.normal_vec(n);
    for (i, x) in v.iter_mut().enumerate().step_by(97) {
        *x = special[(i / 97) % special.len()];
    }
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Output and input gradient of `f` for the output gradient `g`, seeded as the tape seeds.
fn run(f: Op, x: &Tensor, g: &Tensor) -> (Vec<u32>, Vec<u32>) {
    let var = candle_core::Var::from_tensor(x).unwrap();
    let out = f(var.as_tensor()).unwrap();
    let grads = ops::backward_from(&out, g).unwrap();
    (bits(&out), bits(grads.get(var.as_tensor()).unwrap()))
}

#[test]
fn kernels_are_bit_identical_to_candles_composition() {
    let mut r = Rng::new(61);
    let cases: [(&str, Op, Op, Vec<usize>); 4] = [
        ("gelu_erf", ops::gelu_erf, ops::reference::gelu_erf, vec![3, 70, 130]),
        ("quick_gelu", ops::quick_gelu, ops::reference::quick_gelu, vec![2, 77, 300]),
        ("geglu", ops::geglu, ops::reference::geglu, vec![2, 150, 2 * 96]),
        // A row wider than a chunk.
        ("geglu_wide", ops::geglu, ops::reference::geglu, vec![3, 2 * 20000]),
    ];
    for (name, kernel, reference, shape) in cases {
        let x = values(&mut r, &shape);
        let y_shape = reference(&x).unwrap().dims().to_vec();
        let g = values(&mut r, &y_shape);
        let (y_k, dx_k) = run(kernel, &x, &g);
        let (y_r, dx_r) = run(reference, &x, &g);
        assert_eq!(y_k.len(), y_r.len(), "{name}: output size");
        assert!(y_k == y_r, "{name}: forward differs from candle's");
        assert!(dx_k == dx_r, "{name}: gradient differs from candle's");
    }
}

/// The seeded backward gives what the old `(y · g).sum_all()` seeding gave, bit for bit.
#[test]
fn backward_from_equals_sum_of_products_seeding() {
    let mut r = Rng::new(62);
    let x = values(&mut r, &[4, 33, 64]);
    let g = values(&mut r, &[4, 33, 32]);
    let var = candle_core::Var::from_tensor(&x).unwrap();
    // A graph of candle primitives and custom ops, with an input read twice.
    let f = |t: &Tensor| ops::geglu(&(ops::softmax_last_dim(t)? * t)?);
    let old = (f(var.as_tensor()).unwrap() * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let new = ops::backward_from(&f(var.as_tensor()).unwrap(), &g).unwrap();
    assert!(bits(old.get(var.as_tensor()).unwrap()) == bits(new.get(var.as_tensor()).unwrap()));
}

#[test]
fn backward_from_refuses_a_mismatched_gradient() {
    let x =
        candle_core::Var::from_tensor(&Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    let y = (x.as_tensor() * 2.0).unwrap();
    let err = ops::backward_from(&y, &Tensor::ones((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}
