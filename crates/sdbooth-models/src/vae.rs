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
use crate::layers::attention::ImageSelfAttention;
use crate::layers::resample::{Downsample, DownsamplePadding, Upsample};
use crate::layers::resnet::Resnet;
use crate::layers::{join, push_conv, push_norm, ParamShapes};
use crate::params::Weights;
use crate::{ModelError, ParamStore};

/// diffusers builds every VAE norm (ResNet blocks, mid-block attention, conv_norm_out) with 1e-6.
const EPS: f64 = 1e-6;

/// Parameter names and shapes of the whole VAE (encoder, quant_conv, post_quant_conv, decoder).
pub fn param_shapes(cfg: &VaeConfig) -> ParamShapes {
    Vae::new(cfg).param_shapes()
}

/// Refuses an image size the VAE cannot encode or decode to: width and height must be positive
/// multiples of its downscale factor (8 for SD). Any such size works end to end (the U-Net takes
/// every latent size). Callers say where the size came from (prompt line, flag, TOML key).
pub fn check_image_size(cfg: &VaeConfig, width: usize, height: usize) -> Result<(), ModelError> {
    let factor = downscale_factor(cfg);
    if width == 0 || height == 0 || !width.is_multiple_of(factor) || !height.is_multiple_of(factor) {
        return Err(ModelError::BadInput(format!(
            "image size {width}x{height} must be a positive multiple of {factor} (the VAE works on \
             {factor}x{factor} pixel blocks)"
        )));
    }
    Ok(())
}

/// [`check_image_size`] for a size read before the model is loaded (a prompt file, `--W`/`--H`,
/// a dataset's `resolution`), so a run that could never produce it is refused before it starts.
/// Every Stable Diffusion 1.x/2.x VAE has SD's downscale factor (8); a model with another VAE is
/// checked against its own when the size is used. Sides above [`MAX_IMAGE_SIDE`] are refused too.
pub fn check_image_size_before_loading(width: usize, height: usize) -> Result<(), ModelError> {
    check_image_side_limit(width, height)?;
    check_image_size(&crate::config::ModelConfig::sd1().vae, width, height)
}

/// The largest image side sdbooth generates, in pixels. The VAE decoder's last stage holds 128
/// channels at full size: 128 x 8192 x 8192 f32 values are 32 GiB for one activation, beyond
/// any GPU's memory together with the rest of the decoder, so a larger size could only fail
/// (or exhaust memory) after the model is loaded. 4096 px samples (4x SD2's 768) still work.
pub const MAX_IMAGE_SIDE: usize = 8192;

/// Refuses an image side above [`MAX_IMAGE_SIDE`], saying why there is a limit.
pub fn check_image_side_limit(width: usize, height: usize) -> Result<(), ModelError> {
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(ModelError::BadInput(format!(
            "image size {width}x{height} is too large: each side must be at most {MAX_IMAGE_SIDE} \
             pixels (the VAE decoder alone would need 128 x W x H floats, 32 GiB at \
             {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE})"
        )));
    }
    Ok(())
}

fn downscale_factor(cfg: &VaeConfig) -> usize {
    1 << (cfg.block_out_channels.len() - 1)
}

