//! Differentiable ops for Stable Diffusion training, on candle tensors.
//!
//! Every op here has a backward: either it is composed of candle primitives whose backward
//! candle already has, or it is a candle custom op with its own `bwd`. Models call only these
//! functions (never candle-nn's fused ops, which have no backward).
//!
//! Conventions: images are `[B, C, H, W]`; attention tensors are `[B, heads, tokens, head_dim]`;
//! linear weights are `[out, in]` as in PyTorch. Inputs may be f32, bf16 or f16; reductions
//! accumulate in f32.

use candle_core::{DType, Result, Tensor, D};

/// 2-D convolution, PyTorch semantics. `w` is `[out, in, kh, kw]`, `b` is `[out]`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let y = x.conv2d(w, padding, stride, 1, 1)?;
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

fn to_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}

/// Group normalisation over `[B, C, ...]` with per-channel affine parameters.
pub fn group_norm(x: &Tensor, num_groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let xf = to_f32(x)?.reshape((b, num_groups, ()))?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = c;
    let y = normed
        .broadcast_mul(&to_f32(gamma)?.reshape(affine_shape.as_slice())?)?
        .broadcast_add(&to_f32(beta)?.reshape(affine_shape.as_slice())?)?;
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

/// Layer normalisation over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = to_f32(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(&to_f32(gamma)?)?.broadcast_add(&to_f32(beta)?)?.to_dtype(dtype)
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

/// GELU with the exact erf formulation (PyTorch's default `gelu`).
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
    let half = x.dim(D::Minus1)? / 2;
    let value = x.narrow(D::Minus1, 0, half)?;
    let gate = x.narrow(D::Minus1, half, half)?;
    value.mul(&gelu_erf(&gate)?)
}

/// Row lookup: `ids` (u32, any shape) into `table` `[vocab, dim]`.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
}

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(h * 2, w * 2)
}

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding`.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let exponent: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - downscale_freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?;
    let args = to_f32(t)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[&cos, &sin], 1)? } else { Tensor::cat(&[&sin, &cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}
