//! AutoencoderKL (diffusers' `AutoencoderKL`, `Encoder`/`Decoder` of models/autoencoders/vae.py)
//! with diffusers' parameter names: the encoder turns training images into latents (kohya's
//! `vae.encode(images).latent_dist.sample() * 0.18215`), the decoder turns sampled latents back
//! into images.
//!
//! The VAE is frozen in DreamBooth training, so [`Vae::encode`] and [`Vae::decode`] use detached
//! parameter views: no autograd graph is recorded and each activation is freed as soon as the
//! next one exists, which is what keeps a 512 px encode small. [`Vae::encode_tracked`] and
//! [`Vae::decode_tracked`] record a graph for gradient tests.

use candle_core::{DType, Tensor};
use sdbooth_ops as ops;

use crate::config::VaeConfig;
use crate::params::Weights;
use crate::{ModelError, ParamStore};

/// diffusers builds every VAE norm (ResNet blocks, mid-block attention, conv_norm_out) with 1e-6.
const EPS: f64 = 1e-6;

/// Parameter names and shapes of the whole VAE (encoder, quant_conv, post_quant_conv, decoder).
pub fn param_shapes(cfg: &VaeConfig) -> Vec<(String, Vec<usize>)> {
    let mut s = Shapes(Vec::new());
    let boc = &cfg.block_out_channels;
    let (first, last) = (boc[0], boc[boc.len() - 1]);
    let latent = cfg.latent_channels;

    s.conv("encoder.conv_in", cfg.in_channels, first, 3);
    let mut cin = first;
    for (i, &cout) in boc.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            s.resnet(&format!("encoder.down_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { cout }, cout);
        }
        if i + 1 < boc.len() {
            s.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), cout, cout, 3);
        }
        cin = cout;
    }
    s.mid("encoder.mid_block", last);
    s.norm("encoder.conv_norm_out", last);
    s.conv("encoder.conv_out", last, 2 * latent, 3);
    s.conv("quant_conv", 2 * latent, 2 * latent, 1);

    s.conv("post_quant_conv", latent, latent, 1);
    s.conv("decoder.conv_in", latent, last, 3);
    s.mid("decoder.mid_block", last);
    let mut cin = last;
    for (i, &cout) in boc.iter().rev().enumerate() {
        for j in 0..cfg.layers_per_block + 1 {
            s.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { cout }, cout);
        }
        if i + 1 < boc.len() {
            s.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), cout, cout, 3);
        }
        cin = cout;
    }
    s.norm("decoder.conv_norm_out", first);
    s.conv("decoder.conv_out", first, cfg.out_channels, 3);
    s.0
}

struct Shapes(Vec<(String, Vec<usize>)>);

impl Shapes {
    fn wb(&mut self, p: &str, w: Vec<usize>, b: usize) {
        self.0.push((format!("{p}.weight"), w));
        self.0.push((format!("{p}.bias"), vec![b]));
    }
    fn conv(&mut self, p: &str, cin: usize, cout: usize, k: usize) {
        self.wb(p, vec![cout, cin, k, k], cout);
    }
    fn norm(&mut self, p: &str, c: usize) {
        self.wb(p, vec![c], c);
    }
    fn resnet(&mut self, p: &str, cin: usize, cout: usize) {
        self.norm(&format!("{p}.norm1"), cin);
        self.conv(&format!("{p}.conv1"), cin, cout, 3);
        self.norm(&format!("{p}.norm2"), cout);
        self.conv(&format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{p}.conv_shortcut"), cin, cout, 1);
        }
    }
    fn mid(&mut self, p: &str, c: usize) {
        self.resnet(&format!("{p}.resnets.0"), c, c);
        let a = format!("{p}.attentions.0");
        self.norm(&format!("{a}.group_norm"), c);
        for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
            self.wb(&format!("{a}.{proj}"), vec![c, c], c);
        }
        self.resnet(&format!("{p}.resnets.1"), c, c);
    }
}

/// The encoder's posterior, a diagonal Gaussian over the (unscaled) latents.
#[derive(Clone, Debug)]
pub struct LatentDist {
    /// `[B, latent, H/f, W/f]`.
    pub mean: Tensor,
    /// log-variance clamped to [-30, 20], as diffusers' `DiagonalGaussianDistribution`.
    pub logvar: Tensor,
    /// `exp(logvar / 2)`.
    pub std: Tensor,
}

