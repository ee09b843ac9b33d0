//! The resolved plan of a run: the flags (`TrainArgs`, kohya's names and types) turned once into
//! the settings the trainer, the bench, validation and sampling read. Nothing after this point
//! reads a flag: conversions are `From` impls in convert.rs, so renaming a flag or a setting is a
//! compile error, never a silent fallback to a default.

mod convert;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sdbooth_checkpoint::{ModelSpecArgs, Precision, SaveFormat};
use sdbooth_data::DatasetOptions;
use sdbooth_models::ddpm::DdpmSchedule;
use sdbooth_sample::prompts::{
    check_sample_prompt_sizes, read_prompt_file, rounding_notes, PromptSpec, KOHYA_SAMPLE_SIZE,
};

use crate::args::types::MixedPrecision;
use crate::args::{SamplingArgs, TrainArgs, DEFAULT_LOADER_WORKERS};
use crate::error::{Result, TrainError};
use crate::loss::LossArgs;
use crate::lr::LrSchedulerArgs;
use crate::noise::NoiseArgs;
use crate::optim::{OptimizerConfig, OptimizerKind};

/// Every setting of a run, resolved from the flags.
#[derive(Debug, Clone)]
pub struct TrainPlan {
    /// Where every tensor of the step lives ([`crate::device::resolve_device`]).
    pub device: Device,
    /// `--seed` (kohya draws a random one when unset; sdbooth uses 42 so runs repeat).
    pub seed: u64,
    pub model: ModelPlan,
    pub precision: PrecisionPlan,
    pub text: TextSettings,
    pub noise: NoiseArgs,
    /// The loss settings; `v_parameterization` is completed from the loaded model.
    pub loss: LossArgs,
    /// `--zero_terminal_snr`: the noise schedule rescaled to zero terminal SNR.
    pub zero_terminal_snr: bool,
    pub optimizer: OptimizerPlan,
    pub lr: LrSchedulerArgs,
    pub steps: StepPlan,
    pub data: DataPlan,
    pub saving: SavePolicy,
    pub sampling: SamplePolicy,
    pub logging: LogPolicy,
    /// The flags as given (kohya name, value), for the run report.
    pub flags: Vec<(String, String)>,
}

/// Which model to load and how to read it.
#[derive(Debug, Clone)]
pub struct ModelPlan {
    /// `--pretrained_model_name_or_path` (checked when the model is loaded).
    pub spec: Option<String>,
    pub v2: bool,
    pub v_parameterization: bool,
    /// `--vae`: a VAE used instead of the model's own.
    pub vae: Option<PathBuf>,
}

/// Dtypes of weights and compute.
#[derive(Debug, Clone, Copy)]
pub struct PrecisionPlan {
    pub mixed_precision: MixedPrecision,
    /// f32 master weights, or bf16 (`--full_bf16`, stochastic rounding on update).
    pub weight_dtype: DType,
    /// Compute dtype of the trained parts (`None`: the weights' own).
    pub compute_dtype: Option<DType>,
    /// fp16's dynamic loss scale.
    pub fp16_loss_scale: bool,
}

/// How captions become text-encoder inputs (training, validation and samples alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextSettings {
    pub clip_skip: Option<usize>,
    pub max_token_length: Option<usize>,
    pub no_token_padding: bool,
    /// `--weighted_captions`: A1111 `(word:1.2)` weights scale the token states.
    pub weighted_captions: bool,
}

#[derive(Debug, Clone)]
pub struct OptimizerPlan {
    pub config: OptimizerConfig,
    pub learning_rate: f64,
    pub learning_rate_te: f64,
    /// 0: no clipping.
    pub max_grad_norm: f64,
    pub fused_backward_pass: bool,
}

