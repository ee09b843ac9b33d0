//! Reference implementations composed of candle primitives (candle's autograd gives their
//! backward). They run on every device: the public ops use them on devices without kernels of
//! this crate (and on the CPU under `SDBOOTH_REFERENCE_OPS`, see [`crate::reference_ops_forced`]),
//! and the tests use them as the naive baseline the custom CPU kernels must match. Attention here
//! materialises the full score matrix: O(N·M) memory.

use candle_core::{DType, Result, Tensor, D};

/// 2-D convolution, PyTorch semantics. `w` is `[out, in, kh, kw]`, `b` is `[out]`.
///
/// Padding is applied explicitly (and trimmed to the rows/columns the kernel actually reads):
/// candle 0.11's own conv2d backward mis-sizes the input gradient when `H + 2p − k` is not a
/// multiple of the stride (e.g. SD's stride-2 downsamplers on even sizes), because it derives
/// the transposed-conv output size without the remainder. With an exact-fit input it is right.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        candle_core::bail!(
            "conv2d: kernel {kh}x{kw} / stride {stride} do not fit input {h}x{wd} (padding {padding})"
        );
    }
    let fit = |x: Tensor, dim: usize, size: usize, k: usize| -> Result<Tensor> {
        let out = (size + 2 * padding - k) / stride + 1;
        let needed = (out - 1) * stride + k;
        let x = x.pad_with_zeros(dim, padding, 0)?;
        // Rows past `needed` are never read: drop them; otherwise pad the far side to fit.
        if needed <= size + padding {
            x.narrow(dim, 0, needed)
        } else {
            x.pad_with_zeros(dim, 0, needed - size - padding)
        }
    };
    let xp = fit(fit(x.clone(), 2, h, kh)?, 3, wd, kw)?;
    let y = xp.conv2d(w, 0, stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// `x @ w^T + b` over the last dimension of `x`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Half-precision inputs are computed in f32; f32 and f64 stay as they are (the tests run the
/// reference in f64 as the exact baseline).
fn widen(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Group normalisation over `[B, C, ...]` with per-channel affine parameters.
pub fn group_norm(x: &Tensor, num_groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let (b, c) = match dims.as_slice() {
        [b, c, ..] => (*b, *c),
        _ => candle_core::bail!("group_norm: input must be [B, C, ...], got {dims:?}"),
    };
    let xf = widen(x)?.reshape((b, num_groups, ()))?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = c;
    let y = normed
        .broadcast_mul(&widen(gamma)?.reshape(affine_shape.as_slice())?)?
        .broadcast_add(&widen(beta)?.reshape(affine_shape.as_slice())?)?;
    y.to_dtype(dtype)
}

/// Group normalisation followed by SiLU (the pair every ResNet block uses).
pub fn group_norm_silu(
    x: &Tensor,
    num_groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    silu(&group_norm(x, num_groups, gamma, beta, eps)?)
}

/// GELU with the exact erf formulation.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// CLIP's `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let sigmoid = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    x.mul(&sigmoid)
}

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// GEGLU: the last dimension holds `[value, gate]`; returns `value * gelu(gate)`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let full = x.dim(D::Minus1)?;
    if full % 2 != 0 {
        candle_core::bail!("geglu: last dimension {full} is odd; it must hold [value, gate] halves");
    }
    let half = full / 2;
    let value = x.narrow(D::Minus1, 0, half)?;
    let gate = x.narrow(D::Minus1, half, half)?;
    value.mul(&gelu_erf(&gate)?)
}

/// Layer normalisation over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = widen(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(&widen(gamma)?)?.broadcast_add(&widen(beta)?)?.to_dtype(dtype)
}

/// Numerically stable softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Scaled dot-product attention, scale `1/sqrt(head_dim)`. `q` is `[B, H, N, D]`, `k`/`v` are
/// `[B, H, M, D]`. With `causal`, token i attends to tokens `<= i` (CLIP's mask).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = if causal {
        let n = q.dim(2)?;
        let m = k.dim(2)?;
        let mask: Vec<f32> =
            (0..n).flat_map(|i| (0..m).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (n, m), q.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
}
