//! Flags → settings, one `From` per target. Each conversion names every field it fills (no
//! `..Default::default()`), so a field renamed on either side fails to compile.

use std::path::PathBuf;

use clap::ValueEnum;
use sdbooth_checkpoint::{ModelSpecArgs, Precision, SaveFormat};
use sdbooth_data::DatasetOptions;

use super::{Resume, SamplePolicy, SavePolicy};
use crate::args::types::{self, SampleSampler};
use crate::args::{OptimizerArgs, SamplingArgs, TrainArgs};
use crate::loss::{HuberSchedule, LossArgs, LossType};
use crate::lr::{LrSchedulerArgs, StepsOrRatio};
use crate::noise::NoiseArgs;

impl From<types::LossType> for LossType {
    fn from(v: types::LossType) -> Self {
        match v {
            types::LossType::L1 => LossType::L1,
            types::LossType::L2 => LossType::L2,
            types::LossType::Huber => LossType::Huber,
            types::LossType::SmoothL1 => LossType::SmoothL1,
        }
    }
}

impl From<types::HuberSchedule> for HuberSchedule {
    fn from(v: types::HuberSchedule) -> Self {
        match v {
            types::HuberSchedule::Constant => HuberSchedule::Constant,
            types::HuberSchedule::Exponential => HuberSchedule::Exponential,
            types::HuberSchedule::Snr => HuberSchedule::Snr,
        }
    }
}

impl From<types::StepsOrRatio> for StepsOrRatio {
    fn from(v: types::StepsOrRatio) -> Self {
        match v {
            types::StepsOrRatio::Steps(n) => StepsOrRatio::Steps(n),
            types::StepsOrRatio::Ratio(r) => StepsOrRatio::Ratio(r),
        }
    }
}

impl From<types::SavePrecision> for Precision {
    fn from(v: types::SavePrecision) -> Self {
        match v {
            types::SavePrecision::Float => Precision::Float,
            types::SavePrecision::Fp16 => Precision::Fp16,
            types::SavePrecision::Bf16 => Precision::Bf16,
        }
    }
}

impl From<types::SaveModelAs> for SaveFormat {
    fn from(v: types::SaveModelAs) -> Self {
        match v {
            types::SaveModelAs::Ckpt => SaveFormat::Ckpt,
            types::SaveModelAs::Safetensors => SaveFormat::Safetensors,
            types::SaveModelAs::Diffusers => SaveFormat::Diffusers,
            types::SaveModelAs::DiffusersSafetensors => SaveFormat::DiffusersSafetensors,
        }
    }
}

/// kohya's sampler name: the flag's own value name (one spelling for `--help`, config files
/// and the sampler lookup).
fn sampler_name(v: SampleSampler) -> String {
    v.to_possible_value().map_or_else(|| "ddim".to_string(), |p| p.get_name().to_string())
}

