//! Compute of each U-Net node, as diffusers' ResnetBlock2D, Transformer2DModel (one
//! BasicTransformerBlock), Downsample2D, Upsample2D and the time embedding do it.

use candle_core::{DType, Tensor};
use sdbooth_ops as ops;

use super::{Node, NodeKind};
use crate::config::UNetConfig;
pub(crate) use crate::params::Weights;
use crate::ModelError;

/// diffusers' Transformer2DModel hard-codes this GroupNorm eps (its LayerNorms use `norm_eps`).
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;
/// BasicTransformerBlock's LayerNorm eps (diffusers' default `norm_eps` for SD checkpoints).
const LAYER_NORM_EPS: f64 = 1e-5;

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Runs one node on its input slot values.
pub(crate) fn run_node(
    cfg: &UNetConfig,
    node: &Node,
    w: &Weights,
    inputs: &[Tensor],
) -> Result<Tensor, ModelError> {
    let p = node.prefix.as_str();
    match node.kind {
        NodeKind::TimeEmbed => time_embed(cfg, w, &inputs[0]),
        NodeKind::ConvIn => {
            let (wt, b) = w.wb("conv_in")?;
            Ok(ops::conv2d(&w.cast(&inputs[0])?, &wt, Some(&b), 1, 1)?)
        }
        NodeKind::Resnet { cin, cout, skip } => {
            let x = if skip { Tensor::cat(&[&inputs[0], &inputs[1]], 1)? } else { inputs[0].clone() };
            let emb = &inputs[inputs.len() - 1];
            resnet(cfg, w, p, &x, emb, cin != cout)
        }
        NodeKind::Transformer { channels, heads } => {
            transformer(cfg, w, p, &inputs[0], &w.cast(&inputs[1])?, channels, heads)
        }
        NodeKind::Downsample { .. } => {
            let (wt, b) = w.wb(&join(p, "conv"))?;
            Ok(ops::conv2d(&inputs[0], &wt, Some(&b), 2, 1)?)
        }
        NodeKind::Upsample { .. } => {
            let (wt, b) = w.wb(&join(p, "conv"))?;
            let up = ops::upsample_nearest2x(&inputs[0])?;
            Ok(ops::conv2d(&up, &wt, Some(&b), 1, 1)?)
        }
        NodeKind::Out => {
            let (g, b) = w.wb("conv_norm_out")?;
            let h = ops::group_norm_silu(&inputs[0], cfg.norm_num_groups, &g, &b, cfg.norm_eps)?;
            let (wt, b) = w.wb("conv_out")?;
            // The loss is taken in f32 whatever the compute dtype (kohya: `noise_pred.float()`).
            Ok(ops::conv2d(&h, &wt, Some(&b), 1, 1)?.to_dtype(DType::F32)?)
        }
    }
}

fn time_embed(cfg: &UNetConfig, w: &Weights, t: &Tensor) -> Result<Tensor, ModelError> {
    let c0 = cfg.block_out_channels[0];
    // The sinusoids are computed in f32 and then cast, as diffusers does.
    let e = ops::timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift)?;
    let e = w.cast(&e)?;
    let (w1, b1) = w.wb("time_embedding.linear_1")?;
    let (w2, b2) = w.wb("time_embedding.linear_2")?;
    let h = ops::silu(&ops::linear(&e, &w1, Some(&b1))?)?;
    Ok(ops::linear(&h, &w2, Some(&b2))?)
}

fn resnet(
    cfg: &UNetConfig,
    w: &Weights,
    p: &str,
    x: &Tensor,
    emb: &Tensor,
    shortcut: bool,
) -> Result<Tensor, ModelError> {
    let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
    let (n1w, n1b) = w.wb(&join(p, "norm1"))?;
    let (c1w, c1b) = w.wb(&join(p, "conv1"))?;
    let h = ops::group_norm_silu(x, g, &n1w, &n1b, eps)?;
    let h = ops::conv2d(&h, &c1w, Some(&c1b), 1, 1)?;
    let (tw, tb) = w.wb(&join(p, "time_emb_proj"))?;
    let t = ops::linear(&ops::silu(emb)?, &tw, Some(&tb))?;
    let (b, c) = t.dims2()?;
    let h = h.broadcast_add(&t.reshape((b, c, 1, 1))?)?;
    let (n2w, n2b) = w.wb(&join(p, "norm2"))?;
    let (c2w, c2b) = w.wb(&join(p, "conv2"))?;
    let h = ops::group_norm_silu(&h, g, &n2w, &n2b, eps)?;
    let h = ops::conv2d(&h, &c2w, Some(&c2b), 1, 1)?;
    let x = if shortcut {
        let (sw, sb) = w.wb(&join(p, "conv_shortcut"))?;
        ops::conv2d(x, &sw, Some(&sb), 1, 0)?
    } else {
        x.clone()
    };
    Ok((x + h)?)
}

