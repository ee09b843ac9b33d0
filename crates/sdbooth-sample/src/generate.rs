//! Text-to-image with classifier-free guidance: the pipeline `sdbooth generate` and training
//! samples share. Images are PNGs with an A1111-style `parameters` text chunk.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use sdbooth_data::tokenizer::ClipTokenizer;
use sdbooth_models::ddpm::DdpmSchedule;
use sdbooth_models::vae::check_image_size;
use sdbooth_models::{ClipTextModel, ModelConfig, ParamStore, UNet, Vae};

use crate::prompts::PromptSpec;
use crate::schedulers::{sampler_for_schedule, PredictionType};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Invalid(String),
    #[error("model: {0}")]
    Model(#[from] sdbooth_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    Write { path: String, message: String },
}

type Result<T> = std::result::Result<T, GenerateError>;

/// A fully specified request (defaults applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scale: f64,
    pub seed: u64,
    pub sampler: String,
}

impl Request {
    /// Fills a prompt-file entry's gaps from `defaults`.
    pub fn from_spec(spec: &PromptSpec, defaults: &Request) -> Request {
        Request {
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone().unwrap_or_else(|| defaults.negative_prompt.clone()),
            width: spec.width.unwrap_or(defaults.width),
            height: spec.height.unwrap_or(defaults.height),
            steps: spec.steps.unwrap_or(defaults.steps),
            scale: spec.scale.unwrap_or(defaults.scale),
            seed: spec.seed.unwrap_or(defaults.seed),
            sampler: defaults.sampler.clone(),
        }
    }

    /// A1111's `parameters` text: prompt, negative prompt, then the settings line.
    pub fn a1111_parameters(&self, model_name: &str) -> String {
        let mut s = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            s.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            a1111_sampler_name(&self.sampler),
            self.scale,
            self.seed,
            self.width,
            self.height,
            model_name
        ));
        s
    }
}

/// A1111's display name for a kohya sampler name.
fn a1111_sampler_name(name: &str) -> &str {
    match name {
        "ddim" => "DDIM",
        "pndm" => "PLMS",
        "lms" | "k_lms" => "LMS",
        "euler" | "k_euler" => "Euler",
        "euler_a" | "k_euler_a" => "Euler a",
        "heun" => "Heun",
        "dpm_2" | "k_dpm_2" => "DPM2",
        "dpm_2_a" | "k_dpm_2_a" => "DPM2 a",
        "dpmsolver" => "DPM-Solver",
        "dpmsolver++" => "DPM++ 2M",
        "dpmsingle" => "DPM++ 2S",
        other => other,
    }
}

/// The parts of a model that generation uses, borrowed from the caller.
pub struct Pipeline<'a> {
    pub config: &'a ModelConfig,
    pub unet: &'a ParamStore,
    pub text_encoder: &'a ParamStore,
    pub vae: &'a ParamStore,
    pub tokenizer: &'a ClipTokenizer,
    pub v_prediction: bool,
    /// The noise schedule the samplers step on (the trainer's during training).
    pub schedule: &'a DdpmSchedule,
    pub clip_skip: Option<usize>,
    pub max_token_length: Option<usize>,
    pub dtype: Option<DType>,
    /// Where the weights are and the image is computed.
    pub device: &'a Device,
}

impl Pipeline<'_> {
    fn encode(&self, text: &str) -> Result<Tensor> {
        let windows = self
            .tokenizer
            .tokenize_for_training(text, self.max_token_length, false)
            .map_err(|e| GenerateError::Invalid(format!("prompt {text:?}: {e}")))?;
        let n = windows.len();
        let flat: Vec<u32> = windows.into_iter().flatten().collect();
        let ids = if n == 1 {
            Tensor::from_vec(flat, (1, 77), self.device)?
        } else {
            Tensor::from_vec(flat, (1, n, 77), self.device)?
        };
        let te = ClipTextModel::new(&self.config.text);
        Ok(te.encode(self.text_encoder, &ids, self.clip_skip, self.dtype)?)
    }

    /// Generates one image: RGB bytes, `width × height × 3`.
    pub fn generate(&self, req: &Request) -> Result<Vec<u8>> {
        check_image_size(&self.config.vae, req.width, req.height)
            .map_err(|e| GenerateError::Invalid(e.to_string()))?;
        let factor = 1 << (self.config.vae.block_out_channels.len() - 1);
        let prediction =
            if self.v_prediction { PredictionType::VPrediction } else { PredictionType::Epsilon };
        let mut sampler = sampler_for_schedule(&req.sampler, req.steps, prediction, self.schedule)
            .map_err(GenerateError::Invalid)?;
        let cond = self.encode(&req.prompt)?;
        let uncond = self.encode(&req.negative_prompt)?;
        // Equal lengths for the guided batch (long prompts: pad the shorter with its last state).
        let ctx = Tensor::cat(&[&uncond, &cond], 0)?;
        let (h, w) = (req.height / factor, req.width / factor);
        let mut rng = ChaCha8Rng::seed_from_u64(req.seed);
        let shape = [1, self.config.unet.in_channels, h, w];
        let mut normal = |shape: &[usize]| -> candle_core::Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
            Tensor::from_vec(v, shape, self.device)
        };
        let mut x = (normal(&shape)? * sampler.init_noise_sigma())?;
        let unet = UNet::new(&self.config.unet);
        for i in 0..sampler.timesteps().len() {
            let t = sampler.timesteps()[i];
            let input = sampler.scale_model_input(&x, i)?;
            let both = Tensor::cat(&[&input, &input], 0)?;
            let ts = Tensor::new(&[t as f32, t as f32], self.device)?;
            let out = unet.forward_frozen(self.unet, &both, &ts, &ctx, self.dtype)?.to_dtype(DType::F32)?;
            let (u, c) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
            let guided = (&u + ((c - &u)? * req.scale)?)?;
            x = sampler.step(&guided, i, &x, &mut normal)?;
        }
        let vae = Vae::new(&self.config.vae);
        let image = vae.decode_latents(self.vae, &x, None)?.to_dtype(DType::F32)?;
        // [-1, 1] → bytes, HWC.
        let image = ((image.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()?;
        let chw = image.squeeze(0)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
        Ok(chw.into_iter().map(|v| v as u8).collect())
    }
}

/// Writes an RGB PNG with A1111's `parameters` text chunk, atomically.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8], parameters: &str) -> Result<()> {
    let err = |m: String| GenerateError::Write { path: path.display().to_string(), message: m };
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk("parameters".into(), parameters.into()).map_err(|e| err(e.to_string()))?;
        let mut w = enc.write_header().map_err(|e| err(e.to_string()))?;
        w.write_image_data(rgb).map_err(|e| err(e.to_string()))?;
    }
    sdbooth_checkpoint::atomic_write_bytes(path, &bytes).map_err(|e| err(e.to_string()))
}
