//! Criterion benches of the sdbooth-ops CPU kernels at Stable Diffusion shapes (batch 1, f32).
//!
//! Throughput is declared as FLOPs, so criterion's `thrpt` column reads `Gelem/s` = GFLOP/s.
//! Forward+backward counts 3× the forward FLOPs (grad-input + grad-weight, or for attention the
//! two backward products per forward product), the convention PyTorch figures use.
//!
//! Run briefly (the machine is shared): `cargo bench -p sdbooth-ops --bench ops -- --quick`
//! or filter, e.g. `-- conv2d`.

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sdbooth_ops as ops;
use std::time::Duration;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).expect("randn")
}

/// conv2d 3x3 stride 1 at the three SD U-Net resolutions of a 256 px image (32² latents).
fn conv2d(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv2d_3x3");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (ch, hw) in [(320usize, 32usize), (640, 16), (1280, 8)] {
        let x = Var::from_tensor(&randn(&[1, ch, hw, hw])).expect("var");
        let w = Var::from_tensor(&(randn(&[ch, ch, 3, 3]) * 0.02).expect("scale")).expect("var");
        let flops = ops::conv2d_flops(x.dims(), w.dims(), 1, 1).expect("geometry");
        let label = format!("{ch}ch_{hw}x{hw}");
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::new("fwd", &label), |b| {
            b.iter(|| ops::conv2d(x.as_tensor(), w.as_tensor(), None, 1, 1).expect("conv"))
        });
        group.throughput(Throughput::Elements(3 * flops as u64));
        group.bench_function(BenchmarkId::new("fwd_bwd", &label), |b| {
            b.iter(|| {
                let y = ops::conv2d(x.as_tensor(), w.as_tensor(), None, 1, 1).expect("conv");
                y.sum_all().expect("sum").backward().expect("backward")
            })
        });
        {
            // candle's own conv2d (through our reference path): the ratio within one run is what
            // compares on this shared, noisy machine.
            group.bench_function(BenchmarkId::new("fwd_bwd_candle", &label), |b| {
                b.iter(|| {
                    let y = ops::reference::conv2d(x.as_tensor(), w.as_tensor(), None, 1, 1).expect("conv");
                    y.sum_all().expect("sum").backward().expect("backward")
                })
            });
        }
    }
    group.finish();
}

/// The three conv2d passes alone on f32 slices (no candle graph, no gradient accumulation).
fn conv2d_parts(c: &mut Criterion) {
    use ops::kernels::*;
    // The raw kernels bypass ops::conv2d, which applies the malloc tuning on first use: apply it
    // here too so the parts add up to the op (fresh 59 MB outputs are otherwise page-faulted).
    ops::tune_allocator();
    let mut group = c.benchmark_group("conv2d_parts");
    group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for (ch, hw) in [(320usize, 32usize), (1280, 8)] {
        let g = Conv2dGeom::new(&[1, ch, hw, hw], &[ch, ch, 3, 3], 1, 1).expect("geometry");
        let x = vec![0.5f32; ch * hw * hw];
        let w = vec![0.01f32; ch * ch * 9];
        let label = format!("{ch}ch_{hw}x{hw}");
        group.throughput(Throughput::Elements(g.flops() as u64));
        group.bench_function(BenchmarkId::new("forward", &label), |b| {
            b.iter(|| conv2d_forward(&g, Precision::Stored, &x, &w))
        });
        group.bench_function(BenchmarkId::new("grad_input", &label), |b| {
            b.iter(|| conv2d_grad_input(&g, Precision::Stored, &w, &x))
        });
        group.bench_function(BenchmarkId::new("grad_weight", &label), |b| {
            b.iter(|| conv2d_grad_weight(&g, Precision::Stored, &x, &x))
        });
    }
    group.finish();
}

