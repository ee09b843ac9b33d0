//! diffusers' Transformer2DModel with one BasicTransformerBlock, as the SD U-Net uses it:
//! GroupNorm, `proj_in` (1x1 conv in SD1, linear in SD2), self-attention, cross-attention to the
//! text, GEGLU feed-forward (each pre-LayerNorm with a residual), `proj_out`, residual.

use candle_core::Tensor;
use sdbooth_ops as ops;

use super::attention::{Attention, DIFFUSERS_NAMES};
use super::{conv_flops, join, linear_flops, push_conv, push_linear, push_norm, ParamShapes};
use crate::params::Weights;
use crate::ModelError;

/// diffusers' Transformer2DModel hard-codes this GroupNorm eps (its LayerNorms use `norm_eps`).
const GROUP_NORM_EPS: f64 = 1e-6;
/// BasicTransformerBlock's LayerNorm eps (diffusers' default `norm_eps` for SD checkpoints).
const LAYER_NORM_EPS: f64 = 1e-5;
const BLOCK: &str = "transformer_blocks.0";

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Transformer2D {
    pub channels: usize,
    pub heads: usize,
    /// Width of the text embeddings (cross-attention keys/values).
    pub ctx_dim: usize,
    /// SD2: linear `proj_in`/`proj_out`; SD1: 1x1 convolutions.
    pub linear_projection: bool,
    pub groups: usize,
}

impl Transformer2D {
    fn self_attention(&self) -> Attention {
        let c = self.channels;
        Attention {
            dim: c,
            kv_dim: c,
            heads: self.heads,
            qkv_bias: false,
            causal: false,
            names: DIFFUSERS_NAMES,
        }
    }

    fn cross_attention(&self) -> Attention {
        Attention { kv_dim: self.ctx_dim, ..self.self_attention() }
    }

    fn push_proj(&self, v: &mut ParamShapes, name: &str) {
        let c = self.channels;
        if self.linear_projection {
            push_linear(v, name, c, c, true);
        } else {
            push_conv(v, name, c, c, 1);
        }
    }

    pub fn params(&self, p: &str) -> ParamShapes {
        let c = self.channels;
        let b = join(p, BLOCK);
        let mut v = Vec::new();
        push_norm(&mut v, &join(p, "norm"), c);
        self.push_proj(&mut v, &join(p, "proj_in"));
        push_norm(&mut v, &join(&b, "norm1"), c);
        v.extend(self.self_attention().params(&join(&b, "attn1")));
        push_norm(&mut v, &join(&b, "norm2"), c);
        v.extend(self.cross_attention().params(&join(&b, "attn2")));
        push_norm(&mut v, &join(&b, "norm3"), c);
        // GEGLU: one projection to [value, gate], inner width 4c.
        push_linear(&mut v, &join(&b, "ff.net.0.proj"), 8 * c, c, true);
        push_linear(&mut v, &join(&b, "ff.net.2"), c, 4 * c, true);
        self.push_proj(&mut v, &join(p, "proj_out"));
        v
    }

    /// `x` `[B, C, h, w]`, `ctx` `[B, tokens, ctx_dim]` (in the compute dtype) → `[B, C, h, w]`.
    pub fn forward(&self, w: &Weights, p: &str, x: &Tensor, ctx: &Tensor) -> Result<Tensor, ModelError> {
        let c = self.channels;
        let (b, _, hh, ww) = x.dims4()?;
        let (nw, nb) = w.wb(&join(p, "norm"))?;
        let h = ops::group_norm(x, self.groups, &nw, &nb, GROUP_NORM_EPS)?;
        let (piw, pib) = w.gemm_wb(&join(p, "proj_in"))?;
        let to_tokens = |t: &Tensor| -> candle_core::Result<Tensor> {
            ops::contiguous(&t.permute((0, 2, 3, 1))?)?.reshape((b, hh * ww, c))
        };
        let h = if self.linear_projection {
            piw.linear(&to_tokens(&h)?, Some(&pib))?
        } else {
            to_tokens(&piw.conv2d(&h, Some(&pib), 1, 0)?)?
        };
        let h = self.basic_block(w, &join(p, BLOCK), &h, ctx)?;
        let (pow_, pob) = w.gemm_wb(&join(p, "proj_out"))?;
        let to_image =
            |t: &Tensor| -> candle_core::Result<Tensor> { t.reshape((b, hh, ww, c))?.permute((0, 3, 1, 2)) };
        let h = if self.linear_projection {
            to_image(&pow_.linear(&h, Some(&pob))?)?
        } else {
            pow_.conv2d(&ops::contiguous(&to_image(&h)?)?, Some(&pob), 1, 0)?
        };
        Ok(ops::add(&h, x)?)
    }

    /// BasicTransformerBlock: self-attention, cross-attention to the text, GEGLU feed-forward,
    /// each pre-LayerNorm with a residual.
    fn basic_block(&self, w: &Weights, p: &str, x: &Tensor, ctx: &Tensor) -> Result<Tensor, ModelError> {
        let layer_norm = |name: &str, x: &Tensor| -> Result<Tensor, ModelError> {
            let (g, b) = w.wb(&join(p, name))?;
            Ok(ops::layer_norm(x, &g, &b, LAYER_NORM_EPS)?)
        };
        let n = layer_norm("norm1", x)?;
        let x = ops::add(&self.self_attention().forward(w, &join(p, "attn1"), &n, &n)?, x)?;
        let n = layer_norm("norm2", &x)?;
        let x = ops::add(&self.cross_attention().forward(w, &join(p, "attn2"), &n, ctx)?, &x)?;
        let n = layer_norm("norm3", &x)?;
        let (fw, fb) = w.gemm_wb(&join(p, "ff.net.0.proj"))?;
        // GELU's arithmetic follows the layer's precision (vectorised erf under bf16 compute).
        let f = ops::geglu_with(&fw.linear(&n, Some(&fb))?, fw.precision())?;
        let (ow, ob) = w.gemm_wb(&join(p, "ff.net.2"))?;
        Ok(ops::add(&ow.linear(&f, Some(&ob))?, &x)?)
    }

    /// Forward FLOPs at `pixels` pixels with `ctx_tokens` text tokens.
    pub fn flops(&self, pixels: f64, ctx_tokens: f64) -> f64 {
        let c = self.channels;
        let proj =
            if self.linear_projection { linear_flops(c, c, pixels) } else { conv_flops(c, c, 1, pixels) };
        2.0 * proj
            + self.self_attention().flops(pixels, pixels)
            + self.cross_attention().flops(pixels, ctx_tokens)
            + linear_flops(8 * c, c, pixels)
            + linear_flops(c, 4 * c, pixels)
    }
}