/// One step of the encoder or decoder chain.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// A stride-1 `k x k` convolution (padding `k / 2`).
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
    },
    Resnet(Resnet),
    Attention(ImageSelfAttention),
    Down(Downsample),
    Up(Upsample),
    /// `conv_norm_out` + SiLU.
    NormSilu {
        channels: usize,
        groups: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
struct Stage {
    prefix: String,
    step: Step,
}

impl Stage {
    fn params(&self) -> ParamShapes {
        let p = self.prefix.as_str();
        let mut v = Vec::new();
        match &self.step {
            Step::Conv { cin, cout, k } => push_conv(&mut v, p, *cout, *cin, *k),
            Step::Resnet(layer) => return layer.params(p),
            Step::Attention(layer) => return layer.params(p),
            Step::Down(layer) => return layer.params(p),
            Step::Up(layer) => return layer.params(p),
            Step::NormSilu { channels, .. } => push_norm(&mut v, p, *channels),
        }
        v
    }

    fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor, ModelError> {
        let p = self.prefix.as_str();
        match &self.step {
            Step::Conv { k, .. } => {
                let (wt, b) = w.gemm_wb(p)?;
                Ok(wt.conv2d(x, Some(&b), 1, k / 2)?)
            }
            Step::Resnet(layer) => layer.forward(w, p, x, None),
            Step::Attention(layer) => layer.forward(w, p, x),
            Step::Down(layer) => layer.forward(w, p, x),
            Step::Up(layer) => layer.forward(w, p, x, None),
            Step::NormSilu { groups, .. } => {
                let (g, b) = w.wb(p)?;
                Ok(ops::group_norm_silu(x, *groups, &g, &b, EPS)?)
            }
        }
    }
}

/// diffusers' `Encoder` + `quant_conv` and `post_quant_conv` + `Decoder`, as chains of stages.
fn build_chains(cfg: &VaeConfig) -> (Vec<Stage>, Vec<Stage>) {
    let boc = &cfg.block_out_channels;
    let (first, last) = (boc[0], boc[boc.len() - 1]);
    let latent = cfg.latent_channels;
    let groups = cfg.norm_num_groups;
    let stage = |prefix: String, step: Step| Stage { prefix, step };
    let resnet =
        |p: String, cin, cout| stage(p, Step::Resnet(Resnet { cin, cout, temb: None, groups, eps: EPS }));
    let mid = |chain: &mut Vec<Stage>, p: &str| {
        chain.push(resnet(join(p, "resnets.0"), last, last));
        let attn = ImageSelfAttention { channels: last, groups, eps: EPS };
        chain.push(stage(join(p, "attentions.0"), Step::Attention(attn)));
        chain.push(resnet(join(p, "resnets.1"), last, last));
    };

    let mut enc =
        vec![stage("encoder.conv_in".into(), Step::Conv { cin: cfg.in_channels, cout: first, k: 3 })];
    let mut cin = first;
    for (i, &cout) in boc.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            enc.push(resnet(
                format!("encoder.down_blocks.{i}.resnets.{j}"),
                if j == 0 { cin } else { cout },
                cout,
            ));
        }
        if i + 1 < boc.len() {
            let d = Downsample { channels: cout, padding: DownsamplePadding::RightBottom };
            enc.push(stage(format!("encoder.down_blocks.{i}.downsamplers.0"), Step::Down(d)));
        }
        cin = cout;
    }
    mid(&mut enc, "encoder.mid_block");
    enc.push(stage("encoder.conv_norm_out".into(), Step::NormSilu { channels: last, groups }));
    enc.push(stage("encoder.conv_out".into(), Step::Conv { cin: last, cout: 2 * latent, k: 3 }));
    enc.push(stage("quant_conv".into(), Step::Conv { cin: 2 * latent, cout: 2 * latent, k: 1 }));

    let mut dec = vec![
        stage("post_quant_conv".into(), Step::Conv { cin: latent, cout: latent, k: 1 }),
        stage("decoder.conv_in".into(), Step::Conv { cin: latent, cout: last, k: 3 }),
    ];
    mid(&mut dec, "decoder.mid_block");
    let mut cin = last;
    for (i, &cout) in boc.iter().rev().enumerate() {
        for j in 0..cfg.layers_per_block + 1 {
            dec.push(resnet(
                format!("decoder.up_blocks.{i}.resnets.{j}"),
                if j == 0 { cin } else { cout },
                cout,
            ));
        }
        if i + 1 < boc.len() {
            let u = Upsample { channels: cout };
            dec.push(stage(format!("decoder.up_blocks.{i}.upsamplers.0"), Step::Up(u)));
        }
        cin = cout;
    }
    dec.push(stage("decoder.conv_norm_out".into(), Step::NormSilu { channels: first, groups }));
    dec.push(stage("decoder.conv_out".into(), Step::Conv { cin: first, cout: cfg.out_channels, k: 3 }));
    (enc, dec)
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
    encoder: Vec<Stage>,
    decoder: Vec<Stage>,
}

impl Vae {
    pub fn new(cfg: &VaeConfig) -> Self {
        let (encoder, decoder) = build_chains(cfg);
        Vae { cfg: cfg.clone(), encoder, decoder }
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn param_shapes(&self) -> ParamShapes {
        self.encoder.iter().chain(&self.decoder).flat_map(Stage::params).collect()
    }

    /// Pixel size per latent pixel (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        downscale_factor(&self.cfg)
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
        let mut x = w.input(images, "encoder.conv_in.weight")?;
        for stage in &self.encoder {
            x = stage.forward(w, &x)?;
        }
        let l = self.cfg.latent_channels;
        let mean = x.narrow(1, 0, l)?;
        let logvar = x.narrow(1, l, l)?.clamp(-30f64, 20f64)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, logvar, std })
    }

    fn run_decoder(&self, w: &Weights, latents: &Tensor) -> Result<Tensor, ModelError> {
        self.check(latents, self.cfg.latent_channels, 1, "latents")?;
        let mut x = w.input(latents, "post_quant_conv.weight")?;
        for stage in &self.decoder {
            x = stage.forward(w, &x)?;
        }
        Ok(x)
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
