//! conv2d from candle tensor ops, for every device without conv kernels of this crate (CUDA; the
//! CPU under `SDBOOTH_REFERENCE_OPS`), with a backward of our own instead of candle's, whose
//! input gradient on CUDA is a naive `conv_transpose2d` kernel (no cuBLAS, no cuDNN).
//!
//! - Forward: candle's conv2d (on CUDA: cuDNN with the `cudnn` feature, else im2col + cuBLAS).
//! - Input gradient: a stride-1 convolution of the output gradient with the flipped, transposed
//!   kernel, the output gradient first dilated by the stride (zeros between its rows and columns)
//!   and padded so the result has exactly the input's size (also when `H + 2p − k` is not a
//!   multiple of the stride, where candle's own backward mis-sizes it).
//! - Weight gradient: im2col of the input from tensor ops (one strided window per kernel tap)
//!   and one batched GEMM with the output gradient, summed over the batch.
//!
//! The forward runs on detached tensors and [`GenericConv2d`] attaches it to the graph; the bias
//! is a broadcast add whose gradient candle's autograd gives.

use super::Geom;
use crate::backend::{grad_if, Precomputed};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};

/// conv2d (PyTorch semantics, see [`crate::conv2d`]) composed of candle tensor ops.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let geom = Geom::new(x.dims(), w.dims(), stride, padding)?;
    if x.dtype() != w.dtype() {
        bail!("conv2d: input dtype {:?} differs from weight dtype {:?}", x.dtype(), w.dtype());
    }
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    let y = if x.track_op() || w.track_op() {
        x.apply_op2(w, GenericConv2d { geom, out: Precomputed::new(y) })?
    } else {
        y
    };
    match b {
        Some(b) => {
            if b.dims() != [geom.cout] {
                bail!("conv2d: bias has shape {:?}, expected [{}]", b.dims(), geom.cout);
            }
            y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, geom.cout, 1, 1))?)
        }
        None => Ok(y),
    }
}

/// Input gradient `[B, Cin, H, W]` of a convolution from the weight and the output gradient.
pub fn grad_input(g: &Geom, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dilated = dilate(&dilate(dy, 2, g.stride)?, 3, g.stride)?;
    // Output row t (padded row t + p) sums dy[o]·w[i] over o·s + i = t + p: a valid
    // correlation with the flipped kernel after k − 1 − p leading rows; the trailing rows make its
    // length the input's.
    let fit = |t: Tensor, dim: usize, size: usize, k: usize| -> Result<Tensor> {
        let before = k as isize - 1 - g.pad as isize;
        let after = (size + g.pad) as isize - t.dim(dim)? as isize;
        pad_or_crop(&t, dim, before, after)
    };
    let dy_fit = fit(fit(dilated, 2, g.h, g.kh)?, 3, g.w, g.kw)?;
    let w_flipped = flip(&flip(w, 2)?, 3)?.transpose(0, 1)?.contiguous()?;
    dy_fit.contiguous()?.conv2d(&w_flipped, 0, 1, 1, 1)
}

/// Weight gradient `[Cout, Cin, kh, kw]` of a convolution from the input and the output
/// gradient, summed over the batch.
pub fn grad_weight(g: &Geom, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let cols = im2col(g, x)?; // [B, Cin·kh·kw, P]
    let dy = dy.contiguous()?.reshape((g.b, g.cout, g.p()))?;
    let per_image = dy.matmul(&cols.t()?)?; // [B, Cout, Cin·kh·kw]
    let dw = if g.b == 1 {
        per_image.squeeze(0)?
    } else {
        let wide = if per_image.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        per_image.to_dtype(wide)?.sum(0)?.to_dtype(per_image.dtype())?
    };
    dw.reshape((g.cout, g.cin, g.kh, g.kw))
}

/// The column matrix `[B, Cin·kh·kw, Ho·Wo]` of the zero-padded input: row `(c, i, j)` holds
/// the input pixels kernel tap `(i, j)` of channel `c` meets at each output position.
fn im2col(g: &Geom, x: &Tensor) -> Result<Tensor> {
    if g.is_pointwise() {
        return x.contiguous()?.reshape((g.b, g.cin, g.p()));
    }
    let padded = x.pad_with_zeros(2, g.pad, g.pad)?.pad_with_zeros(3, g.pad, g.pad)?;
    let mut taps = Vec::with_capacity(g.kh * g.kw);
    for i in 0..g.kh {
        let rows = every_nth(&padded, 2, i, g.ho, g.stride)?;
        for j in 0..g.kw {
            taps.push(every_nth(&rows, 3, j, g.wo, g.stride)?);
        }
    }
    Tensor::stack(&taps, 2)?.reshape((g.b, g.k(), g.p()))
}

/// `count` slices of `t` along `dim`, starting at `start`, `step` apart.
fn every_nth(t: &Tensor, dim: usize, start: usize, count: usize, step: usize) -> Result<Tensor> {
    if step == 1 {
        return t.narrow(dim, start, count);
    }
    // Take count·step slices (zero-padding the far end if the tensor is shorter), fold them into
    // [count, step] and keep the first of each step.
    let want = count * step;
    let available = t.dim(dim)? - start;
    let span = if available >= want {
        t.narrow(dim, start, want)?
    } else {
        t.narrow(dim, start, available)?.pad_with_zeros(dim, 0, want - available)?
    };
    let mut folded = span.dims().to_vec();
    folded[dim] = count;
    folded.insert(dim + 1, step);
    span.contiguous()?.reshape(folded)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// `stride − 1` zeros between consecutive slices of `t` along `dim`.
fn dilate(t: &Tensor, dim: usize, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(t.clone());
    }
    let n = t.dim(dim)?;
    let mut merged = t.dims().to_vec();
    merged[dim] = n * stride;
    t.unsqueeze(dim + 1)?.pad_with_zeros(dim + 1, 0, stride - 1)?.reshape(merged)?.narrow(
        dim,
        0,
        (n - 1) * stride + 1,
    )
}

/// Pads `before`/`after` zeros along `dim`, or crops where they are negative.
fn pad_or_crop(t: &Tensor, dim: usize, before: isize, after: isize) -> Result<Tensor> {
    let crop_start = before.min(0).unsigned_abs();
    let crop_end = after.min(0).unsigned_abs();
    let len = t.dim(dim)?;
    if crop_start + crop_end > len {
        bail!(
            "conv2d: backward crops {crop_start}+{crop_end} of {len} rows (padding larger than the kernel)"
        );
    }
    t.narrow(dim, crop_start, len - crop_start - crop_end)?.pad_with_zeros(
        dim,
        before.max(0) as usize,
        after.max(0) as usize,
    )
}

/// `t` reversed along `dim`.
fn flip(t: &Tensor, dim: usize) -> Result<Tensor> {
    let n = t.dim(dim)?;
    let reversed = Tensor::from_vec((0..n as u32).rev().collect::<Vec<_>>(), n, t.device())?;
    t.contiguous()?.index_select(&reversed, dim)
}

/// Attaches candle's conv2d forward of `(x, w)` to the graph; its backward is [`grad_input`] and
/// [`grad_weight`] for the tracked operands.
struct GenericConv2d {
    geom: Geom,
    out: Precomputed,
}

impl candle_core::CustomOp2 for GenericConv2d {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d-generic"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda(self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        let (x, w, dy) = (x.detach(), w.detach(), dy.detach());
        Ok((
            grad_if(want_x, || grad_input(&self.geom, &w, &dy))?,
            grad_if(want_w, || grad_weight(&self.geom, &x, &dy))?,
        ))
    }
}
