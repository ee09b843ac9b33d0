//! A whole Stable Diffusion model in memory: configuration plus the three parameter stores, and
//! the builtin models (`builtin:tiny-sd1`, ...) created from a seed.

use crate::init::random_params;
use crate::{clip, unet, vae, BuiltinModel, ModelConfig, ModelError, ParamStore};

/// A Stable Diffusion model: U-Net, text encoder and VAE under diffusers' names.
#[derive(Clone)]
pub struct StableDiffusion {
    pub config: ModelConfig,
    pub unet: ParamStore,
    pub text_encoder: ParamStore,
    pub vae: ParamStore,
}

impl StableDiffusion {
    /// Checks every part against the configuration's expected names and shapes; lists all
    /// problems of all parts.
    pub fn check_shapes(&self) -> Result<(), ModelError> {
        let mut problems = Vec::new();
        let parts = [
            ("unet", &self.unet, unet::param_shapes(&self.config.unet)),
            ("text_encoder", &self.text_encoder, clip::param_shapes(&self.config.text)),
            ("vae", &self.vae, vae::param_shapes(&self.config.vae)),
        ];
        for (part, store, shapes) in parts {
            if let Err(ModelError::ShapeMismatch(p)) = store.check_shapes(&shapes) {
                problems.extend(p.into_iter().map(|s| format!("{part}: {s}")));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::ShapeMismatch(problems))
        }
    }
}

/// Builds a builtin model with seeded random weights (init.rs's generator). Each part gets its
/// own seed derived from the model's, so the three stores are independent streams; values do
/// not depend on the machine or thread count.
pub fn random_model(b: &BuiltinModel) -> Result<StableDiffusion, ModelError> {
    let cfg = &b.config;
    Ok(StableDiffusion {
        config: cfg.clone(),
        unet: random_params(&unet::param_shapes(&cfg.unet), b.seed)?,
        text_encoder: random_params(&clip::param_shapes(&cfg.text), b.seed.wrapping_add(1))?,
        vae: random_params(&vae::param_shapes(&cfg.vae), b.seed.wrapping_add(2))?,
    })
}