/// How long to train and what each step includes.
#[derive(Debug, Clone)]
pub struct StepPlan {
    pub gradient_accumulation_steps: u64,
    pub max_train_steps: u64,
    pub max_train_epochs: Option<u64>,
    /// kohya: unset trains the text encoder throughout; negative never; N stops at step N.
    pub stop_text_encoder_training: Option<i64>,
    pub gradient_checkpointing: bool,
    pub masked_loss: bool,
}

/// The dataset and how images reach the step.
#[derive(Debug, Clone)]
pub struct DataPlan {
    /// `--dataset_config` (else the legacy `--train_data_dir` folders).
    pub config: Option<PathBuf>,
    /// The command-line fallbacks of the dataset TOML.
    pub options: DatasetOptions,
    pub latent_cache: Option<LatentCachePolicy>,
    /// `--max_data_loader_n_workers`, at least 1 and at most the CPU count.
    pub loader_threads: usize,
    /// `--highvram`: keep the VAE after caching latents.
    pub keep_vae: bool,
}

/// `--cache_latents` / `--cache_latents_to_disk`.
#[derive(Debug, Clone, Copy)]
pub struct LatentCachePolicy {
    pub to_disk: bool,
    pub skip_cache_check: bool,
    pub vae_batch_size: usize,
}

/// `--resume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest state in the output folder, if any.
    Latest,
    From(PathBuf),
}

/// What is written, when, and how many are kept.
#[derive(Debug, Clone)]
pub struct SavePolicy {
    /// `--output_dir` (checked when the run starts).
    pub output_dir: Option<PathBuf>,
    pub output_name: Option<String>,
    /// `--save_model_as`; `None`: the base model's format (`--use_safetensors` applies).
    pub format: Option<SaveFormat>,
    pub use_safetensors: bool,
    pub precision: Option<Precision>,
    pub every_n_steps: Option<u64>,
    /// `--save_every_n_epochs`, or what `--save_n_epoch_ratio` makes of it (resolved per run).
    pub every_n_epochs: Option<u64>,
    pub n_epoch_ratio: Option<u64>,
    pub last_n_steps: Option<u64>,
    pub last_n_steps_state: Option<u64>,
    pub last_n_epochs: Option<u64>,
    pub last_n_epochs_state: Option<u64>,
    pub save_state: bool,
    pub save_state_on_train_end: bool,
    pub resume: Option<Resume>,
    /// modelspec metadata of every saved model.
    pub metadata: ModelSpecArgs,
}

/// Sample images during training.
#[derive(Debug, Clone)]
pub struct SamplePolicy {
    /// `--sample_prompts`.
    pub prompts: Option<PathBuf>,
    /// Its prompts, read by [`SamplePolicy::resolve`] (none when no trigger asks for samples).
    pub prompt_specs: Vec<PromptSpec>,
    pub every_n_steps: Option<u64>,
    pub every_n_epochs: Option<u64>,
    pub at_first: bool,
    /// kohya's sampler name.
    pub sampler: String,
}

impl SamplePolicy {
    /// Whether a trigger asks for sample images (kohya reads the prompt file only then).
    pub fn wants_samples(&self) -> bool {
        self.every_n_steps.is_some() || self.every_n_epochs.is_some() || self.at_first
    }

    /// The sampling flags with `--sample_prompts` read before any model is loaded: a file that
    /// cannot be read or a size too large to make is refused, and each size kohya's rounding
    /// changes is noted with its line.
    pub fn resolve(args: &SamplingArgs) -> Result<Self> {
        let mut policy = SamplePolicy::from(args);
        if let (Some(file), true) = (&policy.prompts, policy.wants_samples()) {
            let specs = read_prompt_file(file).map_err(TrainError::SamplePrompts)?;
            check_sample_prompt_sizes(file, &specs, KOHYA_SAMPLE_SIZE).map_err(TrainError::SamplePrompts)?;
            for note in rounding_notes(file, &specs, KOHYA_SAMPLE_SIZE) {
                tracing::warn!("{note}");
            }
            policy.prompt_specs = specs;
        }
        Ok(policy)
    }
}

