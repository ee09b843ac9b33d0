//! Every op's forward and backward on two paths, on the same random inputs, compared against
//! stated bounds: "does this device compute what the CPU computes?" (`sdbooth selftest`).
//!
//! - On a GPU: the ops on that device against the ops on the CPU (our CPU kernels).
//! - On the CPU alone: the reference path ([`crate::generic`] and [`crate::reference`], the code a
//!   device without kernels of its own runs) against the CPU kernels.
//!
//! Each case draws normal inputs on the CPU from a fixed seed, casts them to the dtype under test
//! and copies them to each path's device, so both paths see the same values. The loss is
//! `Σ op(x)·g` for a random `g`, so every gradient is checked, not only a sum. The error measure is
//! METHOD.md's norm-relative error `‖a − b‖ / ‖b‖` (b: the baseline), with the largest absolute
//! difference beside it; NaN or infinity never passes.

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::reference;

/// Which implementation of the ops a path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// The public ops (`sdbooth_ops::conv2d`, …): on the CPU our kernels, elsewhere the device's.
    Dispatched,
    /// The code a device without kernels of this crate runs, on any device: `sdbooth_ops::generic`
    /// where an op has it (conv2d, attention), else `sdbooth_ops::reference` (candle primitives).
    Reference,
}

/// One side of a comparison: an implementation on a device.
#[derive(Debug, Clone)]
pub struct Path {
    pub imp: Impl,
    pub device: Device,
}

impl Path {
    pub fn describe(&self) -> String {
        let dev = match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        match self.imp {
            // SDBOOTH_REFERENCE_OPS=1 sends the CPU's dispatched ops down the reference path too.
            Impl::Dispatched if self.device.is_cpu() && crate::reference_ops_forced() => {
                format!("ops on {dev} (SDBOOTH_REFERENCE_OPS: reference path)")
            }
            Impl::Dispatched => format!("ops on {dev}"),
            Impl::Reference => format!("reference ops on {dev}"),
        }
    }
}

/// The two paths `sdbooth selftest --device D` compares: D's ops against the CPU kernels, or on
/// the CPU the reference path against the CPU kernels.
pub fn paths_for(device: &Device) -> (Path, Path) {
    let baseline = Path { imp: Impl::Dispatched, device: Device::Cpu };
    let tested = if device.is_cpu() {
        Path { imp: Impl::Reference, device: Device::Cpu }
    } else {
        Path { imp: Impl::Dispatched, device: device.clone() }
    };
    (tested, baseline)
}

/// One compared tensor: an op's output or one operand's gradient, in one dtype.
#[derive(Debug, Clone)]
pub struct Row {
    pub op: &'static str,
    pub dtype: DType,
    /// "out", or "d<operand>" for a gradient.
    pub tensor: String,
    pub max_abs: f64,
    pub norm_rel: f64,
    pub bound: f64,
    /// Set when the path failed to run or the shapes differ (the row then fails).
    pub error: Option<String>,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.norm_rel.is_finite()
            && self.max_abs.is_finite()
            && self.norm_rel <= self.bound
    }
}

/// The result of a self-test run.
#[derive(Debug, Clone)]
pub struct Report {
    pub tested: String,
    pub baseline: String,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(Row::passed)
    }

    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.passed()).count()
    }

    /// A plain-text table, one line per compared tensor.
    pub fn table(&self) -> String {
        let mut s = format!("selftest: {} vs {} (norm-rel = ‖a−b‖/‖b‖)\n", self.tested, self.baseline);
        s += &format!(
            "{:<22} {:<5} {:<6} {:>10} {:>10} {:>9}  result\n",
            "op", "dtype", "tensor", "max abs", "norm-rel", "bound"
        );
        for r in &self.rows {
            let verdict = match &r.error {
                Some(e) => format!("FAIL: {e}"),
                None if r.passed() => "ok".into(),
                None => "FAIL".into(),
            };
            s += &format!(
                "{:<22} {:<5} {:<6} {:>10.3e} {:>10.3e} {:>9.1e}  {verdict}\n",
                r.op,
                r.dtype.as_str(),
                r.tensor,
                r.max_abs,
                r.norm_rel,
                r.bound
            );
        }
        s += &format!(
            "{} of {} compared tensors within bounds\n",
            self.rows.len() - self.failures(),
            self.rows.len()
        );
        s
    }
}

/// Norm-relative bound for a dtype: f32 leaves room for summation order only (a TF32 product,
/// ~3e-4, fails it); bf16/f16 for a few roundings of the operands and intermediates.
pub fn bound(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1e-2,
        DType::BF16 => 4e-2,
        _ => 1e-4,
    }
}

