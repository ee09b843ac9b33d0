//! Stable Diffusion models with diffusers' parameter names: U-Net, CLIP text encoders, VAE,
//! the DDPM training schedule, and the architecture configs (real and tiny).

pub mod clip;
pub mod config;
pub mod ddpm;
pub mod init;
mod layers;
pub mod params;
pub mod sd;
mod tape;
pub mod unet;
pub mod vae;

pub use clip::{ClipTape, ClipTextModel, ClipTrainOptions};
pub use config::{builtin, BuiltinModel, ModelConfig, Prediction};
pub use layers::ParamShapes;
pub use params::ParamStore;
pub use sd::{random_model, StableDiffusion};
pub use tape::GradHook;
pub use unet::{TrainOptions, UNet, UNetGrads, UNetTape};
pub use vae::{LatentDist, Vae};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing parameter {0}")]
    MissingParam(String),
    #[error("parameters do not match the architecture:\n  {}", .0.join("\n  "))]
    ShapeMismatch(Vec<String>),
    /// Inputs of the wrong shape or kind (latent size, gradient shape, timestep index).
    #[error("bad input: {0}")]
    BadInput(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
