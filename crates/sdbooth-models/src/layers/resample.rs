//! diffusers' Downsample2D (stride-2 3x3 conv) and Upsample2D (nearest upsampling + 3x3 conv).

use candle_core::{Device, Tensor};
use sdbooth_ops as ops;

use super::{conv_flops, join, push_conv, ParamShapes};
use crate::params::Weights;
use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum DownsamplePadding {
    /// `padding=1` (U-Net): output `ceil(h / 2)`.
    Symmetric,
    /// `padding=0` (VAE): pad right and bottom by one, then convolve, so the kernel windows
    /// start at pixel 0 like SD's original code.
    RightBottom,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Downsample {
    pub channels: usize,
    pub padding: DownsamplePadding,
}

impl Downsample {
    pub fn params(&self, p: &str) -> ParamShapes {
        let mut v = Vec::new();
        push_conv(&mut v, &join(p, "conv"), self.channels, self.channels, 3);
        v
    }

    pub fn forward(&self, w: &Weights, p: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        let (wt, b) = w.gemm_wb(&join(p, "conv"))?;
        Ok(match self.padding {
            DownsamplePadding::Symmetric => wt.conv2d(x, Some(&b), 2, 1)?,
            DownsamplePadding::RightBottom => {
                let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
                wt.conv2d(&padded, Some(&b), 2, 0)?
            }
        })
    }

    /// Forward FLOPs producing `pixels` output pixels.
    pub fn flops(&self, pixels: f64) -> f64 {
        conv_flops(self.channels, self.channels, 3, pixels)
    }

    /// Output size of an `h x w` input (both paddings give `ceil(h / 2)`).
    pub fn output_size(h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(2), w.div_ceil(2))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Upsample {
    pub channels: usize,
}

impl Upsample {
    pub fn params(&self, p: &str) -> ParamShapes {
        let mut v = Vec::new();
        push_conv(&mut v, &join(p, "conv"), self.channels, self.channels, 3);
        v
    }

    /// Nearest upsampling to `size` (diffusers' `upsample_size`, the skip connection's size), or
    /// 2x when `None`, then the conv.
    pub fn forward(
        &self,
        w: &Weights,
        p: &str,
        x: &Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor, ModelError> {
        let (wt, b) = w.gemm_wb(&join(p, "conv"))?;
        let up = upsample_nearest(x, size)?;
        wt.conv2d(&up, Some(&b), 1, 1)
    }

    /// Forward FLOPs producing `pixels` output pixels.
    pub fn flops(&self, pixels: f64) -> f64 {
        conv_flops(self.channels, self.channels, 3, pixels)
    }
}

/// PyTorch's `F.interpolate(mode="nearest")` of `[B, C, h, w]` to `size` (2x when `None`).
/// An exact 2x takes the ops crate's upsample; any other size gathers rows and columns with
/// `index_select`, whose backward (an `index_add` into the source pixels) candle provides —
/// candle's own nearest upsample has no backward for non-integer factors.
pub(crate) fn upsample_nearest(x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor, ModelError> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
    if (oh, ow) == (2 * h, 2 * w) {
        return Ok(ops::upsample_nearest2x(x)?);
    }
    if oh == 0 || ow == 0 {
        return Err(ModelError::BadInput(format!("cannot upsample {h}x{w} to {oh}x{ow}")));
    }
    let rows = nearest_source_indices(h, oh, x.device())?;
    let cols = nearest_source_indices(w, ow, x.device())?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// Source index of each output index, as PyTorch's `nearest_idx` computes it: the f32 scale
/// `input / output`, `floor(i * scale)` in f32, clamped to the input.
fn nearest_source_indices(input: usize, output: usize, device: &Device) -> Result<Tensor, ModelError> {
    let idx: Vec<u32> = if output == input {
        (0..output as u32).collect()
    } else if output == 2 * input {
        (0..output as u32).map(|i| i >> 1).collect()
    } else {
        let scale = input as f32 / output as f32;
        (0..output).map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32).collect()
    };
    Ok(Tensor::from_vec(idx, output, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn nearest_indices_follow_pytorch() {
        let idx = |i, o| nearest_source_indices(i, o, &Device::Cpu).unwrap().to_vec1::<u32>().unwrap();
        // torch.nn.functional.interpolate(torch.arange(9.).view(1,1,1,9), size=(1,17)).
        assert_eq!(idx(9, 17), vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8]);
        assert_eq!(idx(3, 6), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(idx(4, 4), vec![0, 1, 2, 3]);
    }

    /// The gradient of the sized upsample sums each output pixel's gradient into its source.
    #[test]
    fn sized_upsample_gradient_sums_into_sources() {
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((1, 1, 2, 3)).unwrap(),
        )
        .unwrap();
        let y = upsample_nearest(x.as_tensor(), Some((3, 5))).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3, 5]);
        let g = Tensor::arange(1f32, 16.0, &Device::Cpu).unwrap().reshape((1, 1, 3, 5)).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let got = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Rows 3 -> 2: [0, 0, 1]; columns 5 -> 3: [0, 0, 1, 1, 2] (floor(i * 0.6)).
        let (rows, cols) = ([0usize, 0, 1], [0usize, 0, 1, 1, 2]);
        let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut want = [0f32; 6];
        for (r, &sr) in rows.iter().enumerate() {
            for (c, &sc) in cols.iter().enumerate() {
                want[sr * 3 + sc] += gv[r * 5 + c];
            }
        }
        assert_eq!(got, want.to_vec());
    }
}
