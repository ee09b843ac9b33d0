//! conv2d on CPU as a candle custom op with its own backward (im2col + GEMM).
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

use crate::cpu::{self, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution, validated once.
#[derive(Clone, Copy, Debug)]
pub struct Geom {
    pub b: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    pub fn new(x: &[usize], wt: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, cin, h, w], &[cout, cin_w, kh, kw]) = (x, wt) else {
            bail!("conv2d: expected 4-D input and weight, got {x:?} and {wt:?}")
        };
        if cin != cin_w {
            bail!("conv2d: input has {cin} channels but weight expects {cin_w}");
        }
        if stride == 0 {
            bail!("conv2d: stride must be positive");
        }
        if h + 2 * pad < kh || w + 2 * pad < kw || kh == 0 || kw == 0 {
            bail!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{w} (padding {pad})");
        }
        let ho = (h + 2 * pad - kh) / stride + 1;
        let wo = (w + 2 * pad - kw) / stride + 1;
        Ok(Geom { b, cin, h, w, cout, kh, kw, stride, pad, ho, wo })
    }
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    fn p(&self) -> usize {
        self.ho * self.wo
    }
    /// 1x1, stride 1, no padding: the input plane already is the column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// FLOPs of the forward pass (multiply-add = 2).
    pub fn flops(&self) -> f64 {
        2.0 * (self.b * self.cout * self.k() * self.p()) as f64
    }
}

/// Rows per rayon task so each task moves at least ~32K floats (small planes at 8×8 would
/// otherwise make thousands of tiny tasks).
fn min_rows(row_len: usize) -> usize {
    (32 * 1024 / row_len.max(1)).max(1)
}

