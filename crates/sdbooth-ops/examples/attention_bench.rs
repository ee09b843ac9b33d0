//! Per-head CPU time of attention with bf16 products (`--mixed_precision bf16`), forward and
//! backward, at Stable Diffusion 1.x U-Net shapes (one head, batch 1): self-attention at the
//! 256 and 512 px latents' token counts and cross-attention to CLIP's 77 tokens.
//!
//! Everything runs on one thread and is timed in that thread's CPU time (medians), so figures
//! from a busy machine stay comparable; compare two builds by running them alternately (A B A B).
//!
//! `cargo run --release -p sdbooth-ops --example attention_bench [REPEATS] [FILTER]` (FILTER:
//! only the shapes whose label contains it).

use candle_core::{Device, Tensor, Var};
use sdbooth_ops::{self as ops, Precision};

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::thread_cpu_seconds;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Deterministic values in [-1, 1) scaled by `scale` (no RNG, so every build sees the same).
fn values(shape: &[usize], seed: usize, scale: f32) -> Tensor {
    let len: usize = shape.iter().product();
    let data: Vec<f32> = (0..len).map(|i| (((i * seed) % 2000) as f32 / 1000.0 - 1.0) * scale).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data")
}

fn main() {
    let repeats: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let filter = std::env::args().nth(2).unwrap_or_default();
    sdbooth_ops::tune_allocator();
    println!("bf16 kernel: {}", ops::bf16_kernel().name());
    println!("shape (n x m, d) | fwd ms | bwd ms | fwd GFLOP/s | bwd GFLOP/s (per CPU-s, 1 thread)");
    // (label, query tokens, key tokens, head dim)
    let shapes = [
        ("self 4096 d40 (512 px)", 4096, 4096, 40),
        ("self 1024 d40 (256 px)", 1024, 1024, 40),
        ("self 1024 d80 (512 px)", 1024, 1024, 80),
        ("self 256 d80 (256 px)", 256, 256, 80),
        ("cross 4096x77 d40", 4096, 77, 40),
        ("cross 1024x77 d40", 1024, 77, 40),
    ];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("thread pool");
    for (label, n, m, d) in shapes.into_iter().filter(|s| s.0.contains(&filter)) {
        let q = Var::from_tensor(&values(&[1, 1, n, d], 7919, 2.0)).expect("var");
        let k = Var::from_tensor(&values(&[1, 1, m, d], 104729, 2.0)).expect("var");
        let v = Var::from_tensor(&values(&[1, 1, m, d], 1299709, 1.0)).expect("var");
        let g = values(&[1, 1, n, d], 15485863, 1.0);
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        pool.install(|| {
            for _ in 0..repeats {
                let c = thread_cpu_seconds();
                let o =
                    ops::attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), false, Precision::Bf16)
                        .expect("attention");
                let c1 = thread_cpu_seconds();
                let grads = (o * &g).and_then(|x| x.sum_all()).and_then(|x| x.backward()).expect("backward");
                bwd.push(thread_cpu_seconds() - c1);
                fwd.push(c1 - c);
                drop(grads);
            }
        });
        let flops = ops::attention_flops(1, 1, n, m, d);
        let (f, b) = (median(fwd), median(bwd));
        println!(
            "{label} | {:.1} | {:.1} | {:.0} | {:.0}",
            f * 1e3,
            b * 1e3,
            flops / f / 1e9,
            2.0 * flops / b / 1e9
        );
    }
}