/// Self-attention at 32² latents (1024 tokens), 8 heads, head dim 40 (SD1 at 256 px, first
/// block), and cross-attention to 77 text tokens.
fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (name, n, m) in [("self_1024", 1024usize, 1024usize), ("cross_1024x77", 1024, 77)] {
        let (h, d) = (8usize, 40usize);
        let q = Var::from_tensor(&randn(&[1, h, n, d])).expect("var");
        let k = Var::from_tensor(&randn(&[1, h, m, d])).expect("var");
        let v = Var::from_tensor(&randn(&[1, h, m, d])).expect("var");
        let flops = ops::attention_flops(1, h, n, m, d);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::new("fwd", name), |b| {
            b.iter(|| ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), false).expect("attn"))
        });
        group.throughput(Throughput::Elements(3 * flops as u64));
        group.bench_function(BenchmarkId::new("fwd_bwd", name), |b| {
            b.iter(|| {
                let o = ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), false).expect("attn");
                o.sum_all().expect("sum").backward().expect("backward")
            })
        });
        if n == m {
            group.bench_function(BenchmarkId::new("fwd_bwd_naive", name), |b| {
                b.iter(|| {
                    let o = ops::reference::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), false)
                        .expect("attn");
                    o.sum_all().expect("sum").backward().expect("backward")
                })
            });
        }
    }
    group.finish();
}

/// Matmul through candle (gemm with the workspace's x86-v4 feature): 1024³ and SD's
/// feed-forward projection (1024 tokens × 320 → 1280).
fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (name, m, k, n) in
        [("1024^3", 1024usize, 1024usize, 1024usize), ("linear_1024x320x1280", 1024, 320, 1280)]
    {
        let a = randn(&[m, k]);
        let w = randn(&[n, k]);
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(name, |b| b.iter(|| ops::linear(&a, &w, None).expect("linear")));
    }
    // linear forward + backward (x, w, b all tracked) against candle's autograd of the same
    // composition: SD's feed-forward at 1024 tokens and the 8×8 level's GEGLU projection
    // (64 tokens, 1280 → 10240), where the weight gradient dominates.
    for (label, m, k, n) in
        [("1024x320x1280", 1024usize, 320usize, 1280usize), ("64x1280x10240", 64, 1280, 10240)]
    {
        let x = Var::from_tensor(&randn(&[1, m, k])).expect("var");
        let w = Var::from_tensor(&(randn(&[n, k]) * 0.02).expect("scale")).expect("var");
        let bias = Var::from_tensor(&randn(&[n])).expect("var");
        group.throughput(Throughput::Elements((3 * 2 * m * k * n) as u64));
        for (id, f) in [
            (
                "linear_fwd_bwd",
                ops::linear as fn(&Tensor, &Tensor, Option<&Tensor>) -> candle_core::Result<Tensor>,
            ),
            ("linear_fwd_bwd_candle", ops::reference::linear),
        ] {
            group.bench_function(BenchmarkId::new(id, label), |b| {
                b.iter(|| {
                    let y = f(x.as_tensor(), w.as_tensor(), Some(bias.as_tensor())).expect("linear");
                    y.sum_all().and_then(|s| s.backward()).expect("backward")
                })
            });
        }
    }
    group.finish();
}

/// Memory-bound ops at SD shapes: GroupNorm+SiLU on 320ch 32², LayerNorm on 1024×320 (reported
/// as time; FLOPs are not meaningful for these).
fn norms(c: &mut Criterion) {
    let mut group = c.benchmark_group("norm");
    group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    let x = Var::from_tensor(&randn(&[1, 320, 32, 32])).expect("var");
    let (gm, bt) = (Var::ones(320, candle_core::DType::F32, &Device::Cpu).expect("var"), randn(&[320]));
    group.bench_function("group_norm_silu_fwd_bwd_320x32x32", |b| {
        b.iter(|| {
            let y = ops::group_norm_silu(x.as_tensor(), 32, gm.as_tensor(), &bt, 1e-5).expect("gn");
            y.sum_all().expect("sum").backward().expect("backward")
        })
    });
    let t = Var::from_tensor(&randn(&[1, 1024, 320])).expect("var");
    group.bench_function("layer_norm_fwd_bwd_1024x320", |b| {
        b.iter(|| {
            let y = ops::layer_norm(t.as_tensor(), gm.as_tensor(), &bt, 1e-5).expect("ln");
            y.sum_all().expect("sum").backward().expect("backward")
        })
    });
    group.finish();
}

criterion_group!(benches, conv2d, conv2d_parts, attention, matmul, norms);
criterion_main!(benches);
