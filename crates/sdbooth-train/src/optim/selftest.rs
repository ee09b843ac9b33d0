//! The optimizers' part of `sdbooth selftest`: each optimizer's tensor-operation implementation
//! (`optim/device/`) on the tested device against the host kernels on the CPU, from the same
//! weights and gradients (a fixed seed), over three steps; rows of the ops self-test's report.
//!
//! Bounds: the updates are single IEEE-rounded operations in the host kernels' order, so f32
//! weights are expected to be equal (the bounds leave room for reductions: Adafactor's f64 sums,
//! and an 8-bit code that a last-bit difference moves). bf16 weights: both paths round the same
//! f32 update stochastically from different streams, so each weight lands on the same bf16 value
//! or its neighbour, 2^-7 relative at most.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sdbooth_ops::selftest::Row;

use super::{Kernels, Optimizer, OptimizerConfig, OptimizerKind};
use crate::error::Result;

/// Covers 8-bit (above 4096 values, partial last block) and 32-bit AdamW8bit state, and
/// Adafactor's factored (rank 2 and 4) and unfactored second moments.
const PARAMS: [(&str, &[usize]); 3] = [("conv", &[64, 30, 3, 3]), ("proj", &[96, 80]), ("bias", &[300])];
const STEPS: u64 = 3;

/// One row per (optimizer, weight dtype): the weights after `STEPS` steps on `device` against
/// the host kernels'.
pub fn rows(device: &Device) -> Vec<Row> {
    let cases: [(&'static str, OptimizerKind, DType, f64); 6] = [
        ("optimizer AdamW", OptimizerKind::AdamW, DType::F32, 1e-6),
        ("optimizer AdamW8bit", OptimizerKind::AdamW8bit, DType::F32, 1e-4),
        ("optimizer Lion", OptimizerKind::Lion, DType::F32, 1e-6),
        ("optimizer SGDNesterov", OptimizerKind::SGDNesterov, DType::F32, 1e-6),
        ("optimizer Adafactor", OptimizerKind::Adafactor, DType::F32, 1e-5),
        ("optimizer AdamW8bit", OptimizerKind::AdamW8bit, DType::BF16, 2f64.powi(-7)),
    ];
    cases
        .into_iter()
        .map(|(op, kind, dtype, bound)| {
            let mut row = Row {
                op,
                dtype,
                tensor: "w".into(),
                max_abs: f64::NAN,
                norm_rel: f64::NAN,
                bound,
                error: None,
            };
            match compare(kind, dtype, device) {
                Ok((max_abs, norm_rel)) => (row.max_abs, row.norm_rel) = (max_abs, norm_rel),
                Err(e) => row.error = Some(e.to_string()),
            }
            row
        })
        .collect()
}

/// (largest absolute difference, ‖a − b‖ / ‖b‖) of all weights, tensor path on `device` (a)
/// against host kernels on the CPU (b). bf16 weights take one step (the paths' rounding streams
/// differ, so later steps start from different weights).
fn compare(kind: OptimizerKind, dtype: DType, device: &Device) -> Result<(f64, f64)> {
    // The baseline is the host kernels, which run on CPU tensors.
    let cpu = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(20261129);
    let mut random = |shape: &[usize], scale: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale).collect();
        Ok(Tensor::from_vec(v, shape, &cpu)?)
    };
    let steps = if dtype == DType::BF16 { 1 } else { STEPS };
    let mut host_vars = Vec::new();
    let mut device_vars = Vec::new();
    for (_, shape) in PARAMS {
        let w = random(shape, 0.5)?.to_dtype(dtype)?;
        device_vars.push(Var::from_tensor(&w.to_device(device)?)?);
        host_vars.push(Var::from_tensor(&w)?);
    }
    let config = OptimizerConfig::new(kind);
    let mut host = Optimizer::new(config.clone());
    host.kernels = Kernels::Host;
    let mut tensor = Optimizer::new(config);
    tensor.kernels = Kernels::Tensor;
    for _ in 0..steps {
        for (((name, shape), hv), dv) in PARAMS.iter().zip(&host_vars).zip(&device_vars) {
            let g = random(shape, 0.1)?;
            host.step_param_scaled(name, hv, &g, 1e-3, 0.8)?;
            tensor.step_param_scaled(name, dv, &g.to_device(device)?, 1e-3, 0.8)?;
        }
    }
    let (mut max_abs, mut diff2, mut norm2) = (0f64, 0f64, 0f64);
    for (hv, dv) in host_vars.iter().zip(&device_vars) {
        let b: Vec<f32> = hv.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let a: Vec<f32> = dv.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for (x, y) in a.iter().zip(&b) {
            let d = f64::from(*x) - f64::from(*y);
            max_abs = max_abs.max(d.abs());
            diff2 += d * d;
            norm2 += f64::from(*y) * f64::from(*y);
        }
    }
    Ok((max_abs, (diff2 / norm2).sqrt()))
}