/// TensorBoard logs (`--logging_dir`, `--log_prefix`, `--log_tracker_name`).
#[derive(Debug, Clone)]
pub struct LogPolicy {
    pub logging_dir: Option<PathBuf>,
    pub log_prefix: Option<String>,
    pub log_tracker_name: Option<String>,
}

impl TrainPlan {
    /// Resolves the flags: device, dtypes, settings, policies; refuses combinations this build
    /// cannot run.
    pub fn resolve(args: &TrainArgs) -> Result<Self> {
        check_combinations(args)?;
        let device = crate::device::resolve_device(args.run.device, args.run.allow_tf32)?;
        let seed = args.training.seed.unwrap_or(42);
        let mut config = OptimizerConfig::from_args(optimizer_kind(args)?, &args.optimizer.optimizer_args)?;
        config.rounding_seed = seed;
        let o = &args.optimizer;
        let caching = args.training.cache_latents || args.training.cache_latents_to_disk;
        Ok(TrainPlan {
            precision: PrecisionPlan::resolve(args, &device),
            device,
            seed,
            model: ModelPlan {
                spec: args.model.pretrained_model_name_or_path.clone(),
                v2: args.model.v2,
                v_parameterization: args.model.v_parameterization,
                vae: args.model.vae.as_ref().map(PathBuf::from),
            },
            text: TextSettings {
                clip_skip: args.model.clip_skip.map(|v| v as usize),
                max_token_length: args.model.max_token_length.map(|v| v as usize),
                no_token_padding: args.model.no_token_padding,
                weighted_captions: args.dataset.weighted_captions,
            },
            noise: NoiseArgs::from(&args.loss),
            loss: LossArgs::from(&args.loss),
            zero_terminal_snr: args.loss.zero_terminal_snr,
            optimizer: OptimizerPlan {
                config,
                learning_rate: o.learning_rate,
                learning_rate_te: o.learning_rate_te.unwrap_or(o.learning_rate),
                max_grad_norm: o.max_grad_norm,
                fused_backward_pass: o.fused_backward_pass,
            },
            lr: LrSchedulerArgs::from(o),
            steps: StepPlan {
                gradient_accumulation_steps: args.training.gradient_accumulation_steps.max(1),
                max_train_steps: args.training.max_train_steps,
                max_train_epochs: args.training.max_train_epochs,
                stop_text_encoder_training: args.training.stop_text_encoder_training,
                gradient_checkpointing: args.memory.gradient_checkpointing,
                masked_loss: args.loss.masked_loss,
            },
            data: DataPlan {
                config: args.dataset.dataset_config.as_ref().map(PathBuf::from),
                options: DatasetOptions::from(args),
                latent_cache: caching.then_some(LatentCachePolicy {
                    to_disk: args.training.cache_latents_to_disk,
                    skip_cache_check: args.training.skip_cache_check,
                    vae_batch_size: args.training.vae_batch_size.max(1) as usize,
                }),
                loader_threads: loader_threads(args.training.max_data_loader_n_workers),
                keep_vae: args.memory.highvram,
            },
            saving: SavePolicy::from(args),
            sampling: SamplePolicy::resolve(&args.sampling)?,
            logging: LogPolicy {
                logging_dir: args.logging.logging_dir.as_ref().map(PathBuf::from),
                log_prefix: args.logging.log_prefix.clone(),
                log_tracker_name: args.logging.log_tracker_name.clone(),
            },
            flags: flag_table(args),
        })
    }

    /// The DDPM schedule the model was trained with, as these flags adjust it.
    pub fn noise_schedule(&self) -> DdpmSchedule {
        DdpmSchedule::for_training(self.zero_terminal_snr)
    }

    /// `--output_dir`, required to train.
    pub fn output_dir(&self) -> Result<&Path> {
        self.saving.output_dir.as_deref().ok_or_else(|| TrainError::Config("--output_dir is required".into()))
    }
}

