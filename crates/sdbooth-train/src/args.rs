//! `sdbooth train` flags under kohya's train_db.py names, types and defaults.
//!
//! `TrainArgs` is one clap `Args` struct made of one struct per `--help` group; each group is
//! flattened for clap and for serde, so a flag's clap id, its serde key and its key in a
//! `--config_file` TOML are all kohya's flag name. The training loop never reads these: the flags
//! are resolved once into a [`crate::plan::TrainPlan`].
//!
//! The flags live here rather than in the binary crate because the library needs them whole:
//! `--config_file` merging and `--output_config`, the support table that refuses unimplemented
//! flags, and the tests, which build runs from kohya command lines. A copy in the binary would
//! be a near-copy of this struct; the plan is the boundary instead.
//!
//! - support.rs: the one table of which flags this build implements (`check_supported`).
//! - config.rs: kohya's `--config_file` / `--output_config`.
//! - values.rs: values that parse but cannot train (`check_values`, run by `refusals`).

mod config;
mod dataset;
mod model;
mod optim;
mod output;
mod scope;
mod support;
mod training;
pub mod types;
mod values;

use clap::{Args, FromArgMatches};
use serde::{Deserialize, Serialize};

pub use config::{config_path, resolve_config_file, ConfigOutcome};
pub use dataset::DatasetArgs;
pub use model::ModelArgs;
pub use optim::{MemoryArgs, OptimizerArgs};
pub use output::{LoggingArgs, MetadataArgs, SamplingArgs, SavingArgs};
pub use scope::OutOfScopeArgs;
pub use support::{support_of, Refusal, RefusalKind, Support, FLAG_SUPPORT};
pub(crate) use training::DEFAULT_LOADER_WORKERS;
pub use training::{LossArgs, TrainingArgs};

/// Errors of flag handling beyond clap's own parse errors.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("{path}: {message}")]
    ConfigFile { path: String, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("internal error in the flag definitions: {0}")]
    Internal(String),
}

/// How the run itself behaves: config files and dry runs.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Run")]
pub struct RunArgs {
    /// Read flags from this TOML (kohya's format); flags on the command line win.
    #[arg(long, value_name = "TOML")]
    pub config_file: Option<String>,
    /// Write the flags that differ from the defaults to --config_file and exit.
    #[arg(long)]
    pub output_config: bool,
    /// Check and describe the dataset (images, repeats, reg balancing, buckets, steps), then exit.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry_run: also write the report as JSON, with each image's bucket.
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// kohya's dataset debugging: a dry run with per-image detail.
    #[arg(long)]
    pub debug_dataset: bool,
    /// Where to compute (sdbooth's own flag): auto (the first GPU when this binary has CUDA and
    /// one is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: crate::device::DeviceChoice,
    /// Let f32 matrix products and convolutions use TF32 tensor cores on an NVIDIA GPU (Ampere
    /// or newer; sdbooth's own flag, PyTorch's allow_tf32): faster, with 10-bit mantissa inputs.
    /// Off by default (f32 stays f32). Refused when the run is on the CPU, where it has no effect.
    #[arg(long)]
    pub allow_tf32: bool,
}

/// Every flag of `sdbooth train`.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
pub struct TrainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub dataset: DatasetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub training: TrainingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub loss: LossArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub optimizer: OptimizerArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub saving: SavingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub metadata: MetadataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub logging: LoggingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub out_of_scope: OutOfScopeArgs,
}

/// A flag map: kohya flag name → value (JSON types; `null` for an unset optional flag).
pub type FlagMap = serde_json::Map<String, serde_json::Value>;

impl TrainArgs {
    /// A clap command holding exactly these flags (for parsing config values and defaults).
    pub fn command(name: &'static str) -> clap::Command {
        TrainArgs::augment_args(clap::Command::new(name).no_binary_name(true))
    }

