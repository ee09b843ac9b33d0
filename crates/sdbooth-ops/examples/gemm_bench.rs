//! GFLOP/s of the bf16 GEMM (each kernel this CPU has) against the f32 GEMM, at SD's
//! conv-as-GEMM shapes, with 1 and 2 threads. Runs alternate (f32, bf16, f32, bf16, …) and the
//! median of each is printed, so the ratios hold on a busy machine. The last column is the bf16
//! GEMM as `--mixed_precision bf16` runs it on the CPU: bf16 weights, f32 columns (rounded to
//! bf16 while packed).
//!
//! A second table times the bf16 GEMM alone in the layouts a `--mixed_precision bf16` training
//! step runs (every operand f32, rounded to bf16 as packed): each conv2d 3x3 and linear shape in
//! its forward (`fwd`), input-gradient (`dx`: transposed weight) and weight-gradient (`dw`:
//! transposed columns or output gradient, k = pixels or tokens) products.
//!
//! `cargo run --release -p sdbooth-ops --example gemm_bench [REPEATS] [FILTER]` (FILTER: only
//! the training-layout rows whose label contains it, and no first table).

use half::bf16;
use sdbooth_ops::kernels::{bf16_gemm, f32_gemm, Mat};
use sdbooth_ops::Bf16Kernel;
use std::time::Instant;

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::thread_cpu_seconds;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let repeats: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let filter = std::env::args().nth(2);
    // malloc tuned as in training (large buffers reused from the heap, so zeroed ones cost a pass).
    sdbooth_ops::tune_allocator();
    if filter.is_none() {
        f32_vs_bf16(repeats);
    }
    training_layouts(repeats, filter.as_deref().unwrap_or(""));
}

/// Pseudo-random values in [-0.5, 0.5).
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * seed) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// One training product: `(label, m, n, k, a, b)` with `a`, `b` as (row stride, column stride)
/// views of `m×k` and `k×n` values.
type Product = (String, usize, usize, usize, (usize, usize), (usize, usize));

/// The three products of conv2d 3x3 (`cin = cout = ch` on an `hw×hw` image, batch 1) and of a
/// linear layer (`rows` tokens, `inp -> out`), as `conv/cpu.rs` and `linear/cpu.rs` call them.
fn training_products() -> Vec<Product> {
    let mut all = Vec::new();
    for (ch, hw) in [(320, 32), (640, 16), (1280, 8), (1280, 4)] {
        let (k, p) = (9 * ch, hw * hw);
        let label = format!("conv {ch}ch {hw}x{hw}");
        all.push((format!("{label} fwd"), ch, p, k, (k, 1), (p, 1)));
        all.push((format!("{label} dx"), k, p, ch, (1, k), (p, 1)));
        all.push((format!("{label} dw"), ch, k, p, (p, 1), (1, p)));
    }
    for (rows, inp, out) in
        [(77, 768, 768), (77, 768, 3072), (77, 3072, 768), (1024, 320, 320), (64, 1280, 5120)]
    {
        let label = format!("linear {rows}x{inp}->{out}");
        all.push((format!("{label} fwd"), rows, out, inp, (inp, 1), (1, inp)));
        all.push((format!("{label} dx"), rows, inp, out, (out, 1), (inp, 1)));
        all.push((format!("{label} dw"), out, inp, rows, (1, out), (inp, 1)));
    }
    all
}

/// GFLOP/s (median) of the bf16 GEMM on each training product whose label contains `filter`;
/// with one thread, also per second of the thread's CPU time (steadier on a shared machine).
fn training_layouts(repeats: usize, filter: &str) {
    let kernel = Bf16Kernel::Avx512Bf16;
    if !kernel.available() {
        println!("(no AVX512_BF16: training-layout table skipped)");
        return;
    }
    println!("threads | training product (f32 operands) | m n k | bf16 GFLOP/s | per CPU-s (1 thread)");
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        for (label, m, n, k, (ars, acs), (brs, bcs)) in training_products() {
            if !label.contains(filter) {
                continue;
            }
            let (a, b) = (values(m * k, 7919), values(k * n, 104729));
            let mut dst = vec![0f32; m * n];
            let (mut times, mut cpu) = (Vec::new(), Vec::new());
            pool.install(|| {
                for _ in 0..repeats {
                    let (t, c) = (Instant::now(), thread_cpu_seconds());
                    let (a, b) = (Mat { data: &a, rs: ars, cs: acs }, Mat { data: &b, rs: brs, cs: bcs });
                    bf16_gemm(kernel, m, n, k, &mut dst, n, false, a, b);
                    times.push(t.elapsed().as_secs_f64());
                    cpu.push(thread_cpu_seconds() - c);
                }
            });
            let flops = 2.0 * (m * n * k) as f64;
            let per_cpu = if threads == 1 { format!("{:.0}", flops / median(cpu) / 1e9) } else { "-".into() };
            println!("{threads} | {label} | {m} {n} {k} | {:.0} | {per_cpu}", flops / median(times) / 1e9);
        }
    }
}

/// The first table: f32 GEMM against each bf16 kernel at conv-as-GEMM shapes.
fn f32_vs_bf16(repeats: usize) {
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
