//! Training-loop and objective flags (kohya: add_training_arguments, add_custom_train_arguments,
//! add_masked_loss_arguments, train_db's own flags).

use clap::Args;
use serde::{Deserialize, Serialize};

use super::types::{HuberSchedule, LossType};

/// kohya's default `--max_data_loader_n_workers`.
pub(crate) const DEFAULT_LOADER_WORKERS: u32 = 8;

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Training")]
pub struct TrainingArgs {
    /// Images per batch (the dataset TOML's batch_size wins).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub train_batch_size: u32,
    /// Total optimizer steps.
    #[arg(long, value_name = "N", default_value_t = 1600)]
    pub max_train_steps: u64,
    /// Train this many epochs instead (overrides --max_train_steps).
    #[arg(long, value_name = "N")]
    pub max_train_epochs: Option<u64>,
    /// Batches whose gradients are summed before each optimizer step.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub gradient_accumulation_steps: u64,
    /// Seed of every random stream (data order, augmentation, noise, timesteps).
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// Loss weight of regularization images.
    #[arg(long, value_name = "W", default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Stop training the text encoder at step N (-1: never train it).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub stop_text_encoder_training: Option<i64>,
    /// Encode all images with the VAE once, before training (no per-step augmentation).
    #[arg(long)]
    pub cache_latents: bool,
    /// Cache latents in <image>.sdbooth-latents.safetensors files beside the images (implies
    /// --cache_latents).
    #[arg(long)]
    pub cache_latents_to_disk: bool,
    /// Trust existing latent cache files without checking their contents.
    #[arg(long)]
    pub skip_cache_check: bool,
    /// Images per VAE batch when caching latents.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub vae_batch_size: u32,
    /// Threads that load images.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LOADER_WORKERS)]
    pub max_data_loader_n_workers: u32,
    /// Keep loader threads between epochs.
    #[arg(long)]
    pub persistent_data_loader_workers: bool,
}

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Loss and noise")]
pub struct LossArgs {
    /// Loss function.
    #[arg(long, value_enum, default_value_t = LossType::L2)]
    pub loss_type: LossType,
    /// Huber/smooth L1 parameter schedule over timesteps.
    #[arg(long, value_enum, default_value_t = HuberSchedule::Snr)]
    pub huber_schedule: HuberSchedule,
    /// Huber/smooth L1 decay parameter.
    #[arg(long, value_name = "C", default_value_t = 0.1)]
    pub huber_c: f64,
    /// Huber/smooth L1 scale parameter.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub huber_scale: f64,
    /// Min-SNR weighting gamma (5 is the paper's choice).
    #[arg(long, value_name = "GAMMA")]
    pub min_snr_gamma: Option<f64>,
    /// Scale v-prediction loss like noise-prediction loss.
    #[arg(long)]
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// Add a v-prediction-like loss times this value.
    #[arg(long, value_name = "W")]
    pub v_pred_like_loss: Option<f64>,
    /// Debiased estimation loss weighting.
    #[arg(long)]
    pub debiased_estimation_loss: bool,
    /// Weight the loss with a mask (from --alpha_mask or --conditioning_data_dir).
    #[arg(long)]
    pub masked_loss: bool,
    /// Noise offset (about 0.1 when used).
    #[arg(long, value_name = "X")]
    pub noise_offset: Option<f64>,
    /// Random noise offset strength between 0 and --noise_offset.
    #[arg(long)]
    pub noise_offset_random_strength: bool,
    /// Add mean |latent| times this value to the noise offset.
    #[arg(long, value_name = "X")]
    pub adaptive_noise_scale: Option<f64>,
    /// Multi-resolution (pyramid) noise iterations (6-10 when used).
    #[arg(long, value_name = "N")]
    pub multires_noise_iterations: Option<u32>,
    /// Discount of multi-resolution noise per iteration.
    #[arg(long, value_name = "X", default_value_t = 0.3)]
    pub multires_noise_discount: f64,
    /// Input perturbation noise gamma (about 0.1 when used).
    #[arg(long, value_name = "GAMMA")]
    pub ip_noise_gamma: Option<f64>,
    /// Random input perturbation strength between 0 and --ip_noise_gamma.
    #[arg(long)]
    pub ip_noise_gamma_random_strength: bool,
    /// Rescale betas to zero terminal SNR.
    #[arg(long)]
    pub zero_terminal_snr: bool,
    /// Smallest timestep sampled (0-999).
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(0..=999))]
    pub min_timestep: Option<u32>,
    /// Largest timestep sampled, exclusive (1-1000).
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_timestep: Option<u32>,
}
