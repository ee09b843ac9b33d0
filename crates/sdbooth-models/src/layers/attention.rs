//! Multi-head attention with q/k/v/out projections — diffusers' `Attention` (AttnProcessor2_0)
//! in the U-Net's transformer blocks and the VAE's mid block, transformers' `CLIPAttention` in
//! the text encoder — and the VAE's group-normed pixel self-attention around it.

use candle_core::Tensor;
use sdbooth_ops as ops;

use super::{join, linear_flops, push_linear, push_norm, ParamShapes};
use crate::params::Weights;
use crate::ModelError;

/// Projection names: diffusers' (`to_q`, `to_k`, `to_v`, `to_out.0`).
pub(crate) const DIFFUSERS_NAMES: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
/// Projection names: transformers' CLIP (`q_proj`, `k_proj`, `v_proj`, `out_proj`).
pub(crate) const CLIP_NAMES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Attention {
    /// Query and output width.
    pub dim: usize,
    /// Width of the keys/values source (`dim` for self-attention, the text width for cross).
    pub kv_dim: usize,
    pub heads: usize,
    /// Bias on q/k/v (the output projection always has one).
    pub qkv_bias: bool,
    /// Token i sees tokens <= i (CLIP).
    pub causal: bool,
    pub names: [&'static str; 4],
}

impl Attention {
    pub fn params(&self, p: &str) -> ParamShapes {
        let [q, k, v, o] = self.names;
        let mut out = Vec::new();
        push_linear(&mut out, &join(p, q), self.dim, self.dim, self.qkv_bias);
        push_linear(&mut out, &join(p, k), self.dim, self.kv_dim, self.qkv_bias);
        push_linear(&mut out, &join(p, v), self.dim, self.kv_dim, self.qkv_bias);
        push_linear(&mut out, &join(p, o), self.dim, self.dim, true);
        out
    }

    fn project(&self, w: &Weights, name: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        if self.qkv_bias {
            let (wt, b) = w.gemm_wb(name)?;
            wt.linear(x, Some(&b))
        } else {
            w.gemm_weight(&format!("{name}.weight"))?.linear(x, None)
        }
    }

    /// `x` `[B, N, dim]` attends to `ctx` `[B, M, kv_dim]` (pass `x` for self-attention).
    pub fn forward(&self, w: &Weights, p: &str, x: &Tensor, ctx: &Tensor) -> Result<Tensor, ModelError> {
        let [qn, kn, vn, on] = self.names;
        let (b, n, c) = x.dims3()?;
        let m = ctx.dim(1)?;
        let (heads, d) = (self.heads, c / self.heads);
        // Parallel copies (`ops::contiguous`): candle copies strided tensors on one thread.
        let split = |t: Tensor, len: usize| ops::contiguous(&t.reshape((b, len, heads, d))?.transpose(1, 2)?);
        let q = split(self.project(w, &join(p, qn), x)?, n)?;
        let k = split(self.project(w, &join(p, kn), ctx)?, m)?;
        let v = split(self.project(w, &join(p, vn), ctx)?, m)?;
        let (ow, ob) = w.gemm_wb(&join(p, on))?;
        // The scores and the weighted sum in the precision of the projections (bf16 under
        // `--mixed_precision bf16` with f32 activations, as autocast runs attention).
        let o = ops::attention_with(&q, &k, &v, self.causal, ow.precision())?;
        let o = ops::contiguous(&o.transpose(1, 2)?)?.reshape((b, n, c))?;
        ow.linear(&o, Some(&ob))
    }

    /// Forward FLOPs for `n` queries over `m` keys: the four projections, the scores and the
    /// weighted sum (causal masking is not discounted).
    pub fn flops(&self, n: f64, m: f64) -> f64 {
        let (c, kv) = (self.dim, self.kv_dim);
        2.0 * linear_flops(c, c, n) + 2.0 * linear_flops(c, kv, m) + 4.0 * n * m * c as f64
    }
}

/// The VAE mid block's attention: GroupNorm, one head over all pixels, residual.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ImageSelfAttention {
    pub channels: usize,
    pub groups: usize,
    pub eps: f64,
}

impl ImageSelfAttention {
    fn attention(&self) -> Attention {
        let c = self.channels;
        Attention { dim: c, kv_dim: c, heads: 1, qkv_bias: true, causal: false, names: DIFFUSERS_NAMES }
    }

    pub fn params(&self, p: &str) -> ParamShapes {
        let mut v = Vec::new();
        push_norm(&mut v, &join(p, "group_norm"), self.channels);
        v.extend(self.attention().params(p));
        v
    }

    pub fn forward(&self, w: &Weights, p: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        let (b, c, h, wd) = x.dims4()?;
        let (g, beta) = w.wb(&join(p, "group_norm"))?;
        let t = ops::group_norm(x, self.groups, &g, &beta, self.eps)?;
        let t = ops::contiguous(&t.reshape((b, c, h * wd))?.transpose(1, 2)?)?;
        let o = self.attention().forward(w, p, &t, &t)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, wd))?;
        Ok((x + o)?)
    }
}