    /// Parses flags given without the program name (tests, config values).
    pub fn try_parse_from<I, T>(args: I) -> Result<TrainArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = TrainArgs::command("train").try_get_matches_from(args)?;
        TrainArgs::from_arg_matches(&matches)
    }

    /// kohya's defaults: what an empty command line gives.
    pub fn defaults() -> Result<TrainArgs, ArgsError> {
        TrainArgs::try_parse_from(Vec::<String>::new()).map_err(|e| ArgsError::Internal(e.to_string()))
    }

    /// The flags as a map keyed by kohya's names.
    pub fn to_flag_map(&self) -> Result<FlagMap, ArgsError> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => Err(ArgsError::Internal("TrainArgs did not serialize to a map".into())),
            Err(e) => Err(ArgsError::Internal(format!("cannot serialize flags: {e}"))),
        }
    }

    /// Rebuilds flags from a map written by `to_flag_map`.
    pub fn from_flag_map(map: FlagMap) -> Result<TrainArgs, ArgsError> {
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| ArgsError::Internal(format!("cannot rebuild flags: {e}")))
    }

    /// Names of the flags whose value differs from kohya's default, sorted.
    pub fn changed_flags(&self) -> Result<Vec<String>, ArgsError> {
        let ours = self.to_flag_map()?;
        let defaults = TrainArgs::defaults()?.to_flag_map()?;
        Ok(ours.into_iter().filter(|(k, v)| defaults.get(k) != Some(v)).map(|(k, _)| k).collect())
    }

    /// The command-line fallbacks of the dataset (sdbooth-data), field by field (plan/convert.rs).
    pub fn dataset_options(&self) -> sdbooth_data::DatasetOptions {
        sdbooth_data::DatasetOptions::from(self)
    }

    /// `--dry_run` or kohya's `--debug_dataset`: describe the dataset, do not train.
    pub fn is_dry_run(&self) -> bool {
        self.run.dry_run || self.run.debug_dataset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_defaults() {
        let d = TrainArgs::defaults().map_err(|e| e.to_string());
        let d = match d {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(d.optimizer.learning_rate, 2e-6);
        assert_eq!(d.training.max_train_steps, 1600);
        assert_eq!(d.training.prior_loss_weight, 1.0);
        assert_eq!(d.training.train_batch_size, 1);
        assert_eq!(d.training.max_data_loader_n_workers, 8);
        assert_eq!(d.memory.mixed_precision, types::MixedPrecision::No);
        assert_eq!(d.optimizer.lr_scheduler, "constant");
        assert_eq!(d.optimizer.optimizer_type, "");
        assert_eq!(d.optimizer.max_grad_norm, 1.0);
        assert_eq!(d.dataset.caption_extension, ".caption");
        assert_eq!(d.dataset.caption_separator, ",");
        assert_eq!(d.dataset.min_bucket_reso, 256);
        assert_eq!(d.dataset.max_bucket_reso, 1024);
        assert_eq!(d.dataset.bucket_reso_steps, 64);
        assert_eq!(d.dataset.token_warmup_min, 1);
        assert_eq!(d.loss.multires_noise_discount, 0.3);
        assert_eq!(d.loss.huber_c, 0.1);
        assert_eq!(d.out_of_scope.zero_stage, 2);
        assert_eq!(d.out_of_scope.dynamo_backend, "inductor");
        assert_eq!(d.sampling.sample_sampler, types::SampleSampler::Ddim);
        assert_eq!(d.model.max_token_length, None);
        assert!(d.changed_flags().map(|c| c.is_empty()).unwrap_or(false));
    }

    #[test]
    fn parses_seed_command_line() {
        let a = TrainArgs::try_parse_from([
            "--pretrained_model_name_or_path=model.safetensors",
            "--dataset_config=ds.toml",
            "--output_dir=out",
            "--save_model_as=safetensors",
            "--prior_loss_weight=1.0",
            "--max_train_steps=1600",
            "--learning_rate=1e-6",
            "--optimizer_type=AdamW8bit",
            "--xformers",
            "--mixed_precision=fp16",
            "--cache_latents",
            "--gradient_checkpointing",
            "--max_token_length",
            "225",
            "--optimizer_args",
            "weight_decay=0.01",
            "betas=0.9,0.999",
            "--lr_warmup_steps",
            "0.05",
            "--stop_text_encoder_training",
            "-1",
        ]);
        let a = match a {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(a.optimizer.learning_rate, 1e-6);
        assert_eq!(a.memory.mixed_precision, types::MixedPrecision::Fp16);
        assert_eq!(a.saving.save_model_as, Some(types::SaveModelAs::Safetensors));
        assert_eq!(a.model.max_token_length, Some(225));
        assert_eq!(a.optimizer.optimizer_args, vec!["weight_decay=0.01", "betas=0.9,0.999"]);
        assert_eq!(a.optimizer.lr_warmup_steps, types::StepsOrRatio::Ratio(0.05));
        assert_eq!(a.training.stop_text_encoder_training, Some(-1));
        assert!(a.memory.xformers && a.training.cache_latents && a.memory.gradient_checkpointing);
        let changed = a.changed_flags().unwrap_or_default();
        assert!(changed.contains(&"xformers".to_string()));
        // Given, but equal to the default: not "changed".
        assert!(!changed.contains(&"max_train_steps".to_string()));
    }

    #[test]
    fn rejects_kohya_invalid_values() {
        assert!(TrainArgs::try_parse_from(["--max_token_length=100"]).is_err());
        assert!(TrainArgs::try_parse_from(["--mixed_precision=fp32"]).is_err());
        assert!(TrainArgs::try_parse_from(["--save_model_as=pt"]).is_err());
        assert!(TrainArgs::try_parse_from(["--learning_rate=fast"]).is_err());
        assert!(TrainArgs::try_parse_from(["--train_batch_size=0"]).is_err());
    }

    #[test]
    fn flag_map_round_trips() {
        let a = TrainArgs::try_parse_from(["--learning_rate=3e-7", "--lr_warmup_steps=10%", "--seed=42"]);
        let a = match a {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let back = a.to_flag_map().and_then(TrainArgs::from_flag_map).map_err(|e| e.to_string());
        assert_eq!(back.as_ref().ok(), Some(&a));
    }

    #[test]
    fn dataset_options_take_every_shared_flag() {
        let a = TrainArgs::try_parse_from([
            "--train_data_dir=t",
            "--reg_data_dir=r",
            "--resolution=768,512",
            "--train_batch_size=3",
            "--enable_bucket",
            "--min_bucket_reso=320",
            "--bucket_no_upscale",
            "--caption_extension=.txt",
            "--keep_tokens=2",
            "--caption_dropout_rate=0.25",
            "--flip_aug",
            "--max_token_length=150",
            "--seed=11",
            "--skip_bad_images",
            "--ignore_exif_orientation",
            "--validation_split=0.1",
            "--max_train_steps=77",
            "--max_train_epochs=4",
            "--gradient_accumulation_steps=2",
            "--debug_dataset",
        ]);
        let a = match a {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let o = a.dataset_options();
        assert_eq!(o.train_data_dir.as_deref(), Some("t"));
        assert_eq!(o.reg_data_dir.as_deref(), Some("r"));
        assert_eq!(o.resolution.as_deref(), Some("768,512"));
        assert_eq!(o.train_batch_size, 3);
        assert!(o.enable_bucket && o.bucket_no_upscale && o.flip_aug);
        assert_eq!(o.min_bucket_reso, 320);
        assert_eq!(o.caption_extension, ".txt");
        assert_eq!(o.keep_tokens, 2);
        assert_eq!(o.caption_dropout_rate, 0.25);
        assert_eq!(o.max_token_length, Some(150));
        assert_eq!(o.seed, Some(11));
        assert!(o.skip_bad_images && o.ignore_exif_orientation && o.debug_dataset);
        assert_eq!(o.validation_split, 0.1);
        assert_eq!(o.max_train_steps, 77);
        assert_eq!(o.max_train_epochs, Some(4));
        assert_eq!(o.gradient_accumulation_steps, 2);
        // kohya's defaults arrive as kohya's defaults.
        let d = TrainArgs::try_parse_from(Vec::<String>::new()).map_err(|e| e.to_string());
        let d = d.map(|d| d.dataset_options());
        assert_eq!(d.ok(), Some(sdbooth_data::DatasetOptions::default()));
    }
}