fn transformer(
    cfg: &UNetConfig,
    w: &Weights,
    p: &str,
    x: &Tensor,
    ctx: &Tensor,
    c: usize,
    heads: usize,
) -> Result<Tensor, ModelError> {
    let (b, _, hh, ww) = x.dims4()?;
    let (nw, nb) = w.wb(&join(p, "norm"))?;
    let h = ops::group_norm(x, cfg.norm_num_groups, &nw, &nb, TRANSFORMER_GROUP_NORM_EPS)?;
    let (piw, pib) = w.wb(&join(p, "proj_in"))?;
    let to_tokens =
        |t: &Tensor| -> candle_core::Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, hh * ww, c)) };
    let h = if cfg.use_linear_projection {
        ops::linear(&to_tokens(&h)?, &piw, Some(&pib))?
    } else {
        to_tokens(&ops::conv2d(&h, &piw, Some(&pib), 1, 0)?)?
    };
    let h = basic_block(w, &join(p, "transformer_blocks.0"), &h, ctx, heads)?;
    let (pow_, pob) = w.wb(&join(p, "proj_out"))?;
    let to_image =
        |t: &Tensor| -> candle_core::Result<Tensor> { t.reshape((b, hh, ww, c))?.permute((0, 3, 1, 2)) };
    let h = if cfg.use_linear_projection {
        to_image(&ops::linear(&h, &pow_, Some(&pob))?)?
    } else {
        ops::conv2d(&to_image(&h)?.contiguous()?, &pow_, Some(&pob), 1, 0)?
    };
    Ok((h + x)?)
}

fn layer_norm(w: &Weights, name: &str, x: &Tensor) -> Result<Tensor, ModelError> {
    let (g, b) = w.wb(name)?;
    Ok(ops::layer_norm(x, &g, &b, LAYER_NORM_EPS)?)
}

/// BasicTransformerBlock: self-attention, cross-attention to the text, GEGLU feed-forward,
/// each pre-LayerNorm with a residual.
fn basic_block(w: &Weights, p: &str, x: &Tensor, ctx: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let n = layer_norm(w, &join(p, "norm1"), x)?;
    let x = (attention(w, &join(p, "attn1"), &n, &n, heads)? + x)?;
    let n = layer_norm(w, &join(p, "norm2"), &x)?;
    let x = (attention(w, &join(p, "attn2"), &n, ctx, heads)? + x)?;
    let n = layer_norm(w, &join(p, "norm3"), &x)?;
    let (fw, fb) = w.wb(&join(p, "ff.net.0.proj"))?;
    let f = ops::geglu(&ops::linear(&n, &fw, Some(&fb))?)?;
    let (ow, ob) = w.wb(&join(p, "ff.net.2"))?;
    Ok((ops::linear(&f, &ow, Some(&ob))? + x)?)
}

/// diffusers' Attention with AttnProcessor2_0 (no bias on q/k/v, bias on to_out.0).
fn attention(w: &Weights, p: &str, x: &Tensor, ctx: &Tensor, heads: usize) -> Result<Tensor, ModelError> {
    let (b, n, c) = x.dims3()?;
    let m = ctx.dim(1)?;
    let d = c / heads;
    let q = ops::linear(x, &w.get(&join(p, "to_q.weight"))?, None)?;
    let k = ops::linear(ctx, &w.get(&join(p, "to_k.weight"))?, None)?;
    let v = ops::linear(ctx, &w.get(&join(p, "to_v.weight"))?, None)?;
    let split = |t: Tensor, len: usize| t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous();
    let o = ops::attention(&split(q, n)?, &split(k, m)?, &split(v, m)?, false)?;
    let o = o.transpose(1, 2)?.reshape((b, n, c))?;
    let (ow, ob) = w.wb(&join(p, "to_out.0"))?;
    Ok(ops::linear(&o, &ow, Some(&ob))?)
}