/// Fills `col[K, P]` from one image `x[Cin, H, W]`. One task per (channel, ki, kj) row.
fn im2col(g: &Geom, x: &[f32], col: &mut [f32]) {
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
                dst.fill(0.0);
                continue;
            }
            let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
            if g.stride == 1 {
                // Output columns ow read input column ow + kj - pad: a shifted contiguous copy.
                let shift = kj as isize - g.pad as isize;
                let lo = (-shift).clamp(0, g.wo as isize) as usize;
                let hi = (g.w as isize - shift).clamp(lo as isize, g.wo as isize) as usize;
                dst[..lo].fill(0.0);
                dst[hi..].fill(0.0);
                let s0 = (lo as isize + shift) as usize;
                dst[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
            } else {
                for (ow, d) in dst.iter_mut().enumerate() {
                    let iw = (ow * g.stride + kj) as isize - g.pad as isize;
                    *d = if iw >= 0 && iw < g.w as isize { src[iw as usize] } else { 0.0 };
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

/// Forward: `y[B, Cout, Ho, Wo]`.
pub fn forward(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
    forward_bias(g, x, w, None)
}

/// Forward with an optional per-channel bias, added by starting the GEMM from the bias planes.
pub fn forward_bias(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    let mut y = vec![0f32; g.b * g.cout * p];
    if let Some(bias) = bias {
        y.par_chunks_mut(p).with_min_len(min_rows(p)).enumerate().for_each(|(i, plane)| {
            plane.fill(bias[i % g.cout]);
        });
    }
    let mut col = if g.is_pointwise() { Vec::new() } else { vec![0f32; k * p] };
    for bi in 0..g.b {
        let xb = &x[bi * g.cin * g.h * g.w..(bi + 1) * g.cin * g.h * g.w];
        let colv: &[f32] = if g.is_pointwise() {
            xb
        } else {
            im2col(g, xb, &mut col);
            &col
        };
        let yb = &mut y[bi * g.cout * p..(bi + 1) * g.cout * p];
        cpu::sgemm(
            g.cout,
            p,
            k,
            yb,
            p,
            bias.is_some(),
            Mat::rows(w, k),
            Mat::rows(colv, p),
            cpu::par_threads(),
        );
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
pub fn grad_input(g: &Geom, w: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    let chw = g.cin * g.h * g.w;
    let mut dx = vec![0f32; g.b * chw];
    let mut dcol = if g.is_pointwise() { Vec::new() } else { vec![0f32; k * p] };
    for bi in 0..g.b {
        let dyb = &dy[bi * g.cout * p..(bi + 1) * g.cout * p];
        let dxb = &mut dx[bi * chw..(bi + 1) * chw];
        let wt = Mat::transposed(w, k);
        if g.is_pointwise() {
            cpu::sgemm(k, p, g.cout, dxb, p, false, wt, Mat::rows(dyb, p), cpu::par_threads());
        } else {
            cpu::sgemm(k, p, g.cout, &mut dcol, p, false, wt, Mat::rows(dyb, p), cpu::par_threads());
            col2im(g, &dcol, dxb);
        }
    }
    dx
}

/// Gradient with respect to the weight, summed over the batch in batch order.
pub fn grad_weight(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, p) = (g.k(), g.p());
    let mut dw = vec![0f32; g.cout * k];
    let mut col = if g.is_pointwise() { Vec::new() } else { vec![0f32; k * p] };
    for bi in 0..g.b {
        let xb = &x[bi * g.cin * g.h * g.w..(bi + 1) * g.cin * g.h * g.w];
        let colv: &[f32] = if g.is_pointwise() {
            xb
        } else {
            im2col(g, xb, &mut col);
            &col
        };
        let dyb = &dy[bi * g.cout * p..(bi + 1) * g.cout * p];
        cpu::sgemm(
            g.cout,
            k,
            p,
            &mut dw,
            k,
            bi > 0,
            Mat::rows(dyb, p),
            Mat::transposed(colv, p),
            cpu::par_threads(),
        );
    }
    dw
}

/// The custom op: `(x, w) -> y` with backward for both operands.
pub(crate) struct Conv2dOp {
    pub stride: usize,
    pub pad: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        if s1.dtype() != s2.dtype() {
            bail!("conv2d: input dtype {:?} differs from weight dtype {:?}", s1.dtype(), s2.dtype());
        }
        let x = cpu::storage_f32(s1, l1)?;
        let w = cpu::storage_f32(s2, l2)?;
        let y = forward(&g, &x, &w);
        Ok((cpu::storage_from_f32(y, s1.dtype())?, Shape::from((g.b, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.stride, self.pad)?;
        // An operand that is not tracked (frozen weight, frozen upstream) gets no gradient and
        // costs no GEMM.
        let dx = if x.track_op() {
            let v = cpu::with_f32(w, |w| cpu::with_f32(dy, |dy| Ok(grad_input(&g, w, dy))))?;
            Some(cpu::tensor_from_f32(v, x.shape().clone(), x.dtype())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let v = cpu::with_f32(x, |x| cpu::with_f32(dy, |dy| Ok(grad_weight(&g, x, dy))))?;
            Some(cpu::tensor_from_f32(v, w.shape().clone(), w.dtype())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// The custom op with the bias fused: `(x, w, b) -> y`; the bias gradient is a chunked
/// per-channel reduction here instead of candle's broadcast-add backward.
pub(crate) struct Conv2dBiasOp {
    pub stride: usize,
    pub pad: usize,
}

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        if s1.dtype() != s2.dtype() {
            bail!("conv2d: input dtype {:?} differs from weight dtype {:?}", s1.dtype(), s2.dtype());
        }
        if l3.dims() != [g.cout] {
            bail!("conv2d: bias shape {:?}, expected [{}]", l3.dims(), g.cout);
        }
        let x = cpu::storage_f32(s1, l1)?;
        let w = cpu::storage_f32(s2, l2)?;
        let b = cpu::storage_f32(s3, l3)?;
        let y = forward_bias(&g, &x, &w, Some(&b));
        Ok((cpu::storage_from_f32(y, s1.dtype())?, Shape::from((g.b, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = Conv2dOp { stride: self.stride, pad: self.pad }.bwd(x, w, y, dy)?;
        let db = if b.track_op() {
            let g = Geom::new(x.dims(), w.dims(), self.stride, self.pad)?;
            let v = cpu::with_f32(dy, |dy| Ok(grad_bias(&g, dy)))?;
            Some(cpu::tensor_from_f32(v, b.shape().clone(), b.dtype())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
