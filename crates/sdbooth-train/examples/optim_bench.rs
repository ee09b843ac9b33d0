//! Times the optimizer phase alone on synthetic tensors with the size mix of SD1.5's U-Net
//! (scaled down: `--mparams N`, default 128 M values): the global gradient norm, the AdamW update
//! after accumulation, and the fused per-tensor update (norm + step) of AdamW8bit, with f32 or
//! bf16 (`--bf16`) weights. Prints seconds per phase and GB/s of the minimal memory traffic.
//!
//! `cargo run --release -p sdbooth-train --example optim_bench -- [--mparams 128] [--bf16]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use sdbooth_train::optim::{Optimizer, OptimizerConfig, OptimizerKind};
use sdbooth_train::update::{clip_coef, sum_of_squares, sums_of_squares};

/// Tensor sizes in SD1.5-like proportions: 3x3 convolutions, projections, biases and norms.
const PATTERN: &[usize] = &[
    1280 * 1280 * 9,
    1280 * 1280,
    1280,
    1280,
    640 * 640 * 9,
    640 * 640,
    640,
    5120 * 1280,
    320 * 320 * 9,
    320,
    768 * 768,
    768,
    1280 * 768,
];

/// CPU seconds of this process so far (user + system, from /proc/self/stat, 10 ms ticks): a
/// measure of work that other processes on a shared machine disturb less than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mparams: usize =
        args.iter().position(|a| a == "--mparams").map_or(128, |i| args[i + 1].parse().unwrap_or(128));
    let bf16 = args.iter().any(|a| a == "--bf16");
    // glibc malloc tuned as in training (freed buffers are reused, not unmapped).
    sdbooth_ops::tune_allocator();
    let steps = 3;
    let mut sizes = Vec::new();
    let mut total = 0;
    'fill: loop {
        for &n in PATTERN {
            if total + n > mparams << 20 {
                break 'fill;
            }
            sizes.push(n);
            total += n;
        }
    }
    let dev = Device::Cpu;
    let wdtype = if bf16 { DType::BF16 } else { DType::F32 };
    let make = |scale: f64, seed: usize| -> candle_core::Result<Vec<Tensor>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let v: Vec<f32> =
                    (0..n).map(|k| ((k * 7919 + i * 31 + seed) % 1999) as f32 / 1999.0 - 0.5).collect();
                Tensor::from_vec(v, n, &dev)?.affine(scale, 0.0)
            })
            .collect()
    };
    let weights: Vec<Var> = make(1.0, 1)?
        .into_iter()
        .map(|t| Var::from_tensor(&t.to_dtype(wdtype)?))
        .collect::<Result<_, _>>()?;
    let grads = make(1e-3, 2)?;
    let names: Vec<String> = (0..sizes.len()).map(|i| format!("p{i}")).collect();
    println!(
        "{} tensors, {:.1} M values, weights {wdtype:?}, {} threads",
        sizes.len(),
        total as f64 / 1e6,
        rayon::current_num_threads()
    );
    let gb = |bytes_per_value: f64, s: f64| bytes_per_value * total as f64 / s / 1e9;

    for kind in [OptimizerKind::AdamW, OptimizerKind::AdamW8bit] {
        let mut opt = Optimizer::new(OptimizerConfig::new(kind));
        opt.add_group("unet", 1e-4, names.clone());
        for step in 0..steps {
            // After accumulation: the global norm, then every parameter.
            let (c0, t0) = (cpu_seconds(), Instant::now());
            let squares = sums_of_squares(grads.iter())?;
            let coef = clip_coef(squares.iter().sum::<f64>().sqrt(), 1.0);
            let (c1, t1) = (cpu_seconds(), Instant::now());
            for ((name, w), g) in names.iter().zip(&weights).zip(&grads) {
                opt.step_param_scaled(name, w, g, 1e-4, coef)?;
            }
            let (c2, t2) = (cpu_seconds(), Instant::now());
            // Fused: each tensor's own norm, then its step.
            for ((name, w), g) in names.iter().zip(&weights).zip(&grads) {
                let coef = clip_coef(sum_of_squares(g)?.sqrt(), 1.0);
                opt.step_param_scaled(name, w, g, 1e-4, coef)?;
            }
            let (c3, t3) = (cpu_seconds(), Instant::now());
            let (norm, upd, fused) =
                ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64());
            println!(
                "{kind:?} step {step}: global norm {norm:.3} s ({:.1} GB/s; cpu {:.2} s), update {upd:.3} s (cpu {:.2} s), fused norm+update {fused:.3} s (cpu {:.2} s)",
                gb(4.0, norm),
                c1 - c0,
                c2 - c1,
                c3 - c2
            );
        }
    }
    Ok(())
}
