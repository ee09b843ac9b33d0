//! The residual addition against candle's `+`: output and gradients bit for bit (the gradient
//! reaching an input through two paths is summed as before), on 1 and 3 threads, across chunk
//! boundaries; other dtypes and strided operands take candle's op.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{check_grads, Rng};
use sdbooth_ops as ops;

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// `y = (a + 2b) + a` and the gradients of `a` (two paths) and `b`.
fn run(add: &dyn Fn(&Tensor, &Tensor) -> Tensor, a: &Tensor, b: &Tensor, g: &Tensor) -> Vec<Vec<u32>> {
    let (va, vb) = (Var::from_tensor(a).unwrap(), Var::from_tensor(b).unwrap());
    let twice = (vb.as_tensor() * 2.0).unwrap();
    let y = add(&add(va.as_tensor(), &twice), va.as_tensor());
    let grads = ops::backward_from(&y, g).unwrap();
    vec![bits(&y), bits(grads.get(va.as_tensor()).unwrap()), bits(grads.get(vb.as_tensor()).unwrap())]
}

#[test]
fn residual_add_is_bit_identical_to_candles_add() {
    let mut r = Rng::new(81);
    let shape = [3, 77, 300]; // several 16384-element chunks and a partial one
    let (a, b, g) = (r.randn(&shape), r.randn(&shape), r.randn(&shape));
    let want = run(&|x, y| (x + y).unwrap(), &a, &b, &g);
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let got = pool.install(|| run(&|x, y| ops::add(x, y).unwrap(), &a, &b, &g));
        assert!(got == want, "{threads} threads: differs from candle's add");
    }
}

#[test]
fn residual_add_falls_back_for_other_operands() {
    let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let strided = ops::add(&a, &a.t().unwrap()).unwrap();
    assert_eq!(strided.to_vec2::<f32>().unwrap(), [[2.0, 5.0], [5.0, 8.0]]);
    let half = a.to_dtype(DType::BF16).unwrap();
    assert_eq!(ops::add(&half, &half).unwrap().dtype(), DType::BF16);
    assert!(ops::add(&a, &a.reshape(4).unwrap()).is_err(), "shapes differ");
}

#[test]
fn fd_residual_add() {
    let mut r = Rng::new(82);
    check_grads("add", |t| ops::add(&t[0], &t[1]), &[r.randn(&[2, 3, 5]), r.randn(&[2, 3, 5])], 1e-2, 5e-3);
}
