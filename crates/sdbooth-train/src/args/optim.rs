//! Optimizer, schedule, precision and memory flags (kohya: add_optimizer_arguments and the
//! precision/attention part of add_training_arguments).

use clap::Args;
use serde::{Deserialize, Serialize};

use super::types::{MixedPrecision, StepsOrRatio};

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Optimizer")]
pub struct OptimizerArgs {
    /// Optimizer: AdamW (default), AdamW8bit, Lion, SGDNesterov, AdaFactor, ...
    #[arg(long, value_name = "NAME", default_value = "")]
    pub optimizer_type: String,
    /// Learning rate.
    #[arg(long, value_name = "LR", default_value_t = 2e-6)]
    pub learning_rate: f64,
    /// Text encoder learning rate (default: --learning_rate).
    #[arg(long, value_name = "LR")]
    pub learning_rate_te: Option<f64>,
    /// Extra optimizer arguments, e.g. weight_decay=0.01 betas=0.9,0.999.
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub optimizer_args: Vec<String>,
    /// Gradient clipping norm (0: no clipping).
    #[arg(long, value_name = "NORM", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Old form of --optimizer_type AdamW8bit.
    #[arg(long)]
    pub use_8bit_adam: bool,
    /// Old form of --optimizer_type Lion.
    #[arg(long)]
    pub use_lion_optimizer: bool,
    /// Update each block's weights as soon as its gradients are ready (no full gradient buffer).
    #[arg(long)]
    pub fused_backward_pass: bool,
    /// LR schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, ...
    #[arg(long, value_name = "NAME", default_value = "constant")]
    pub lr_scheduler: String,
    /// Warmup steps, or a ratio of the total steps (0.1 or 10%).
    #[arg(long, value_name = "N|RATIO", default_value = "0")]
    pub lr_warmup_steps: StepsOrRatio,
    /// Decay steps, or a ratio of the total steps (0.1 or 10%).
    #[arg(long, value_name = "N|RATIO", default_value = "0")]
    pub lr_decay_steps: StepsOrRatio,
    /// Restarts of cosine_with_restarts.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub lr_scheduler_num_cycles: u32,
    /// Power of the polynomial schedule.
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub lr_scheduler_power: f64,
    /// Timescale of inverse_sqrt (default: the warmup steps).
    #[arg(long, value_name = "N")]
    pub lr_scheduler_timescale: Option<u64>,
    /// Minimum LR as a ratio of the initial LR (cosine_with_min_lr, warmup_stable_decay).
    #[arg(long, value_name = "RATIO")]
    pub lr_scheduler_min_lr_ratio: Option<f64>,
    /// A custom scheduler class (Python module path in kohya).
    #[arg(long, value_name = "CLASS", default_value = "")]
    pub lr_scheduler_type: String,
    /// Extra scheduler arguments, e.g. T_max=100.
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub lr_scheduler_args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Memory and precision")]
pub struct MemoryArgs {
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = MixedPrecision::No)]
    pub mixed_precision: MixedPrecision,
    /// Weights and gradients in fp16.
    #[arg(long)]
    pub full_fp16: bool,
    /// Weights and gradients in bf16 (updates with stochastic rounding).
    #[arg(long)]
    pub full_bf16: bool,
    /// Recompute activations in backward to save memory.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Memory-efficient attention.
    #[arg(long)]
    pub mem_eff_attn: bool,
    /// xformers attention (sdbooth: its own memory-efficient attention).
    #[arg(long)]
    pub xformers: bool,
    /// PyTorch SDPA attention (sdbooth: its own memory-efficient attention).
    #[arg(long)]
    pub sdpa: bool,
    /// Low system RAM: load weights straight to the accelerator.
    #[arg(long)]
    pub lowram: bool,
    /// Plenty of accelerator memory: skip memory clean-ups.
    #[arg(long)]
    pub highvram: bool,
}