impl ModelPlan {
    /// `--pretrained_model_name_or_path`, required to train or bench.
    pub fn spec(&self) -> Result<&str> {
        self.spec.as_deref().ok_or_else(|| {
            TrainError::Config("--pretrained_model_name_or_path is required (e.g. builtin:tiny-sd1)".into())
        })
    }
}

impl PrecisionPlan {
    /// `bf16` computes the matrix products in bf16, like PyTorch's autocast: on the CPU the GEMMs
    /// of conv2d and linear multiply bf16 with f32 sums (AVX512_BF16 where the CPU has it, else an
    /// f32 fallback) while activations, norms and element-wise ops stay f32 (the models' `Weights`:
    /// only the layer weights are cast, the activations are rounded as the GEMMs pack them). `--full_bf16` weights
    /// without bf16 compute are cast to f32 per block on the CPU. The CPU with
    /// `SDBOOTH_REFERENCE_OPS` runs candle's own conv2d, which has no CPU bf16 kernel: there bf16
    /// computes in f32 as before.
    fn resolve(args: &TrainArgs, device: &Device) -> Self {
        let m = &args.memory;
        let bf16_kernels = !(device.is_cpu() && sdbooth_ops::reference_ops_forced());
        let compute_dtype = match m.mixed_precision {
            MixedPrecision::Bf16 if bf16_kernels => Some(DType::BF16),
            _ if m.full_bf16 && device.is_cpu() => Some(DType::F32),
            MixedPrecision::No | MixedPrecision::Bf16 => None,
            MixedPrecision::Fp16 => Some(DType::F16),
        };
        PrecisionPlan {
            mixed_precision: m.mixed_precision,
            weight_dtype: if m.full_bf16 { DType::BF16 } else { DType::F32 },
            compute_dtype,
            fp16_loss_scale: m.mixed_precision == MixedPrecision::Fp16,
        }
    }
}

/// Image-loading threads for `--max_data_loader_n_workers`: capped at the CPU count as kohya does
/// (`min(n, os.cpu_count())`; 100,000 would start 100,000 threads), and at least one.
fn loader_threads(requested: u32) -> usize {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // kohya's default (8) capped on a small machine is not news; an explicit larger value is.
    if requested as usize > cpus && requested > DEFAULT_LOADER_WORKERS {
        tracing::info!(
            "--max_data_loader_n_workers {requested} is capped at the CPU count, {cpus} (as kohya does)"
        );
    }
    (requested as usize).clamp(1, cpus)
}

/// `--optimizer_type`, with kohya's older `--use_8bit_adam` / `--use_lion_optimizer` first.
pub(crate) fn optimizer_kind(args: &TrainArgs) -> Result<OptimizerKind> {
    let o = &args.optimizer;
    if o.use_8bit_adam {
        return Ok(OptimizerKind::AdamW8bit);
    }
    if o.use_lion_optimizer {
        return Ok(OptimizerKind::Lion);
    }
    OptimizerKind::parse(&o.optimizer_type)
}

