//! Stable Diffusion models with diffusers' parameter names: U-Net, CLIP text encoders, VAE,
//! the DDPM training schedule, and the architecture configs (real and tiny).

pub mod config;
pub mod params;

pub use config::{builtin, BuiltinModel, ModelConfig, Prediction};
pub use params::ParamStore;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing parameter {0}")]
    MissingParam(String),
    #[error("parameters do not match the architecture:\n  {}", .0.join("\n  "))]
    ShapeMismatch(Vec<String>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
