//! conv2d's CPU kernels (im2col + GEMM) on f32 or bf16 slices, each operand on its own
//! ([`GemmElem`]: a product with a bf16 operand runs the bf16 GEMM with f32 sums, im2col copies
//! the input's dtype); results are f32.
//!
//! candle's CPU conv2d backward goes through `conv_transpose2d`, a dot-product loop, and its CPU
//! conv2d refuses bf16. Here all three products are GEMMs on the `gemm` crate (AVX-512 with the
//! workspace's `x86-v4` feature), per image of the batch:
//!
//! * forward      `y[Cout, P]   = W[Cout, K] · col[K, P]`          (K = Cin·kh·kw, P = Ho·Wo)
//! * grad-input   `dcol[K, P]   = Wᵀ[K, Cout] · dy[Cout, P]`, then col2im into dx
//! * grad-weight  `dW[Cout, K] += dy[Cout, P] · colᵀ[P, K]`        (col recomputed, not kept)
//!
//! 1x1 stride-1 unpadded convolutions use the input itself as `col` (no copy). Nothing heavy is
//! saved between forward and backward: col is recomputed (memory-bound, cheap next to the GEMM).
//! Determinism: col2im runs one input channel per task with a fixed loop order; grad-weight sums
//! over the batch in batch order; gemm never splits the k-sum across threads.

use super::Geom;
use crate::alloc::uninit_output;
use crate::cpu::{gemm, GemmElem, Mat, Precision};
use rayon::prelude::*;

/// Rows per rayon task so each task moves at least ~32K floats (small planes at 8×8 would
/// otherwise make thousands of tiny tasks).
fn min_rows(row_len: usize) -> usize {
    (32 * 1024 / row_len.max(1)).max(1)
}

/// Fills `col[K, P]` from one image `x[Cin, H, W]`. One task per (channel, ki, kj) row.
fn im2col<T: Copy + Default + Send + Sync>(g: &Geom, x: &[T], col: &mut [T]) {
    let p = g.p();
    col.par_chunks_mut(p).with_min_len(min_rows(p)).enumerate().for_each(|(row, out)| {
        let c = row / (g.kh * g.kw);
        let ki = (row / g.kw) % g.kh;
        let kj = row % g.kw;
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for oh in 0..g.ho {
            let dst = &mut out[oh * g.wo..(oh + 1) * g.wo];
            let ih = (oh * g.stride + ki) as isize - g.pad as isize;
            if ih < 0 || ih >= g.h as isize {
                dst.fill(T::default());
                continue;
            }
            let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
            if g.stride == 1 {
                // Output columns ow read input column ow + kj - pad: a shifted contiguous copy.
                let shift = kj as isize - g.pad as isize;
                let lo = (-shift).clamp(0, g.wo as isize) as usize;
                let hi = (g.w as isize - shift).clamp(lo as isize, g.wo as isize) as usize;
                dst[..lo].fill(T::default());
                dst[hi..].fill(T::default());
                let s0 = (lo as isize + shift) as usize;
                dst[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
            } else {
                for (ow, d) in dst.iter_mut().enumerate() {
                    let iw = (ow * g.stride + kj) as isize - g.pad as isize;
                    *d = if iw >= 0 && iw < g.w as isize { src[iw as usize] } else { T::default() };
                }
            }
        }
    });
}

/// Scatter-adds `dcol[K, P]` into one image gradient `dx[Cin, H, W]` (overwriting dx).
/// One task per input channel, so every dx element is summed by one thread in a fixed order.
fn col2im(g: &Geom, dcol: &[f32], dx: &mut [f32]) {
    let p = g.p();
    dx.par_chunks_mut(g.h * g.w).with_min_len(min_rows(g.h * g.w * g.kh * g.kw)).enumerate().for_each(
        |(c, plane)| {
            plane.fill(0.0);
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let row = &dcol[((c * g.kh + ki) * g.kw + kj) * p..][..p];
                    for oh in 0..g.ho {
                        let ih = (oh * g.stride + ki) as isize - g.pad as isize;
                        if ih < 0 || ih >= g.h as isize {
                            continue;
                        }
                        let dst = &mut plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                        let src = &row[oh * g.wo..(oh + 1) * g.wo];
                        if g.stride == 1 {
                            let shift = kj as isize - g.pad as isize;
                            let lo = (-shift).clamp(0, g.wo as isize) as usize;
                            let hi = (g.w as isize - shift).clamp(lo as isize, g.wo as isize) as usize;
                            let s0 = (lo as isize + shift) as usize;
                            for (d, s) in dst[s0..s0 + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                                *d += *s;
                            }
                        } else {
                            for (ow, s) in src.iter().enumerate() {
                                let iw = (ow * g.stride + kj) as isize - g.pad as isize;
                                if iw >= 0 && iw < g.w as isize {
                                    dst[iw as usize] += *s;
                                }
                            }
                        }
                    }
                }
            }
        },
    );
}

/// The buffer [`columns`] fills: `K × P` values, none for a pointwise convolution. Not zeroed:
/// a `vec![0; K·P]` was a serial memset of the whole matrix on the calling thread (glibc's
/// calloc zeroes reused heap memory) while the pool waited, up to 42 MB per 1280-channel layer
/// (19 of the 140 main-thread samples of the SD1.5 256-px fp32 step, perf, 2 threads).
fn col_buffer<T: GemmElem>(g: &Geom) -> Vec<T> {
    if g.is_pointwise() {
        return Vec::new();
    }
    // SAFETY: `columns` hands the buffer out only after `im2col` filled it, and im2col writes
    // every element of every row (the padding as zeros, the rest copied from the image).
    unsafe { uninit_output(g.k() * g.p()) }
}