impl LatentDist {
    /// `mean + std * noise` (diffusers' `latent_dist.sample()` with the given standard-normal
    /// noise, which comes from the caller's seeded stream), unscaled.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor, ModelError> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + self.std.mul(&noise)?)?)
    }
}

/// The VAE for one configuration; the weights live in a [`ParamStore`].
#[derive(Clone, Debug)]
pub struct Vae {
    cfg: VaeConfig,
}

impl Vae {
    pub fn new(cfg: &VaeConfig) -> Self {
        Vae { cfg: cfg.clone() }
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        param_shapes(&self.cfg)
    }

    /// Pixel size per latent pixel (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.cfg.block_out_channels.len() - 1)
    }

    fn groups(&self) -> usize {
        self.cfg.norm_num_groups
    }

    fn conv(
        &self,
        w: &Weights,
        p: &str,
        x: &Tensor,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor, ModelError> {
        let (wt, b) = w.wb(p)?;
        Ok(ops::conv2d(x, &wt, Some(&b), stride, pad)?)
    }

    fn norm_silu(&self, w: &Weights, p: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        let (g, b) = w.wb(p)?;
        Ok(ops::group_norm_silu(x, self.groups(), &g, &b, EPS)?)
    }

    /// diffusers' ResnetBlock2D without a time embedding (output_scale_factor 1, no dropout).
    fn resnet(&self, w: &Weights, p: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        let h = self.norm_silu(w, &format!("{p}.norm1"), x)?;
        let h = self.conv(w, &format!("{p}.conv1"), &h, 1, 1)?;
        let h = self.norm_silu(w, &format!("{p}.norm2"), &h)?;
        let h = self.conv(w, &format!("{p}.conv2"), &h, 1, 1)?;
        // diffusers' use_in_shortcut: a 1x1 conv where the channel count changes.
        let skip = if x.dim(1)? != h.dim(1)? {
            self.conv(w, &format!("{p}.conv_shortcut"), x, 1, 0)?
        } else {
            x.clone()
        };
        Ok((skip + h)?)
    }

    /// The mid-block attention: one head over all pixels, group-normed input, residual.
    fn attention(&self, w: &Weights, p: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        let (b, c, h, wd) = x.dims4()?;
        let (g, beta) = w.wb(&format!("{p}.group_norm"))?;
        let t = ops::group_norm(x, self.groups(), &g, &beta, EPS)?;
        let t = t.reshape((b, c, h * wd))?.transpose(1, 2)?.contiguous()?;
        let proj = |name: &str| -> Result<Tensor, ModelError> {
            let (wt, bias) = w.wb(&format!("{p}.{name}"))?;
            Ok(ops::linear(&t, &wt, Some(&bias))?.unsqueeze(1)?.contiguous()?)
        };
        let (q, k, v) = (proj("to_q")?, proj("to_k")?, proj("to_v")?);
        let a = ops::attention(&q, &k, &v, false)?.squeeze(1)?;
        let (wt, bias) = w.wb(&format!("{p}.to_out.0"))?;
        let o = ops::linear(&a, &wt, Some(&bias))?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, wd))?;
        Ok((x + o)?)
    }

    fn mid(&self, w: &Weights, p: &str, x: &Tensor) -> Result<Tensor, ModelError> {
        let x = self.resnet(w, &format!("{p}.resnets.0"), x)?;
        let x = self.attention(w, &format!("{p}.attentions.0"), &x)?;
        self.resnet(w, &format!("{p}.resnets.1"), &x)
    }

    fn check(&self, x: &Tensor, channels: usize, multiple: usize, what: &str) -> Result<(), ModelError> {
        let (_, c, h, wd) = x.dims4()?;
        if c != channels || h % multiple != 0 || wd % multiple != 0 || h == 0 || wd == 0 {
            return Err(ModelError::BadInput(format!(
                "VAE {what} must be [B, {channels}, h, w] with h and w positive multiples of {multiple}, got {:?}",
                x.dims()
            )));
        }
        Ok(())
    }

    fn run_encoder(&self, w: &Weights, images: &Tensor) -> Result<LatentDist, ModelError> {
        self.check(images, self.cfg.in_channels, self.downscale_factor(), "images")?;
        let boc = &self.cfg.block_out_channels;
        let mut x = self.conv(w, "encoder.conv_in", &w.input(images, "encoder.conv_in.weight")?, 1, 1)?;
        for i in 0..boc.len() {
            for j in 0..self.cfg.layers_per_block {
                x = self.resnet(w, &format!("encoder.down_blocks.{i}.resnets.{j}"), &x)?;
            }
            if i + 1 < boc.len() {
                // diffusers' Downsample2D with padding=0: pad right and bottom by one, then a
                // stride-2 conv, so the kernel windows start at pixel 0 like SD's original code.
                let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
                x = self.conv(w, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), &padded, 2, 0)?;
            }
        }
        let x = self.mid(w, "encoder.mid_block", &x)?;
        let x = self.norm_silu(w, "encoder.conv_norm_out", &x)?;
        let x = self.conv(w, "encoder.conv_out", &x, 1, 1)?;
        let moments = self.conv(w, "quant_conv", &x, 1, 0)?;
        let l = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f64, 20f64)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, logvar, std })
    }

    fn run_decoder(&self, w: &Weights, latents: &Tensor) -> Result<Tensor, ModelError> {
        self.check(latents, self.cfg.latent_channels, 1, "latents")?;
        let boc = &self.cfg.block_out_channels;
        let z = self.conv(w, "post_quant_conv", &w.input(latents, "post_quant_conv.weight")?, 1, 0)?;
        let x = self.conv(w, "decoder.conv_in", &z, 1, 1)?;
        let mut x = self.mid(w, "decoder.mid_block", &x)?;
        for i in 0..boc.len() {
            for j in 0..self.cfg.layers_per_block + 1 {
                x = self.resnet(w, &format!("decoder.up_blocks.{i}.resnets.{j}"), &x)?;
            }
            if i + 1 < boc.len() {
                let up = ops::upsample_nearest2x(&x)?;
                x = self.conv(w, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), &up, 1, 1)?;
            }
        }
        let x = self.norm_silu(w, "decoder.conv_norm_out", &x)?;
        self.conv(w, "decoder.conv_out", &x, 1, 1)
    }

    /// Posterior of `images` `[B, 3, H, W]` in [-1, 1] (H, W multiples of 8), with detached
    /// parameters (no graph), computed in `dtype` when given (else the parameters' dtype).
    pub fn encode(
        &self,
        params: &ParamStore,
        images: &Tensor,
        dtype: Option<DType>,
    ) -> Result<LatentDist, ModelError> {
        self.run_encoder(&Weights { params, track: false, dtype }, images)
    }

    /// Images `[B, 3, 8h, 8w]` (roughly in [-1, 1], not clamped) from unscaled latents
    /// `[B, 4, h, w]` (`scaled / scaling_factor`), detached parameters, in `dtype` when given.
    pub fn decode(
        &self,
        params: &ParamStore,
        latents: &Tensor,
        dtype: Option<DType>,
    ) -> Result<Tensor, ModelError> {
        self.run_decoder(&Weights { params, track: false, dtype }, latents)
    }

    /// Training latents as kohya caches them: `(mean + std * noise) * scaling_factor`.
    /// `noise` is standard normal with the latents' shape `[B, 4, H/8, W/8]`.
    pub fn encode_to_latents(
        &self,
        params: &ParamStore,
        images: &Tensor,
        noise: &Tensor,
        dtype: Option<DType>,
    ) -> Result<Tensor, ModelError> {
        let dist = self.encode(params, images, dtype)?;
        Ok((dist.sample(noise)? * self.cfg.scaling_factor)?)
    }

    /// Images from scaled latents (what the U-Net and samplers work with): decodes
    /// `latents / scaling_factor`.
    pub fn decode_latents(
        &self,
        params: &ParamStore,
        latents: &Tensor,
        dtype: Option<DType>,
    ) -> Result<Tensor, ModelError> {
        self.decode(params, &(latents / self.cfg.scaling_factor)?, dtype)
    }

    /// As [`encode`](Self::encode), recording an autograd graph over the tracked parameters
    /// (and `images` if it is a `Var`).
    pub fn encode_tracked(&self, params: &ParamStore, images: &Tensor) -> Result<LatentDist, ModelError> {
        self.run_encoder(&Weights { params, track: true, dtype: None }, images)
    }

    /// As [`decode`](Self::decode), recording an autograd graph.
    pub fn decode_tracked(&self, params: &ParamStore, latents: &Tensor) -> Result<Tensor, ModelError> {
        self.run_decoder(&Weights { params, track: true, dtype: None }, latents)
    }
}
