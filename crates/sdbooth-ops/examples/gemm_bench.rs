//! GFLOP/s of the bf16 GEMM (each kernel this CPU has) against the f32 GEMM, at SD's
//! conv-as-GEMM shapes, with 1 and 2 threads. Runs alternate (f32, bf16, f32, bf16, …) and the
//! median of each is printed, so the ratios hold on a busy machine. The last column is the bf16
//! GEMM as `--mixed_precision bf16` runs it on the CPU: bf16 weights, f32 columns (rounded to
//! bf16 while packed).
//!
//! `cargo run --release -p sdbooth-ops --example gemm_bench [REPEATS]`

use half::bf16;
use sdbooth_ops::kernels::{bf16_gemm, f32_gemm, Mat};
use sdbooth_ops::Bf16Kernel;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let repeats: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    // malloc tuned as in training (large buffers reused from the heap, so zeroed ones cost a pass).
    sdbooth_ops::tune_allocator();
    // (label, m, n, k): conv2d 3x3 forward as y[Cout, P] = W[Cout, 9·Cin] · col[9·Cin, P].
    let shapes = [
        ("320ch 32x32", 320, 1024, 2880),
        ("640ch 16x16", 640, 256, 5760),
        ("1280ch 8x8", 1280, 64, 11520),
        ("1024^3", 1024, 1024, 1024),
    ];
    let kernels: Vec<Bf16Kernel> =
        [Bf16Kernel::Avx512Bf16, Bf16Kernel::F32Fallback].into_iter().filter(|k| k.available()).collect();
    println!(
        "threads | shape | f32 GFLOP/s | {} | bf16 W · f32 col ({}) GFLOP/s",
        kernels.iter().map(|k| format!("bf16 {} GFLOP/s", k.name())).collect::<Vec<_>>().join(" | "),
        kernels[0].name()
    );
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        for &(label, m, n, k) in &shapes {
            let a32: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let b32: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
            let a16: Vec<bf16> = a32.iter().map(|&v| bf16::from_f32(v)).collect();
            let b16: Vec<bf16> = b32.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut dst = vec![0f32; m * n];
            let flops = 2.0 * (m * n * k) as f64;
            let mut times = vec![Vec::new(); 2 + kernels.len()];
            pool.install(|| {
                for _ in 0..repeats {
                    let t = Instant::now();
                    f32_gemm(m, n, k, &mut dst, n, false, Mat::rows(&a32, k), Mat::rows(&b32, n));
                    times[0].push(t.elapsed().as_secs_f64());
                    for (i, &kernel) in kernels.iter().enumerate() {
                        let t = Instant::now();
                        bf16_gemm(
                            kernel,
                            m,
                            n,
                            k,
                            &mut dst,
                            n,
                            false,
                            Mat::rows(&a16, k),
                            Mat::rows(&b16, n),
                        );
                        times[i + 1].push(t.elapsed().as_secs_f64());
                    }
                    let t = Instant::now();
                    bf16_gemm(
                        kernels[0],
                        m,
                        n,
                        k,
                        &mut dst,
                        n,
                        false,
                        Mat::rows(&a16, k),
                        Mat::rows(&b32, n),
                    );
                    times[1 + kernels.len()].push(t.elapsed().as_secs_f64());
                }
            });
            let gf: Vec<String> =
                times.into_iter().map(|t| format!("{:.0}", flops / median(t) / 1e9)).collect();
            println!("{threads} | {label} | {}", gf.join(" | "));
        }
    }
}