/// Options whose combinations kohya refuses, or that this loop cannot honour.
fn check_combinations(args: &TrainArgs) -> Result<()> {
    let caching = args.training.cache_latents || args.training.cache_latents_to_disk;
    if caching && args.dataset.flip_aug {
        return Err(TrainError::Config(
            "--cache_latents with --flip_aug is not supported yet (kohya caches both orientations)".into(),
        ));
    }
    if args.optimizer.fused_backward_pass {
        if args.training.gradient_accumulation_steps > 1 {
            return Err(TrainError::Config(
                "--fused_backward_pass updates each block as soon as its gradients are final, so it cannot \
                 accumulate gradients: drop --gradient_accumulation_steps"
                    .into(),
            ));
        }
        if args.memory.mixed_precision == MixedPrecision::Fp16 {
            return Err(TrainError::Config(
                "--fused_backward_pass cannot skip an fp16 step that overflows once blocks are updated: use \
                 --mixed_precision bf16 or no"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The flags by kohya name with their values as text (unset optional flags left out).
fn flag_table(args: &TrainArgs) -> Vec<(String, String)> {
    let Ok(map) = args.to_flag_map() else { return Vec::new() };
    map.into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some((k, s)),
            v => Some((k, v.to_string())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(flags: &[&str]) -> TrainPlan {
        let args = TrainArgs::try_parse_from(flags).map_err(|e| e.to_string());
        match args.map_err(TrainError::Config).and_then(|a| TrainPlan::resolve(&a)) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn cpu_mixed_precision_resolves_to_what_the_cpu_computes() {
        let p = plan(&["--mixed_precision=bf16"]);
        assert!(p.device.is_cpu());
        assert_eq!((p.precision.compute_dtype, p.precision.weight_dtype), (Some(DType::BF16), DType::F32));
        let p = plan(&["--mixed_precision=fp16"]);
        assert_eq!(p.precision.compute_dtype, Some(DType::F16));
        assert!(p.precision.fp16_loss_scale);
        let p = plan(&["--mixed_precision=bf16", "--full_bf16"]);
        assert_eq!((p.precision.compute_dtype, p.precision.weight_dtype), (Some(DType::BF16), DType::BF16));
        let p = plan(&["--full_bf16"]);
        assert_eq!((p.precision.compute_dtype, p.precision.weight_dtype), (Some(DType::F32), DType::BF16));
    }

    #[test]
    fn policies_take_their_flags() {
        let p = plan(&[
            "--seed=7",
            "--learning_rate=3e-6",
            "--use_8bit_adam",
            "--save_every_n_steps=5",
            "--save_model_as=diffusers",
            "--save_precision=fp16",
            "--resume=auto",
            "--sample_sampler=k_euler_a",
            "--sample_every_n_epochs=2",
            "--cache_latents_to_disk",
            "--vae_batch_size=4",
            "--gradient_accumulation_steps=3",
            "--zero_terminal_snr",
            "--clip_skip=2",
        ]);
        assert_eq!(p.seed, 7);
        assert_eq!(p.optimizer.config.kind, OptimizerKind::AdamW8bit);
        assert_eq!(p.optimizer.config.rounding_seed, 7);
        assert_eq!((p.optimizer.learning_rate, p.optimizer.learning_rate_te), (3e-6, 3e-6));
        assert_eq!(p.saving.every_n_steps, Some(5));
        assert_eq!(p.saving.format, Some(SaveFormat::Diffusers));
        assert_eq!(p.saving.precision, Some(Precision::Fp16));
        assert_eq!(p.saving.resume, Some(Resume::Latest));
        assert_eq!(p.sampling.sampler, "k_euler_a");
        assert_eq!(p.sampling.every_n_epochs, Some(2));
        let cache = p.data.latent_cache.map(|c| (c.to_disk, c.vae_batch_size));
        assert_eq!(cache, Some((true, 4)));
        assert_eq!(p.steps.gradient_accumulation_steps, 3);
        assert_eq!(p.text.clip_skip, Some(2));
        let zt = p.noise_schedule().alphas_cumprod.last().copied();
        assert_eq!(zt, Some(0.0), "zero terminal SNR ends the schedule at alpha_bar = 0");
    }

    #[test]
    fn refuses_combinations_the_loop_cannot_run() {
        for flags in [
            &["--cache_latents", "--flip_aug"][..],
            &["--fused_backward_pass", "--gradient_accumulation_steps=2"],
            &["--fused_backward_pass", "--mixed_precision=fp16"],
        ] {
            let args = TrainArgs::try_parse_from(flags).map_err(|e| e.to_string());
            let resolved = args.map(|a| TrainPlan::resolve(&a).is_err());
            assert_eq!(resolved, Ok(true), "{flags:?}");
        }
    }
}
