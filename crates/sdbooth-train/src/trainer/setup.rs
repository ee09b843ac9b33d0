//! Everything a run needs before its first step: flags turned into settings, the model, the
//! dataset, the optimizer, and (on resume) the saved state laid over them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdbooth_checkpoint::{load_model, LoadOptions, LoadedModel, SaveFormat};
use sdbooth_data::tokenizer::ClipTokenizer;
use sdbooth_data::DatasetGroup;
use sdbooth_models::{ClipTextModel, ModelConfig, ParamStore, Prediction, UNet, Vae};

use crate::args::types::MixedPrecision;
use crate::args::types::{HuberSchedule as ArgHuber, LossType as ArgLossType, SaveModelAs};
use crate::args::TrainArgs;
use crate::error::{Result, TrainError};
use crate::loss::{HuberSchedule, LossArgs, LossType};
use crate::lr::{LrSchedule, LrSchedulerArgs};
use crate::noise::NoiseArgs;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerKind};

pub const UNET_GROUP: &str = "unet";
pub const TEXT_ENCODER_GROUP: &str = "text_encoder";

/// The trainable model: fp32 master weights of U-Net and text encoder, the frozen VAE.
pub struct Model {
    pub config: ModelConfig,
    pub v_parameterization: bool,
    pub unet: UNet,
    pub unet_params: ParamStore,
    pub text_encoder: ClipTextModel,
    pub text_params: ParamStore,
    pub vae: Vae,
    /// Dropped after latent caching when nothing else needs it.
    pub vae_params: Option<ParamStore>,
    pub tokenizer: ClipTokenizer,
    /// What the checkpoint was loaded from (single-file sources are laid under saved weights).
    pub loaded: LoadedModel,
}

fn to_store(map: &std::collections::BTreeMap<String, Tensor>, dtype: DType) -> Result<ParamStore> {
    let mut out = std::collections::BTreeMap::new();
    for (k, t) in map {
        out.insert(k.clone(), if t.dtype() == dtype { t.copy()? } else { t.to_dtype(dtype)? });
    }
    ParamStore::from_tensors(out).map_err(model_err)
}

pub fn model_err(e: sdbooth_models::ModelError) -> TrainError {
    TrainError::Config(format!("model: {e}"))
}

pub fn load(args: &TrainArgs) -> Result<Model> {
    let spec = args.model.pretrained_model_name_or_path.as_deref().ok_or_else(|| {
        TrainError::Config("--pretrained_model_name_or_path is required (e.g. builtin:tiny-sd1)".into())
    })?;
    let opts = LoadOptions {
        v2: if args.model.v2 { Some(true) } else { None },
        v_parameterization: args.model.v_parameterization,
        vae: args.model.vae.as_ref().map(PathBuf::from),
        dtype: None,
    };
    let mut loaded = load_model(spec, &opts).map_err(|e| TrainError::Config(format!("{spec}: {e}")))?;
    if loaded.config.v2 && !args.model.v2 {
        tracing::warn!("{spec} is an SD 2.x model; kohya needs --v2 for it, sdbooth detected it");
    }
    // --full_bf16 keeps the trained weights themselves in bf16 (stochastic rounding on update).
    let weight_dtype = if args.memory.full_bf16 { DType::BF16 } else { DType::F32 };
    let unet_params = to_store(&loaded.unet, weight_dtype)?;
    let text_params = to_store(&loaded.text_encoder, weight_dtype)?;
    // The VAE only encodes (and decodes samples): f32 unless mixed precision asks otherwise.
    let vae_params = to_store(&loaded.vae, DType::F32)?;
    // Keep the loaded tensors only as far as saving needs them (source info); drop the copies.
    loaded.unet.clear();
    loaded.text_encoder.clear();
    loaded.vae.clear();
    let tokenizer = if loaded.config.v2 { ClipTokenizer::sd2() } else { ClipTokenizer::sd1() }
        .map_err(|e| TrainError::Config(format!("tokenizer: {e}")))?;
    let v_parameterization = loaded.v_parameterization
        || loaded.config.prediction == Prediction::VPrediction
        || args.model.v_parameterization;
    Ok(Model {
        unet: UNet::new(&loaded.config.unet),
        text_encoder: ClipTextModel::new(&loaded.config.text),
        vae: Vae::new(&loaded.config.vae),
        config: loaded.config.clone(),
        v_parameterization,
        unet_params,
        text_params,
        vae_params: Some(vae_params),
        tokenizer,
        loaded,
    })
}

/// Compute dtype of the trained parts for `--mixed_precision`.
///
/// candle's CPU matrix multiply has no bf16 kernel, so on the CPU `bf16` computes in f32 (more
/// precise, same result as `no`); the README says so and the run prints it once.
pub fn compute_dtype(args: &TrainArgs) -> Option<DType> {
    // --full_bf16 stores bf16 weights; on the CPU they are cast to f32 per block for compute.
    if args.memory.full_bf16 && device().is_cpu() {
        return Some(DType::F32);
    }
    match args.memory.mixed_precision {
        MixedPrecision::No => None,
        MixedPrecision::Fp16 => Some(DType::F16),
        MixedPrecision::Bf16 if device().is_cpu() => None,
        MixedPrecision::Bf16 => Some(DType::BF16),
    }
}

pub fn optimizer_kind(args: &TrainArgs) -> Result<OptimizerKind> {
    let o = &args.optimizer;
    if o.use_8bit_adam {
        return Ok(OptimizerKind::AdamW8bit);
    }
    if o.use_lion_optimizer {
        return Ok(OptimizerKind::Lion);
    }
    OptimizerKind::parse(&o.optimizer_type)
}

