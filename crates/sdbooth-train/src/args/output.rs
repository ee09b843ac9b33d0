//! Flags about what a run writes: models and states, model metadata, sample images and logs
//! (kohya: add_training_arguments, add_sd_saving_arguments, sai_model_spec, add_logging_arguments).

use clap::Args;
use serde::{Deserialize, Serialize};

use super::types::{ConsoleLogLevel, LogWith, SampleSampler, SaveModelAs, SavePrecision};

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Saving")]
pub struct SavingArgs {
    /// Folder for the trained model and states.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<String>,
    /// File name of the trained model, without extension.
    #[arg(long, value_name = "NAME")]
    pub output_name: Option<String>,
    /// Model format (default: the base model's).
    #[arg(long, value_enum)]
    pub save_model_as: Option<SaveModelAs>,
    /// Save as .safetensors when --save_model_as is not given.
    #[arg(long)]
    pub use_safetensors: bool,
    /// Precision of saved weights.
    #[arg(long, value_enum)]
    pub save_precision: Option<SavePrecision>,
    /// Save a model every N epochs.
    #[arg(long, value_name = "N")]
    pub save_every_n_epochs: Option<u32>,
    /// Save a model every N steps.
    #[arg(long, value_name = "N")]
    pub save_every_n_steps: Option<u64>,
    /// Save at least N models over the run, evenly spaced by epoch.
    #[arg(long, value_name = "N")]
    pub save_n_epoch_ratio: Option<u32>,
    /// Keep only the last N epoch models.
    #[arg(long, value_name = "N")]
    pub save_last_n_epochs: Option<u32>,
    /// Keep only the last N epoch states (overrides --save_last_n_epochs for states).
    #[arg(long, value_name = "N")]
    pub save_last_n_epochs_state: Option<u32>,
    /// Keep only the models of the last N steps.
    #[arg(long, value_name = "N")]
    pub save_last_n_steps: Option<u64>,
    /// Keep only the states of the last N steps (overrides --save_last_n_steps for states).
    #[arg(long, value_name = "N")]
    pub save_last_n_steps_state: Option<u64>,
    /// Save the full training state (optimizer, step, RNG) with each model.
    #[arg(long)]
    pub save_state: bool,
    /// Save the training state at the end of training.
    #[arg(long)]
    pub save_state_on_train_end: bool,
    /// Resume from a saved state folder ("auto": the newest in --output_dir).
    #[arg(long, value_name = "STATE_DIR")]
    pub resume: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Model metadata")]
pub struct MetadataArgs {
    /// Title (default: --output_name).
    #[arg(long, value_name = "TEXT")]
    pub metadata_title: Option<String>,
    /// Author.
    #[arg(long, value_name = "TEXT")]
    pub metadata_author: Option<String>,
    /// Description.
    #[arg(long, value_name = "TEXT")]
    pub metadata_description: Option<String>,
    /// License.
    #[arg(long, value_name = "TEXT")]
    pub metadata_license: Option<String>,
    /// Comma-separated tags.
    #[arg(long, value_name = "TEXT")]
    pub metadata_tags: Option<String>,
    /// Usage hint.
    #[arg(long, value_name = "TEXT")]
    pub metadata_usage_hint: Option<String>,
    /// Thumbnail: a data URL or an image file (stored as a data URL).
    #[arg(long, value_name = "URL|FILE")]
    pub metadata_thumbnail: Option<String>,
    /// Models this one was merged from.
    #[arg(long, value_name = "TEXT")]
    pub metadata_merged_from: Option<String>,
    /// Trigger phrase.
    #[arg(long, value_name = "TEXT")]
    pub metadata_trigger_phrase: Option<String>,
    /// Preprocessor.
    #[arg(long, value_name = "TEXT")]
    pub metadata_preprocessor: Option<String>,
    /// Whether this is a negative embedding.
    #[arg(long, value_name = "TEXT")]
    pub metadata_is_negative_embedding: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Sampling")]
pub struct SamplingArgs {
    /// Prompts file for sample images.
    #[arg(long, value_name = "FILE")]
    pub sample_prompts: Option<String>,
    /// Generate samples every N steps.
    #[arg(long, value_name = "N")]
    pub sample_every_n_steps: Option<u64>,
    /// Generate samples every N epochs (overrides --sample_every_n_steps).
    #[arg(long, value_name = "N")]
    pub sample_every_n_epochs: Option<u32>,
    /// Generate samples before training too.
    #[arg(long)]
    pub sample_at_first: bool,
    /// Sampler of sample images.
    #[arg(long, value_enum, default_value_t = SampleSampler::Ddim)]
    pub sample_sampler: SampleSampler,
}

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Logging")]
pub struct LoggingArgs {
    /// Console log level (default: INFO).
    #[arg(long, value_enum)]
    pub console_log_level: Option<ConsoleLogLevel>,
    /// Write the console log to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub console_log_file: Option<String>,
    /// Plain console log lines.
    #[arg(long)]
    pub console_log_simple: bool,
    /// Write TensorBoard logs under this folder.
    #[arg(long, value_name = "DIR")]
    pub logging_dir: Option<String>,
    /// Logger: tensorboard (wandb and all are refused).
    #[arg(long, value_enum)]
    pub log_with: Option<LogWith>,
    /// Prefix of the log folder name.
    #[arg(long, value_name = "TEXT")]
    pub log_prefix: Option<String>,
    /// Tracker (run) name.
    #[arg(long, value_name = "NAME")]
    pub log_tracker_name: Option<String>,
    /// Tracker config file.
    #[arg(long, value_name = "FILE")]
    pub log_tracker_config: Option<String>,
    /// Log the training configuration.
    #[arg(long)]
    pub log_config: bool,
    /// WandB run name.
    #[arg(long, value_name = "NAME")]
    pub wandb_run_name: Option<String>,
    /// WandB API key.
    #[arg(long, value_name = "KEY")]
    pub wandb_api_key: Option<String>,
}