/// The dtypes a device computes in: f32, bf16 and f16 on a GPU; f32 and f16 on the CPU, where
/// the reference ops (candle primitives) have no bf16 matrix product to compare against (our CPU
/// kernels' bf16 products are checked against PyTorch by the bf16 goldens instead).
pub fn default_dtypes(device: &Device) -> Vec<DType> {
    if device.is_cpu() {
        vec![DType::F32, DType::F16]
    } else {
        vec![DType::F32, DType::BF16, DType::F16]
    }
}

/// Runs every case in every dtype on both paths.
pub fn run(tested: &Path, baseline: &Path, dtypes: &[DType]) -> Report {
    let mut rows = Vec::new();
    for &dtype in dtypes {
        for case in cases() {
            compare(&case, tested, baseline, dtype, &mut rows);
        }
    }
    Report { tested: tested.describe(), baseline: baseline.describe(), rows }
}

/// An input of a case.
#[derive(Clone, Copy)]
enum Input {
    /// Normal samples of this shape; gets a gradient.
    Normal(&'static [usize]),
    /// Uniform integers in `0..n`, u32, no gradient (token ids).
    Ids(&'static [usize], u32),
    /// Uniform in `0..1000` in the dtype under test, no gradient (timesteps).
    Timesteps(usize),
}

struct Case {
    name: &'static str,
    inputs: &'static [Input],
    /// Operand names for the gradient rows.
    names: &'static [&'static str],
    run: fn(Impl, &[Tensor]) -> Result<Tensor>,
}

fn conv(imp: Impl, t: &[Tensor], stride: usize, pad: usize) -> Result<Tensor> {
    match imp {
        Impl::Dispatched => crate::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad),
        Impl::Reference => crate::generic::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad),
    }
}

fn group_norm(imp: Impl, t: &[Tensor], silu: bool) -> Result<Tensor> {
    let (x, g, b) = (&t[0], &t[1], &t[2]);
    match (imp, silu) {
        (Impl::Dispatched, false) => crate::group_norm(x, 8, g, b, 1e-5),
        (Impl::Dispatched, true) => crate::group_norm_silu(x, 8, g, b, 1e-5),
        (Impl::Reference, false) => reference::group_norm(x, 8, g, b, 1e-5),
        (Impl::Reference, true) => reference::group_norm_silu(x, 8, g, b, 1e-5),
    }
}

fn attention(imp: Impl, t: &[Tensor], causal: bool) -> Result<Tensor> {
    match imp {
        Impl::Dispatched => crate::attention(&t[0], &t[1], &t[2], causal),
        Impl::Reference => crate::generic::attention(&t[0], &t[1], &t[2], causal),
    }
}

