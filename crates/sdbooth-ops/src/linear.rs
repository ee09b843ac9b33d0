//! linear (`x @ wᵀ + b`) on CPU as a candle custom op with its own backward.
//!
//! candle's autograd for `broadcast_matmul(&w.t())` builds the weight gradient through
//! zero-filled buffers and a strided (transposed) add, which made linear's backward 10–15× its
//! forward. Here each product is one GEMM, with `x` flattened to `[M, in]` rows:
//!
//! * forward      `y[M, out]  = x[M, in] · wᵀ[in, out] (+ b per row)`
//! * grad-input   `dx[M, in]  = dy[M, out] · w[out, in]`
//! * grad-weight  `dw[out, in] = dyᵀ[out, M] · x[M, in]`   (written in `[out, in]` layout)
//! * grad-bias    `db[out]    = Σ_rows dy`, summed in fixed row chunks, chunks in order
//!
//! Determinism: gemm never splits the k-sum across threads, and the bias sum is chunked by a
//! fixed row count, so results do not depend on the thread count.

use crate::cpu::{self, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per chunk of the bias-gradient sum (fixed: the sum order must not depend on threads).
const BIAS_ROWS: usize = 64;

/// `(rows, in, out)` for `x[..., in]` and `w[out, in]`, validated.
fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
    let (Some((&k, lead)), &[out, k_w]) = (x.split_last(), w) else {
        bail!("linear: expected x[..., in] and 2-D weight, got {x:?} and {w:?}")
    };
    if k != k_w {
        bail!("linear: input has {k} features but weight expects {k_w}");
    }
    Ok((lead.iter().product(), k, out))
}

fn out_shape(x: &[usize], out: usize) -> Shape {
    let mut s = x.to_vec();
    if let Some(l) = s.last_mut() {
        *l = out;
    }
    Shape::from(s)
}

/// Forward: `y[M, out] = x · wᵀ + b`.
pub fn forward(m: usize, k: usize, n: usize, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if let Some(b) = b {
        y.par_chunks_mut(n).with_min_len(1024usize.div_ceil(n).max(1)).for_each(|r| r.copy_from_slice(b));
    }
    cpu::sgemm(m, n, k, &mut y, n, b.is_some(), Mat::rows(x, k), Mat::transposed(w, k), cpu::par_threads());
    y
}

/// `dx[M, in] = dy[M, out] · w[out, in]`.
pub fn grad_input(m: usize, k: usize, n: usize, w: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; m * k];
    cpu::sgemm(m, k, n, &mut dx, k, false, Mat::rows(dy, n), Mat::rows(w, k), cpu::par_threads());
    dx
}

/// `dw[out, in] = dyᵀ · x`.
pub fn grad_weight(m: usize, k: usize, n: usize, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dw = vec![0f32; n * k];
    cpu::sgemm(n, k, m, &mut dw, k, false, Mat::transposed(dy, n), Mat::rows(x, k), cpu::par_threads());
    dw
}

/// `db[out] = Σ_rows dy[M, out]`, in fixed chunks of rows summed in chunk order.
pub fn grad_bias(n: usize, dy: &[f32]) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(BIAS_ROWS * n.max(1))
        .map(|c| {
            let mut acc = vec![0f32; n];
            for row in c.chunks_exact(n.max(1)) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += *v;
                }
            }
            acc
        })
        .collect();
    let mut db = vec![0f32; n];
    for p in &partials {
        for (a, v) in db.iter_mut().zip(p) {
            *a += *v;
        }
    }
    db
}

fn fwd_impl(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (m, k, n) = dims(xl.dims(), wl.dims())?;
    if xs.dtype() != ws.dtype() {
        bail!("linear: input dtype {:?} differs from weight dtype {:?}", xs.dtype(), ws.dtype());
    }
    let x = cpu::storage_f32(xs, xl)?;
    let w = cpu::storage_f32(ws, wl)?;
    let bias = match b {
        Some((bs, bl)) => {
            if bl.dims() != [n] {
                bail!("linear: bias shape {:?}, expected [{n}]", bl.dims());
            }
            Some(cpu::storage_f32(bs, bl)?)
        }
        None => None,
    };
    let y = forward(m, k, n, &x, &w, bias.as_deref());
    Ok((cpu::storage_from_f32(y, xs.dtype())?, out_shape(xl.dims(), n)))
}

/// Gradients of x and w (skipping untracked operands).
fn bwd_xw(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (m, k, n) = dims(x.dims(), w.dims())?;
    let dx = if x.track_op() {
        let v = cpu::with_f32(w, |w| cpu::with_f32(dy, |dy| Ok(grad_input(m, k, n, w, dy))))?;
        Some(cpu::tensor_from_f32(v, x.shape().clone(), x.dtype())?)
    } else {
        None
    };
    let dw = if w.track_op() {
        let v = cpu::with_f32(x, |x| cpu::with_f32(dy, |dy| Ok(grad_weight(m, k, n, x, dy))))?;
        Some(cpu::tensor_from_f32(v, w.shape().clone(), w.dtype())?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// `x @ wᵀ` (no bias).
pub(crate) struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "sdbooth-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fwd_impl(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        bwd_xw(x, w, dy)
    }
}

/// `x @ wᵀ + b`.
pub(crate) struct LinearBiasOp;

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "sdbooth-linear-bias"
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
        fwd_impl(s1, l1, s2, l2, Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = bwd_xw(x, w, dy)?;
        let db = if b.track_op() {
            let n = b.elem_count();
            let v = cpu::with_f32(dy, |dy| Ok(grad_bias(n, dy)))?;
            Some(cpu::tensor_from_f32(v, b.shape().clone(), b.dtype())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