impl From<&crate::args::LossArgs> for NoiseArgs {
    fn from(t: &crate::args::LossArgs) -> Self {
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
}

/// The loss settings; `v_parameterization` is the model's, set once it is loaded.
impl From<&crate::args::LossArgs> for LossArgs {
    fn from(t: &crate::args::LossArgs) -> Self {
        LossArgs {
            loss_type: t.loss_type.into(),
            huber_schedule: t.huber_schedule.into(),
            huber_c: t.huber_c,
            huber_scale: t.huber_scale,
            min_snr_gamma: t.min_snr_gamma,
            scale_v_pred_loss_like_noise_pred: t.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss: t.v_pred_like_loss,
            debiased_estimation_loss: t.debiased_estimation_loss,
            v_parameterization: false,
        }
    }
}

impl From<&OptimizerArgs> for LrSchedulerArgs {
    fn from(o: &OptimizerArgs) -> Self {
        LrSchedulerArgs {
            lr_scheduler: o.lr_scheduler.clone(),
            lr_warmup_steps: o.lr_warmup_steps.into(),
            lr_decay_steps: o.lr_decay_steps.into(),
            lr_scheduler_num_cycles: u64::from(o.lr_scheduler_num_cycles),
            lr_scheduler_power: o.lr_scheduler_power,
            lr_scheduler_timescale: o.lr_scheduler_timescale,
            lr_scheduler_min_lr_ratio: o.lr_scheduler_min_lr_ratio,
        }
    }
}

impl From<&SamplingArgs> for SamplePolicy {
    fn from(s: &SamplingArgs) -> Self {
        SamplePolicy {
            prompts: s.sample_prompts.as_ref().map(PathBuf::from),
            prompt_specs: Vec::new(),
            every_n_steps: s.sample_every_n_steps.filter(|&n| n > 0),
            every_n_epochs: s.sample_every_n_epochs.filter(|&n| n > 0).map(u64::from),
            at_first: s.sample_at_first,
            sampler: sampler_name(s.sample_sampler),
        }
    }
}

impl From<&TrainArgs> for SavePolicy {
    fn from(args: &TrainArgs) -> Self {
        let s = &args.saving;
        let m = &args.metadata;
        SavePolicy {
            output_dir: s.output_dir.as_ref().map(PathBuf::from),
            output_name: s.output_name.clone(),
            format: s.save_model_as.map(SaveFormat::from),
            use_safetensors: s.use_safetensors,
            precision: s.save_precision.map(Precision::from),
            every_n_steps: s.save_every_n_steps.filter(|&n| n > 0),
            every_n_epochs: s.save_every_n_epochs.map(u64::from),
            n_epoch_ratio: s.save_n_epoch_ratio.filter(|&r| r > 0).map(u64::from),
            last_n_steps: s.save_last_n_steps,
            last_n_steps_state: s.save_last_n_steps_state,
            last_n_epochs: s.save_last_n_epochs.map(u64::from),
            last_n_epochs_state: s.save_last_n_epochs_state.map(u64::from),
            save_state: s.save_state,
            save_state_on_train_end: s.save_state_on_train_end,
            resume: s.resume.as_deref().map(|r| match r {
                "auto" => Resume::Latest,
                dir => Resume::From(PathBuf::from(dir)),
            }),
            metadata: ModelSpecArgs {
                title: m.metadata_title.clone(),
                output_name: s.output_name.clone(),
                author: m.metadata_author.clone(),
                description: m.metadata_description.clone(),
                license: m.metadata_license.clone(),
                tags: m.metadata_tags.clone(),
                usage_hint: m.metadata_usage_hint.clone(),
                thumbnail: m.metadata_thumbnail.clone(),
                merged_from: m.metadata_merged_from.clone(),
                trigger_phrase: m.metadata_trigger_phrase.clone(),
                preprocessor: m.metadata_preprocessor.clone(),
                is_negative_embedding: m.metadata_is_negative_embedding.clone(),
                resolution: None,
                timesteps: None,
                clip_skip: args.model.clip_skip.map(|v| v as usize),
            },
        }
    }
}

/// The command-line fallbacks of the dataset TOML (sdbooth-data's `DatasetOptions`).
impl From<&TrainArgs> for DatasetOptions {
    fn from(a: &TrainArgs) -> Self {
        let d = &a.dataset;
        let t = &a.training;
        DatasetOptions {
            train_data_dir: d.train_data_dir.clone(),
            reg_data_dir: d.reg_data_dir.clone(),
            resolution: d.resolution.clone(),
            train_batch_size: t.train_batch_size,
            enable_bucket: d.enable_bucket,
            min_bucket_reso: d.min_bucket_reso,
            max_bucket_reso: d.max_bucket_reso,
            bucket_reso_steps: d.bucket_reso_steps,
            bucket_no_upscale: d.bucket_no_upscale,
            caption_extension: d.caption_extension.clone(),
            caption_extention: d.caption_extention.clone(),
            shuffle_caption: d.shuffle_caption,
            keep_tokens: d.keep_tokens,
            keep_tokens_separator: d.keep_tokens_separator.clone(),
            caption_separator: d.caption_separator.clone(),
            secondary_separator: d.secondary_separator.clone(),
            enable_wildcard: d.enable_wildcard,
            caption_prefix: d.caption_prefix.clone(),
            caption_suffix: d.caption_suffix.clone(),
            caption_dropout_rate: d.caption_dropout_rate,
            caption_dropout_every_n_epochs: d.caption_dropout_every_n_epochs,
            caption_tag_dropout_rate: d.caption_tag_dropout_rate,
            color_aug: d.color_aug,
            flip_aug: d.flip_aug,
            random_crop: d.random_crop,
            face_crop_aug_range: d.face_crop_aug_range.clone(),
            token_warmup_min: d.token_warmup_min,
            token_warmup_step: d.token_warmup_step,
            weighted_captions: d.weighted_captions,
            alpha_mask: d.alpha_mask,
            resize_interpolation: d.resize_interpolation.clone(),
            prior_loss_weight: t.prior_loss_weight,
            max_token_length: a.model.max_token_length,
            debug_dataset: a.run.debug_dataset,
            cache_info: d.cache_info,
            seed: t.seed,
            ignore_exif_orientation: d.ignore_exif_orientation,
            skip_bad_images: d.skip_bad_images,
            validation_split: d.validation_split,
            validation_seed: d.validation_seed,
            max_train_steps: t.max_train_steps,
            max_train_epochs: t.max_train_epochs,
            gradient_accumulation_steps: t.gradient_accumulation_steps,
            cache_latents: t.cache_latents,
            cache_latents_to_disk: t.cache_latents_to_disk,
        }
    }
}