/// Shapes are small but not tile-aligned (odd sizes, token counts of 50 and 77) so edge handling
/// is compared too. The element-wise and embedding ops have one implementation on every device
/// (candle primitives), so on the CPU both paths agree exactly; on a GPU they compare candle's
/// kernels.
fn cases() -> Vec<Case> {
    use Input::{Ids, Normal, Timesteps};
    vec![
        Case {
            name: "conv2d 3x3 s1",
            inputs: &[Normal(&[2, 8, 12, 10]), Normal(&[16, 8, 3, 3]), Normal(&[16])],
            names: &["x", "w", "b"],
            run: |i, t| conv(i, t, 1, 1),
        },
        Case {
            name: "conv2d 3x3 s2",
            inputs: &[Normal(&[2, 8, 13, 12]), Normal(&[8, 8, 3, 3]), Normal(&[8])],
            names: &["x", "w", "b"],
            run: |i, t| conv(i, t, 2, 1),
        },
        Case {
            name: "conv2d 1x1",
            inputs: &[Normal(&[2, 16, 6, 7]), Normal(&[8, 16, 1, 1]), Normal(&[8])],
            names: &["x", "w", "b"],
            run: |i, t| conv(i, t, 1, 0),
        },
        Case {
            name: "linear",
            inputs: &[Normal(&[2, 7, 48]), Normal(&[40, 48]), Normal(&[40])],
            names: &["x", "w", "b"],
            run: |i, t| match i {
                Impl::Dispatched => crate::linear(&t[0], &t[1], Some(&t[2])),
                Impl::Reference => reference::linear(&t[0], &t[1], Some(&t[2])),
            },
        },
        Case {
            name: "group_norm",
            inputs: &[Normal(&[2, 32, 6, 5]), Normal(&[32]), Normal(&[32])],
            names: &["x", "gamma", "beta"],
            run: |i, t| group_norm(i, t, false),
        },
        Case {
            name: "group_norm+silu",
            inputs: &[Normal(&[2, 32, 6, 5]), Normal(&[32]), Normal(&[32])],
            names: &["x", "gamma", "beta"],
            run: |i, t| group_norm(i, t, true),
        },
        Case {
            name: "layer_norm",
            inputs: &[Normal(&[2, 13, 64]), Normal(&[64]), Normal(&[64])],
            names: &["x", "gamma", "beta"],
            run: |i, t| match i {
                Impl::Dispatched => crate::layer_norm(&t[0], &t[1], &t[2], 1e-5),
                Impl::Reference => reference::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            },
        },
        Case {
            name: "softmax",
            inputs: &[Normal(&[2, 3, 9, 33])],
            names: &["x"],
            run: |i, t| match i {
                Impl::Dispatched => crate::softmax_last_dim(&t[0]),
                Impl::Reference => reference::softmax_last_dim(&t[0]),
            },
        },
        Case {
            name: "attention self",
            inputs: &[Normal(&[2, 4, 50, 40]), Normal(&[2, 4, 50, 40]), Normal(&[2, 4, 50, 40])],
            names: &["q", "k", "v"],
            run: |i, t| attention(i, t, false),
        },
        Case {
            name: "attention cross",
            inputs: &[Normal(&[2, 4, 50, 40]), Normal(&[2, 4, 77, 40]), Normal(&[2, 4, 77, 40])],
            names: &["q", "k", "v"],
            run: |i, t| attention(i, t, false),
        },
        Case {
            name: "attention causal",
            inputs: &[Normal(&[2, 4, 77, 32]), Normal(&[2, 4, 77, 32]), Normal(&[2, 4, 77, 32])],
            names: &["q", "k", "v"],
            run: |i, t| attention(i, t, true),
        },
        Case {
            name: "gelu",
            inputs: &[Normal(&[4, 100])],
            names: &["x"],
            run: |_, t| crate::gelu_erf(&t[0]),
        },
        Case {
            name: "quick_gelu",
            inputs: &[Normal(&[4, 100])],
            names: &["x"],
            run: |_, t| crate::quick_gelu(&t[0]),
        },
        Case {
            name: "geglu",
            inputs: &[Normal(&[2, 7, 64])],
            names: &["x"],
            run: |_, t| crate::geglu(&t[0]),
        },
        Case { name: "silu", inputs: &[Normal(&[4, 100])], names: &["x"], run: |_, t| crate::silu(&t[0]) },
        Case {
            name: "embedding",
            inputs: &[Ids(&[2, 9], 50), Normal(&[50, 32])],
            names: &["ids", "table"],
            run: |_, t| crate::embedding(&t[0], &t[1]),
        },
        Case {
            name: "upsample nearest 2x",
            inputs: &[Normal(&[2, 4, 5, 6])],
            names: &["x"],
            run: |_, t| crate::upsample_nearest2x(&t[0]),
        },
        Case {
            name: "timestep embedding",
            inputs: &[Timesteps(4)],
            names: &["t"],
            run: |_, t| crate::timestep_embedding(&t[0], 32, true, 0.0),
        },
    ]
}

/// SplitMix64 + Box-Muller: the same normal samples on every machine, without a rand dependency
/// (the selftest's inputs and the op tests' inputs).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` standard normal samples.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform(), self.uniform());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }

    /// A host tensor of standard normal samples.
    pub fn normal(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Tensor::from_vec(self.normal_vec(n), shape, &Device::Cpu)
    }
}

/// The case's inputs on the CPU (in `dtype`), and whether each gets a gradient.
fn draw_inputs(case: &Case, dtype: DType, seed: u64) -> Result<Vec<(Tensor, bool)>> {
    let mut rng = SplitMix(seed);
    case.inputs
        .iter()
        .map(|input| match *input {
            Input::Normal(shape) => Ok((rng.normal(shape)?.to_dtype(dtype)?, true)),
            Input::Ids(shape, n) => {
                let count: usize = shape.iter().product();
                let ids: Vec<u32> = (0..count).map(|_| (rng.next() % u64::from(n)) as u32).collect();
                Ok((Tensor::from_vec(ids, shape, &Device::Cpu)?, false))
            }
            Input::Timesteps(n) => {
                let t: Vec<f32> = (0..n).map(|_| (rng.uniform() * 1000.0).floor() as f32).collect();
                Ok((Tensor::from_vec(t, n, &Device::Cpu)?.to_dtype(dtype)?, false))
            }
        })
        .collect()
}

