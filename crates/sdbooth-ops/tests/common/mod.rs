//! Helpers shared by the sdbooth-ops integration tests: a seeded normal generator, the
//! norm-relative error, and the directional finite-difference check.
#![allow(dead_code)]

use candle_core::{DType, Result, Tensor, Var};

/// Deterministic normal samples: the selftest's generator.
pub struct Rng(sdbooth_ops::selftest::SplitMix);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(sdbooth_ops::selftest::SplitMix::new(seed))
    }
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        self.0.normal_vec(n)
    }
    pub fn randn(&mut self, shape: &[usize]) -> Tensor {
        self.0.normal(shape).expect("shape matches data")
    }
}

/// ‖a − b‖ / ‖b‖ in f64 (b is the reference).
pub fn norm_rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

pub fn dot64(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    (a * b).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Loss `Σ out·g`, evaluated in f64 so the finite difference is not swamped by f32 summation.
fn loss64(out: &Tensor, g: &Tensor) -> f64 {
    dot64(out, g)
}

/// Directional finite-difference check of every float operand of `f` (evaluated in f32).
///
/// For operand i with analytic gradient G (from candle's backward of `Σ f(x)·g`) and a direction
/// v (once the gradient's own direction, once random), the central difference
/// `(L(x + εv) − L(x − εv)) / 2ε` must equal `⟨G, v⟩` within `tol · (|⟨G, v⟩| + ‖G‖‖v‖/√n)`.
/// The second term keeps a random direction (whose true derivative can be near zero) from
/// demanding more than f32 can give.
pub fn check_grads<F>(name: &str, f: F, inputs: &[Tensor], eps: f64, tol: f64)
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    let mut rng = Rng::new(0xFD ^ name.len() as u64);
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs).unwrap();
    let g = rng.randn(out.dims()).to_dtype(out.dtype()).unwrap();
    let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, x) in xs.iter().enumerate() {
        let grad = grads.get(x).unwrap_or_else(|| panic!("{name}: no gradient for operand {i}")).clone();
        assert_eq!(grad.dims(), x.dims(), "{name}: gradient shape of operand {i}");
        let n = x.elem_count() as f64;
        let gnorm = dot64(&grad, &grad).sqrt();
        let random = rng.randn(x.dims());
        let along = (&grad / gnorm.max(1e-30)).unwrap();
        for (dname, v) in [("gradient", along), ("random", random)] {
            let analytic = dot64(&grad, &v);
            let eval = |sign: f64| {
                let mut shifted: Vec<Tensor> = inputs.to_vec();
                shifted[i] = (&inputs[i] + (&v * (sign * eps)).unwrap()).unwrap();
                loss64(&f(&shifted).unwrap(), &g)
            };
            let numeric = (eval(1.0) - eval(-1.0)) / (2.0 * eps);
            let vnorm = dot64(&v, &v).sqrt();
            let bound = tol * (analytic.abs() + gnorm * vnorm / n.sqrt());
            assert!(
                (analytic - numeric).abs() <= bound,
                "{name}: operand {i}, {dname} direction: analytic {analytic:.6e} vs numeric {numeric:.6e} \
                 (bound {bound:.2e})"
            );
        }
    }
}

/// Gradients of `Σ f(x)·g` for every operand (all operands tracked).
pub fn grads_of<F>(f: F, inputs: &[Tensor], g: &Tensor) -> (Tensor, Vec<Tensor>)
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&xs).unwrap();
    let loss = (&out * &g.to_dtype(out.dtype()).unwrap()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let gs = xs.iter().map(|x| grads.get(x).expect("gradient present").clone()).collect();
    (out, gs)
}
