//! diffusers' ResnetBlock2D (output_scale_factor 1, no dropout): GroupNorm + SiLU, 3x3 conv,
//! the projected time embedding added per channel (U-Net only), GroupNorm + SiLU, 3x3 conv, and
//! the residual through a 1x1 `conv_shortcut` where the channel count changes.

use candle_core::Tensor;
use sdbooth_ops as ops;

use super::{conv_flops, join, linear_flops, push_conv, push_linear, push_norm, ParamShapes};
use crate::params::Weights;
use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Resnet {
    pub cin: usize,
    pub cout: usize,
    /// Width of the time embedding (U-Net); `None` for the VAE's blocks, which have none.
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl Resnet {
    fn shortcut(&self) -> bool {
        // diffusers' use_in_shortcut.
        self.cin != self.cout
    }

    pub fn params(&self, p: &str) -> ParamShapes {
        let (cin, cout) = (self.cin, self.cout);
        let mut v = Vec::new();
        push_norm(&mut v, &join(p, "norm1"), cin);
        push_conv(&mut v, &join(p, "conv1"), cout, cin, 3);
        if let Some(temb) = self.temb {
            push_linear(&mut v, &join(p, "time_emb_proj"), cout, temb, true);
        }
        push_norm(&mut v, &join(p, "norm2"), cout);
        push_conv(&mut v, &join(p, "conv2"), cout, cout, 3);
        if self.shortcut() {
            push_conv(&mut v, &join(p, "conv_shortcut"), cout, cin, 1);
        }
        v
    }

    /// `x` `[B, cin, h, w]`, `emb` `[B, temb]` (U-Net) → `[B, cout, h, w]`.
    pub fn forward(
        &self,
        w: &Weights,
        p: &str,
        x: &Tensor,
        emb: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let (g, eps) = (self.groups, self.eps);
        let (n1w, n1b) = w.wb(&join(p, "norm1"))?;
        let (c1w, c1b) = w.gemm_wb(&join(p, "conv1"))?;
        let h = ops::group_norm_silu(x, g, &n1w, &n1b, eps)?;
        let mut h = c1w.conv2d(&h, Some(&c1b), 1, 1)?;
        if let Some(emb) = emb {
            let (tw, tb) = w.gemm_wb(&join(p, "time_emb_proj"))?;
            let t = tw.linear(&ops::silu(emb)?, Some(&tb))?;
            let (b, c) = t.dims2()?;
            h = h.broadcast_add(&t.reshape((b, c, 1, 1))?)?;
        }
        let (n2w, n2b) = w.wb(&join(p, "norm2"))?;
        let (c2w, c2b) = w.gemm_wb(&join(p, "conv2"))?;
        let h = ops::group_norm_silu(&h, g, &n2w, &n2b, eps)?;
        let h = c2w.conv2d(&h, Some(&c2b), 1, 1)?;
        let x = if self.shortcut() {
            let (sw, sb) = w.gemm_wb(&join(p, "conv_shortcut"))?;
            sw.conv2d(x, Some(&sb), 1, 0)?
        } else {
            x.clone()
        };
        Ok(ops::add(&x, &h)?)
    }

    /// Forward FLOPs (convolutions and the time projection) at `pixels` pixels.
    pub fn flops(&self, pixels: f64) -> f64 {
        let (cin, cout) = (self.cin, self.cout);
        let mut f = conv_flops(cout, cin, 3, pixels) + conv_flops(cout, cout, 3, pixels);
        if let Some(temb) = self.temb {
            f += linear_flops(cout, temb, 1.0);
        }
        if self.shortcut() {
            f += conv_flops(cout, cin, 1, pixels);
        }
        f
    }
}
