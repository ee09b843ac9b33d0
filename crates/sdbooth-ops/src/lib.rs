//! Differentiable ops for Stable Diffusion training, on candle tensors.
//!
//! Every op here has a backward: either it is composed of candle primitives whose backward
//! candle already has, or it is a candle custom op with its own `bwd`. Models call only these
//! functions (never candle-nn's fused ops, which have no backward).
//!
//! Conventions: images are `[B, C, H, W]`; attention tensors are `[B, heads, tokens, head_dim]`;
//! linear weights are `[out, in]` as in PyTorch. Inputs may be f32, bf16 or f16; reductions
//! accumulate in f32 (f64 for norm statistics).
//!
//! On CPU, conv2d, attention, group_norm(+SiLU), layer_norm and softmax run our own kernels
//! (`conv`, `attention`, `norm` modules): their gradients skip untracked operands and their
//! reductions run in fixed chunks, so results do not depend on the thread count. On any other
//! device the same functions fall back to [`reference`], compositions of candle primitives.

mod activation;
mod alloc;
mod attention;
mod conv;
mod cpu;
mod embed;
mod linear;
mod norm;
pub mod reference;

/// The conv2d kernels on raw f32 slices, for the per-pass benches (not a stable API).
#[doc(hidden)]
pub mod kernels {
    pub use crate::conv::{forward as conv2d_forward, grad_input as conv2d_grad_input};
    pub use crate::conv::{grad_weight as conv2d_grad_weight, Geom as Conv2dGeom};
}

pub use activation::{geglu, gelu_erf, quick_gelu, silu};
pub use alloc::tune_allocator;
pub use embed::{embedding, timestep_embedding, upsample_nearest2x};

use candle_core::{Result, Tensor};

/// 2-D convolution, PyTorch semantics (dilation 1, one group). `x` is `[B, Cin, H, W]`, `w` is
/// `[Cout, Cin, kh, kw]`, `b` is `[Cout]`. Any kernel size, stride and padding is accepted; the
/// CPU kernel is tuned for SD's 3x3 (stride 1 and 2, padding 1) and 1x1.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return reference::conv2d(x, w, b, stride, padding);
    }
    tune_allocator();
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, conv::Conv2dBiasOp { stride, pad: padding }),
        None => x.apply_op2(&w, conv::Conv2dOp { stride, pad: padding }),
    }
}

/// FLOPs of one conv2d forward (for benchmarks): `2·B·Cout·Cin·kh·kw·Ho·Wo`.
pub fn conv2d_flops(x_dims: &[usize], w_dims: &[usize], stride: usize, padding: usize) -> Result<f64> {
    Ok(conv::Geom::new(x_dims, w_dims, stride, padding)?.flops())
}

/// `x @ w^T + b` over the last dimension of `x`.
///
/// On CPU one GEMM per product (forward, grad-input, grad-weight written in `[out, in]`), the
/// bias gradient a chunked row sum; untracked operands get no gradient and cost nothing.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return reference::linear(x, w, b);
    }
    tune_allocator();
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, linear::LinearBiasOp),
        None => x.apply_op2(&w, linear::LinearOp),
    }
}

/// Group normalisation over `[B, C, ...]` with per-channel affine parameters.
pub fn group_norm(x: &Tensor, num_groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            norm::GroupNormOp { groups: num_groups, eps, silu: false },
        )
    } else {
        reference::group_norm(x, num_groups, gamma, beta, eps)
    }
}

/// Group normalisation followed by SiLU (the pair every ResNet block uses), fused on CPU.
pub fn group_norm_silu(
    x: &Tensor,
    num_groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            norm::GroupNormOp { groups: num_groups, eps, silu: true },
        )
    } else {
        reference::group_norm_silu(x, num_groups, gamma, beta, eps)
    }
}

/// Layer normalisation over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, norm::LayerNormOp { eps })
    } else {
        reference::layer_norm(x, gamma, beta, eps)
    }
}

/// Numerically stable softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(norm::SoftmaxOp)
    } else {
        reference::softmax_last_dim(x)
    }
}

/// Scaled dot-product attention, scale `1/sqrt(head_dim)`. `q` is `[B, H, N, D]`, `k`/`v` are
/// `[B, H, M, D]`. With `causal`, token i attends to tokens `<= i` (CLIP's mask).
///
/// On CPU this is memory-efficient (tiled online softmax, FlashAttention-2 backward): no N×M
/// score matrix is allocated in forward or backward.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    if q.device().is_cpu() {
        let d = q.dim(candle_core::D::Minus1)?;
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, attention::AttentionOp::new(causal, d))
    } else {
        reference::attention(q, k, v, causal)
    }
}

/// FLOPs of one attention forward (for benchmarks): `2·B·H·N·M·(D + Dv)` (causal counted full).
pub fn attention_flops(b: usize, h: usize, n: usize, m: usize, d: usize) -> f64 {
    4.0 * (b * h * n * m * d) as f64
}