pub fn build_optimizer(
    args: &TrainArgs,
    model: &Model,
    train_text_encoder: bool,
    seed: u64,
) -> Result<Optimizer> {
    let mut config = OptimizerConfig::from_args(optimizer_kind(args)?, &args.optimizer.optimizer_args)?;
    config.rounding_seed = seed;
    let mut opt = Optimizer::new(config);
    opt.add_group(UNET_GROUP, args.optimizer.learning_rate, model.unet_params.names().cloned().collect());
    if train_text_encoder {
        let lr = args.optimizer.learning_rate_te.unwrap_or(args.optimizer.learning_rate);
        opt.add_group(TEXT_ENCODER_GROUP, lr, model.text_params.names().cloned().collect());
    }
    Ok(opt)
}

pub fn lr_schedule(args: &TrainArgs, total_steps: u64) -> Result<LrSchedule> {
    let o = &args.optimizer;
    let sched = LrSchedulerArgs {
        lr_scheduler: o.lr_scheduler.clone(),
        lr_warmup_steps: steps_or_ratio(o.lr_warmup_steps),
        lr_decay_steps: steps_or_ratio(o.lr_decay_steps),
        lr_scheduler_num_cycles: o.lr_scheduler_num_cycles as u64,
        lr_scheduler_power: o.lr_scheduler_power,
        lr_scheduler_timescale: o.lr_scheduler_timescale,
        lr_scheduler_min_lr_ratio: o.lr_scheduler_min_lr_ratio,
    };
    LrSchedule::new(&sched, total_steps, o.learning_rate)
}

fn steps_or_ratio(v: crate::args::types::StepsOrRatio) -> crate::lr::StepsOrRatio {
    match v {
        crate::args::types::StepsOrRatio::Steps(n) => crate::lr::StepsOrRatio::Steps(n),
        crate::args::types::StepsOrRatio::Ratio(r) => crate::lr::StepsOrRatio::Ratio(r),
    }
}

pub fn noise_args(args: &TrainArgs) -> NoiseArgs {
    let t = &args.loss;
    NoiseArgs {
        noise_offset: t.noise_offset,
        noise_offset_random_strength: t.noise_offset_random_strength,
        adaptive_noise_scale: t.adaptive_noise_scale,
        multires_noise_iterations: t.multires_noise_iterations.map(|v| v as usize),
        multires_noise_discount: t.multires_noise_discount,
        ip_noise_gamma: t.ip_noise_gamma,
        ip_noise_gamma_random_strength: t.ip_noise_gamma_random_strength,
        min_timestep: t.min_timestep.map(u64::from),
        max_timestep: t.max_timestep.map(u64::from),
    }
}

pub fn loss_args(args: &TrainArgs, v_parameterization: bool) -> LossArgs {
    let t = &args.loss;
    LossArgs {
        loss_type: match t.loss_type {
            ArgLossType::L1 => LossType::L1,
            ArgLossType::L2 => LossType::L2,
            ArgLossType::Huber => LossType::Huber,
            ArgLossType::SmoothL1 => LossType::SmoothL1,
        },
        huber_schedule: match t.huber_schedule {
            ArgHuber::Constant => HuberSchedule::Constant,
            ArgHuber::Exponential => HuberSchedule::Exponential,
            ArgHuber::Snr => HuberSchedule::Snr,
        },
        huber_c: t.huber_c,
        huber_scale: t.huber_scale,
        min_snr_gamma: t.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred: t.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss: t.v_pred_like_loss,
        debiased_estimation_loss: t.debiased_estimation_loss,
        v_parameterization,
    }
}

/// Where and in which format models are written.
pub struct Output {
    pub dir: PathBuf,
    pub name: Option<String>,
    pub format: SaveFormat,
}

impl Output {
    pub fn new(args: &TrainArgs, model: &Model) -> Result<Self> {
        let dir = args
            .saving
            .output_dir
            .as_ref()
            .map(PathBuf::from)
            .ok_or_else(|| TrainError::Config("--output_dir is required".into()))?;
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let format = match &args.saving.save_model_as {
            Some(SaveModelAs::Ckpt) => SaveFormat::Ckpt,
            Some(SaveModelAs::Safetensors) => SaveFormat::Safetensors,
            Some(SaveModelAs::Diffusers) => SaveFormat::Diffusers,
            Some(SaveModelAs::DiffusersSafetensors) => SaveFormat::DiffusersSafetensors,
            None if args.saving.use_safetensors
                && !SaveFormat::of_source(&model.loaded.source).is_single_file() =>
            {
                SaveFormat::DiffusersSafetensors
            }
            None => SaveFormat::of_source(&model.loaded.source),
        };
        Ok(Output { dir, name: args.saving.output_name.clone(), format })
    }

    /// File or folder path for a model file name from `state::*_file_name`.
    pub fn path(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    /// The file extension with its dot (empty for Diffusers folders), as kohya's names take it.
    pub fn ext(&self) -> &'static str {
        self.format.extension()
    }
}

pub fn cwd() -> Result<PathBuf> {
    std::env::current_dir().map_err(|e| TrainError::io(".", e))
}

pub fn datasets(args: &TrainArgs) -> Result<DatasetGroup> {
    let opts = args.dataset_options().map_err(|e| TrainError::Config(e.to_string()))?;
    let cwd = cwd()?;
    let config = args.dataset.dataset_config.as_ref().map(Path::new);
    sdbooth_data::prepare_datasets(config, &opts, &cwd).map_err(|e| TrainError::Config(e.to_string()))
}

pub fn device() -> Device {
    Device::Cpu
}
