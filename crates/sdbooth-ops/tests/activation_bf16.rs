//! GELU and GEGLU for bf16 compute (`gelu_erf_with` / `geglu_with` with `Precision::Bf16`: the
//! vectorised erfc): forward and gradient against GELU computed in f64 through libm's erfc, value by value,
//! on normal samples and a sweep over [−12, 12] (the tail where GELU tends to zero included), at
//! sizes spanning several kernel chunks; and the same bits with 1 and 3 threads.
//!
//! Stated bound, per element: `|ours − ref| ≤ 1e-5·|ref| + 1e-30` for the output and
//! `≤ 1e-5·(|ref| + |g|)` for the gradient (g: the output gradient element it comes from) (the erfc fit is good to 1.2e-7, its f32 evaluation
//! to about 1e-6; bf16 products round to 4e-3).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::Rng;
use sdbooth_ops::{self as ops, Precision};

type Op = fn(&Tensor) -> candle_core::Result<Tensor>;

fn fast_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    ops::gelu_erf_with(x, Precision::Bf16)
}

fn fast_geglu(x: &Tensor) -> candle_core::Result<Tensor> {
    ops::geglu_with(x, Precision::Bf16)
}

/// Normal samples (scaled ×3) with a sweep over [−12, 12] in the first 4801 values.
fn values(r: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = r.normal_vec(n).iter().map(|x| 3.0 * x).collect();
    for (i, x) in v.iter_mut().take(4801).enumerate() {
        *x = -12.0 + i as f32 * 0.005;
    }
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Output and input gradient of `f` for the output gradient `g`.
fn run(f: impl Fn(&Tensor) -> candle_core::Result<Tensor>, x: &Tensor, g: &Tensor) -> (Tensor, Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let out = f(var.as_tensor()).unwrap();
    let grads = ops::backward_from(&out, &g.to_dtype(out.dtype()).unwrap()).unwrap();
    let dx = grads.get(var.as_tensor()).unwrap().clone();
    (out, dx)
}

/// GELU in f64 through erfc (no cancellation in the negative tail, where candle's
/// `(1 + erf)` composition returns 0) and its derivative.
fn gelu64(x: f64) -> f64 {
    0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)
}

fn gelu64_derivative(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
        + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// (name, op, shape, GEGLU's half width or 0 for GELU)
fn cases() -> [(&'static str, Op, Vec<usize>, usize); 2] {
    [("gelu", fast_gelu, vec![3, 50_000], 0), ("geglu", fast_geglu, vec![2, 77, 2 * 1280], 1280)]
}

/// The f64 output and input gradient of the case for input `x` and output gradient `g`.
fn reference(half: usize, x: &[f64], g: &[f64]) -> (Vec<f64>, Vec<f64>) {
    if half == 0 {
        let out = x.iter().map(|&v| gelu64(v)).collect();
        let dx = x.iter().zip(g).map(|(&v, &d)| d * gelu64_derivative(v)).collect();
        return (out, dx);
    }
    let (mut out, mut dx) = (Vec::new(), vec![0f64; x.len()]);
    for (row, (xr, gr)) in x.chunks(2 * half).zip(g.chunks(half)).enumerate() {
        for i in 0..half {
            let (v, gate, d) = (xr[i], xr[half + i], gr[i]);
            out.push(v * gelu64(gate));
            dx[row * 2 * half + i] = d * gelu64(gate);
            dx[row * 2 * half + half + i] = d * v * gelu64_derivative(gate);
        }
    }
    (out, dx)
}

/// A case's input and a random output gradient (GEGLU, `half > 0`, halves the last dimension).
fn input_and_output_gradient(r: &mut Rng, shape: &[usize], half: usize) -> (Tensor, Tensor) {
    let x = values(r, shape);
    let mut out_shape = shape.to_vec();
    if half > 0 {
        *out_shape.last_mut().unwrap() = half;
    }
    (x, r.randn(&out_shape))
}

#[test]
fn fast_gelu_matches_the_f64_reference_within_the_stated_bound() {
    let mut r = Rng::new(5);
    for (name, fast, shape, half) in cases() {
        let (x, g) = input_and_output_gradient(&mut r, &shape, half);
        let (out, dx) = run(fast, &x, &g);
        assert_eq!((out.dtype(), dx.dtype()), (DType::F32, DType::F32), "{name}: f32 in, f32 out");
        let (out_ref, dx_ref) = reference(half, &vals(&x), &vals(&g));
        let mut worst = 0f64;
        for (i, (a, b)) in vals(&out).iter().zip(&out_ref).enumerate() {
            let err = (a - b).abs();
            worst = worst.max(err / (b.abs() + 1e-30));
            assert!(err <= 1e-5 * b.abs() + 1e-30, "{name}: output {i}: {a:e} vs {b:e}");
        }
        let gs = vals(&g);
        for (i, (a, b)) in vals(&dx).iter().zip(&dx_ref).enumerate() {
            // The output gradient element this input gradient element comes from.
            let d = if half == 0 { gs[i] } else { gs[(i / (2 * half)) * half + i % half] };
            let err = (a - b).abs();
            assert!(err <= 1e-5 * (b.abs() + d.abs()), "{name}: gradient {i}: {a:e} vs {b:e}");
        }
        println!("{name}: worst relative output error {worst:.2e}");
    }
}

#[test]
fn fast_gelu_is_bit_identical_across_thread_counts() {
    let mut r = Rng::new(6);
    for (name, fast, shape, half) in cases() {
        let (x, g) = input_and_output_gradient(&mut r, &shape, half);
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (out, dx) = run(fast, &x, &g);
                (bits(&out), bits(&dx))
            })
        };
        assert!(on(1) == on(3), "{name}: results differ between 1 and 3 threads");
    }
}