/// Output and gradients (of the inputs that get one) on one path, back on the CPU in f32. The
/// upstream gradient is drawn from `g_seed` once the output's shape is known (the same on both
/// paths).
fn evaluate(case: &Case, path: &Path, inputs: &[(Tensor, bool)], g_seed: u64) -> Result<Vec<Tensor>> {
    let mut vars = Vec::new();
    let mut xs = Vec::new();
    for (t, grad) in inputs {
        let t = t.to_device(&path.device)?;
        if *grad {
            let v = Var::from_tensor(&t)?;
            xs.push(v.as_tensor().clone());
            vars.push(Some(v));
        } else {
            xs.push(t);
            vars.push(None);
        }
    }
    let out = (case.run)(path.imp, &xs)?;
    let mut results = vec![host_f32(&out)?];
    if vars.iter().any(Option::is_some) {
        let g = SplitMix(g_seed).normal(out.dims())?.to_dtype(out.dtype())?.to_device(&path.device)?;
        let grads = (&out * &g)?.sum_all()?.backward()?;
        for (x, v) in xs.iter().zip(&vars) {
            if v.is_some() {
                match grads.get(x) {
                    Some(gx) => results.push(host_f32(gx)?),
                    None => candle_core::bail!("no gradient reached an input"),
                }
            }
        }
    }
    Ok(results)
}

fn host_f32(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)
}

fn compare(case: &Case, tested: &Path, baseline: &Path, dtype: DType, rows: &mut Vec<Row>) {
    let seed = case.name.bytes().fold(0xC0FFEE_u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut tensors = vec!["out".to_string()];
    for (input, name) in case.inputs.iter().zip(case.names) {
        if matches!(input, Input::Normal(_)) {
            tensors.push(format!("d{name}"));
        }
    }
    let row = |tensor: &str, max_abs: f64, norm_rel: f64, error: Option<String>| Row {
        op: case.name,
        dtype,
        tensor: tensor.to_string(),
        max_abs,
        norm_rel,
        bound: bound(dtype),
        error,
    };
    let outcome = (|| -> Result<Vec<(f64, f64)>> {
        let inputs = draw_inputs(case, dtype, seed)?;
        let a = evaluate(case, tested, &inputs, seed ^ 0x5EED)?;
        let b = evaluate(case, baseline, &inputs, seed ^ 0x5EED)?;
        a.iter().zip(&b).map(|(a, b)| differences(a, b)).collect()
    })();
    match outcome {
        Ok(diffs) => {
            for (name, (max_abs, norm_rel)) in tensors.iter().zip(diffs) {
                rows.push(row(name, max_abs, norm_rel, None));
            }
        }
        // The first line only: candle appends a backtrace when RUST_BACKTRACE is set.
        Err(e) => {
            let msg = e.to_string();
            rows.push(row(
                "all",
                f64::NAN,
                f64::NAN,
                Some(msg.lines().next().unwrap_or_default().to_string()),
            ))
        }
    }
}

/// (max |a − b|, ‖a − b‖ / ‖b‖), in f64; NaN when the shapes differ or a value is not finite.
fn differences(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    let (mut max_abs, mut num, mut den) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        if !x.is_finite() || !y.is_finite() {
            return Ok((f64::NAN, f64::NAN));
        }
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        num += d * d;
        den += y * y;
    }
    let norm_rel = if den > 0.0 {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    Ok((max_abs, norm_rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_measure_and_reject_non_finite() -> Result<()> {
        let b = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
        let a = Tensor::new(&[3f32, 4.5], &Device::Cpu)?;
        let (max_abs, rel) = differences(&a, &b)?;
        assert!((max_abs - 0.5).abs() < 1e-12 && (rel - 0.1).abs() < 1e-12, "{max_abs} {rel}");
        let nan = Tensor::new(&[3f32, f32::NAN], &Device::Cpu)?;
        assert!(differences(&nan, &b)?.1.is_nan());
        let short = Tensor::new(&[3f32], &Device::Cpu)?;
        assert!(differences(&short, &b).is_err());
        Ok(())
    }

    #[test]
    fn a_wrong_result_fails_its_row() {
        let wrong = Row {
            op: "x",
            dtype: DType::F32,
            tensor: "out".into(),
            max_abs: 1.0,
            norm_rel: 2e-4,
            bound: bound(DType::F32),
            error: None,
        };
        assert!(!wrong.passed());
        let nan = Row { norm_rel: f64::NAN, ..wrong.clone() };
        assert!(!nan.passed());
        let ok = Row { norm_rel: 1e-6, ..wrong };
        assert!(ok.passed());
    }
}