/// The column matrix `col[K, P]` of image `bi` of `x`: the image itself for a pointwise
/// convolution, else filled into `col` by im2col.
fn columns<'a, T: Copy + Default + Send + Sync>(
    g: &Geom,
    x: &'a [T],
    bi: usize,
    col: &'a mut [T],
) -> &'a [T] {
    let xb = &x[bi * g.cin * g.h * g.w..(bi + 1) * g.cin * g.h * g.w];
    if g.is_pointwise() {
        xb
    } else {
        im2col(g, xb, col);
        col
    }
}

/// Forward: `y[B, Cout, Ho, Wo]`.
pub fn forward<X: GemmElem, W: GemmElem>(g: &Geom, precision: Precision, x: &[X], w: &[W]) -> Vec<f32> {
    forward_bias(g, precision, x, w, None)
}

/// Forward with an optional per-channel bias, added by starting the GEMM from the bias planes.
pub fn forward_bias<X: GemmElem, W: GemmElem>(
    g: &Geom,
    precision: Precision,
    x: &[X],
    w: &[W],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    // SAFETY: each image's `y[Cout, P]` is either filled with the bias planes (then accumulated
    // into) or written by the GEMM, which with `accumulate == false` stores all of it without
    // reading it (zeros when k == 0); the images tile `y`.
    let mut y = unsafe { uninit_output(g.b * g.cout * p) };
    if let Some(bias) = bias {
        y.par_chunks_mut(p).with_min_len(min_rows(p)).enumerate().for_each(|(i, plane)| {
            plane.fill(bias[i % g.cout]);
        });
    }
    let mut col = col_buffer(g);
    for bi in 0..g.b {
        let colv = columns(g, x, bi, &mut col);
        let yb = &mut y[bi * g.cout * p..(bi + 1) * g.cout * p];
        gemm(precision, g.cout, p, k, yb, p, bias.is_some(), Mat::rows(w, k), Mat::rows(colv, p));
    }
    y
}

/// Gradient with respect to the bias: per output channel, the sum of dy over batch and plane.
/// One channel per task, summed in batch order and in 16 fixed lanes per plane.
pub fn grad_bias(g: &Geom, dy: &[f32]) -> Vec<f32> {
    let p = g.p();
    (0..g.cout)
        .into_par_iter()
        .with_min_len(min_rows(p * g.b))
        .map(|c| {
            let mut lanes = [0f32; 16];
            let mut tail = 0f32;
            for bi in 0..g.b {
                let plane = &dy[(bi * g.cout + c) * p..][..p];
                let mut chunks = plane.chunks_exact(16);
                for ch in &mut chunks {
                    for (l, v) in lanes.iter_mut().zip(ch) {
                        *l += *v;
                    }
                }
                for v in chunks.remainder() {
                    tail += *v;
                }
            }
            lanes.iter().sum::<f32>() + tail
        })
        .collect()
}

/// Gradient with respect to the input.
pub fn grad_input<W: GemmElem, D: GemmElem>(g: &Geom, precision: Precision, w: &[W], dy: &[D]) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    let chw = g.cin * g.h * g.w;
    // SAFETY: each image's `dx[Cin, H, W]` is written whole by the GEMM (pointwise) or by col2im,
    // which zeroes every plane before adding into it; the images tile `dx`. `dcol[K, P]` is
    // written whole by the GEMM (`accumulate == false`) before col2im reads it.
    let mut dx = unsafe { uninit_output(g.b * chw) };
    let mut dcol = if g.is_pointwise() { Vec::new() } else { unsafe { uninit_output(k * p) } };
    for bi in 0..g.b {
        let dyb = &dy[bi * g.cout * p..(bi + 1) * g.cout * p];
        let dxb = &mut dx[bi * chw..(bi + 1) * chw];
        let wt = Mat::transposed(w, k);
        if g.is_pointwise() {
            gemm(precision, k, p, g.cout, dxb, p, false, wt, Mat::rows(dyb, p));
        } else {
            gemm(precision, k, p, g.cout, &mut dcol, p, false, wt, Mat::rows(dyb, p));
            col2im(g, &dcol, dxb);
        }
    }
    dx
}

/// Gradient with respect to the weight, summed over the batch in batch order.
pub fn grad_weight<X: GemmElem, D: GemmElem>(g: &Geom, precision: Precision, x: &[X], dy: &[D]) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    if g.b == 0 {
        return vec![0f32; g.cout * k];
    }
    // SAFETY: the first image's GEMM (`accumulate == false`) writes all of `dw[Cout, K]`; the
    // later ones add to it.
    let mut dw = unsafe { uninit_output(g.cout * k) };
    let mut col = col_buffer(g);
    for bi in 0..g.b {
        let colv = columns(g, x, bi, &mut col);
        let dyb = &dy[bi * g.cout * p..(bi + 1) * g.cout * p];
        gemm(precision, g.cout, k, p, &mut dw, k, bi > 0, Mat::rows(dyb, p), Mat::transposed(colv, p));
    }
    dw
}
