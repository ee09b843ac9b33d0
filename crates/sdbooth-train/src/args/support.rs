//! Which flags this build implements: ONE table, `FLAG_SUPPORT`. When a feature lands, flip its
//! rows to `Implemented`. A flag whose value differs from kohya's default and whose row is not
//! `Implemented` is refused by `check_supported`, so no flag is ever silently ignored.

use super::{ArgsError, TrainArgs};

/// What this build does with a flag that is set (differs from kohya's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// The flag does what kohya's does (or what the README's "Differences from kohya" says).
    Implemented,
    /// Accepted with a warning: the flag has no meaning in sdbooth (the reason says why).
    Ignored(&'static str),
    /// Refused: "--x is not supported yet".
    NotYet,
    /// Refused for good: "--x is out of scope: <reason>".
    OutOfScope(&'static str),
}

use Support::{Ignored, Implemented, NotYet, OutOfScope};

const DEEPSPEED: &str = "DeepSpeed is a PyTorch library; multi-GPU training will use NCCL data parallelism";
const DDP: &str =
    "multi-process PyTorch DDP does not apply; multi-GPU training will use NCCL data parallelism";
const TORCH: &str = "torch.compile has no counterpart: sdbooth's kernels are compiled ahead of time";
const HUB: &str = "sdbooth does not upload to the Hugging Face Hub; upload the output folder yourself";
const WANDB: &str = "sdbooth does not talk to WandB; use --log_with tensorboard";

/// Every flag of `TrainArgs`, by kohya name, with its status in this build.
/// (A unit test checks the table and the struct list the same flags.)
pub const FLAG_SUPPORT: &[(&str, Support)] = &[
    // Run
    ("config_file", Implemented),
    ("output_config", Implemented),
    ("dry_run", Implemented),
    ("json", Implemented),
    ("debug_dataset", Implemented),
    ("device", Implemented),
    ("allow_tf32", Implemented),
    // Model: the dry run needs only the model's name.
    ("pretrained_model_name_or_path", Implemented),
    ("v2", Implemented),
    ("v_parameterization", Implemented),
    ("vae", Implemented),
    ("no_half_vae", Implemented),
    ("tokenizer_cache_dir", Ignored("the CLIP tokenizer ships inside sdbooth; nothing is downloaded")),
    ("clip_skip", Implemented),
    ("max_token_length", Implemented),
    ("no_token_padding", Implemented),
    // Dataset (sdbooth-data)
    ("dataset_config", Implemented),
    ("train_data_dir", Implemented),
    ("reg_data_dir", Implemented),
    ("resolution", Implemented),
    ("enable_bucket", Implemented),
    ("min_bucket_reso", Implemented),
    ("max_bucket_reso", Implemented),
    ("bucket_reso_steps", Implemented),
    ("bucket_no_upscale", Implemented),
    ("resize_interpolation", Implemented),
    ("caption_extension", Implemented),
    ("caption_extention", Implemented),
    ("shuffle_caption", Implemented),
    ("caption_separator", Implemented),
    ("keep_tokens", Implemented),
    ("keep_tokens_separator", Implemented),
    ("secondary_separator", Implemented),
    ("enable_wildcard", Implemented),
    ("caption_prefix", Implemented),
    ("caption_suffix", Implemented),
    ("caption_dropout_rate", Implemented),
    ("caption_dropout_every_n_epochs", Implemented),
    ("caption_tag_dropout_rate", Implemented),
    ("token_warmup_min", Implemented),
    ("token_warmup_step", Implemented),
    ("weighted_captions", Implemented),
    ("color_aug", Implemented),
    ("flip_aug", Implemented),
    ("random_crop", Implemented),
    ("face_crop_aug_range", Implemented),
    ("alpha_mask", Implemented),
    ("conditioning_data_dir", NotYet),
    ("cache_info", NotYet),
    ("dataset_class", OutOfScope("a Python dataset class cannot be loaded; use --dataset_config")),
    ("validation_split", Implemented),
    ("validation_seed", Implemented),
    ("skip_bad_images", Implemented),
    ("ignore_exif_orientation", Implemented),
    // Training: the dry run computes batches, epochs and steps from these.
    ("train_batch_size", Implemented),
    ("max_train_steps", Implemented),
    ("max_train_epochs", Implemented),
    ("gradient_accumulation_steps", Implemented),
    ("seed", Implemented),
    ("prior_loss_weight", Implemented),
    ("stop_text_encoder_training", Implemented),
    ("cache_latents", Implemented),
    ("cache_latents_to_disk", Implemented),
    ("skip_cache_check", Implemented),
    ("vae_batch_size", Implemented),
    ("max_data_loader_n_workers", Implemented),
    (
        "persistent_data_loader_workers",
        Ignored("images load on threads of this process; there are no worker processes to keep"),
    ),
    // Loss and noise
    ("loss_type", Implemented),
    ("huber_schedule", Implemented),
    ("huber_c", Implemented),
    ("huber_scale", Implemented),
    ("min_snr_gamma", Implemented),
    ("scale_v_pred_loss_like_noise_pred", Implemented),
    ("v_pred_like_loss", Implemented),
    ("debiased_estimation_loss", Implemented),
    ("masked_loss", Implemented),
    ("noise_offset", Implemented),
    ("noise_offset_random_strength", Implemented),
    ("adaptive_noise_scale", Implemented),
    ("multires_noise_iterations", Implemented),
    ("multires_noise_discount", Implemented),
    ("ip_noise_gamma", Implemented),
    ("ip_noise_gamma_random_strength", Implemented),
    ("zero_terminal_snr", Implemented),
    ("min_timestep", Implemented),
    ("max_timestep", Implemented),
    // Optimizer
    ("optimizer_type", Implemented),
    ("learning_rate", Implemented),
    ("learning_rate_te", Implemented),
    ("optimizer_args", Implemented),
    ("max_grad_norm", Implemented),
    ("use_8bit_adam", Implemented),
    ("use_lion_optimizer", Implemented),
    ("fused_backward_pass", Implemented),
    ("lr_scheduler", Implemented),
    ("lr_warmup_steps", Implemented),
    ("lr_decay_steps", Implemented),
    ("lr_scheduler_num_cycles", Implemented),
    ("lr_scheduler_power", Implemented),
    ("lr_scheduler_timescale", Implemented),
    ("lr_scheduler_min_lr_ratio", Implemented),
    ("lr_scheduler_type", OutOfScope("a custom Python scheduler class cannot be loaded; use --lr_scheduler")),
    ("lr_scheduler_args", NotYet),
    // Memory and precision
    ("mixed_precision", Implemented),
    ("full_fp16", NotYet),
    ("full_bf16", Implemented),
    ("gradient_checkpointing", Implemented),
    // sdbooth's attention is always the memory-efficient kind these three flags ask for.
    ("mem_eff_attn", Implemented),
    ("xformers", Implemented),
    ("sdpa", Implemented),
    ("lowram", Ignored("sdbooth always loads weights straight into place, never holding a second copy")),
    ("highvram", Implemented),
    // Saving
    ("output_dir", Implemented),
    ("output_name", Implemented),
    ("save_model_as", Implemented),
    ("use_safetensors", Implemented),
    ("save_precision", Implemented),
    ("save_every_n_epochs", Implemented),
    ("save_every_n_steps", Implemented),
    ("save_n_epoch_ratio", Implemented),
    ("save_last_n_epochs", Implemented),
    ("save_last_n_epochs_state", Implemented),
    ("save_last_n_steps", Implemented),
    ("save_last_n_steps_state", Implemented),
    ("save_state", Implemented),
    ("save_state_on_train_end", Implemented),
    ("resume", Implemented),
    // Model metadata
    ("metadata_title", Implemented),
    ("metadata_author", Implemented),
    ("metadata_description", Implemented),
    ("metadata_license", Implemented),
    ("metadata_tags", Implemented),
    ("metadata_usage_hint", Implemented),
    ("metadata_thumbnail", Implemented),
    ("metadata_merged_from", Implemented),
    ("metadata_trigger_phrase", Implemented),
    ("metadata_preprocessor", Implemented),
    ("metadata_is_negative_embedding", Implemented),
    // Sampling
    ("sample_prompts", Implemented),
    ("sample_every_n_steps", Implemented),
    ("sample_every_n_epochs", Implemented),
    ("sample_at_first", Implemented),
    ("sample_sampler", Implemented),
    // Logging (log_with's values are checked in `refusals`: wandb is out of scope)
    ("console_log_level", Implemented),
    ("console_log_file", Implemented),
    ("console_log_simple", Implemented),
    ("logging_dir", Implemented),
    ("log_with", Implemented),
    ("log_prefix", Implemented),
    ("log_tracker_name", Implemented),
    ("log_tracker_config", NotYet),
    ("log_config", NotYet),
    ("wandb_run_name", OutOfScope(WANDB)),
    ("wandb_api_key", OutOfScope(WANDB)),
    // Out of scope
    ("deepspeed", OutOfScope(DEEPSPEED)),
    ("zero_stage", OutOfScope(DEEPSPEED)),
    ("offload_optimizer_device", OutOfScope(DEEPSPEED)),
    ("offload_optimizer_nvme_path", OutOfScope(DEEPSPEED)),
    ("offload_param_device", OutOfScope(DEEPSPEED)),
    ("offload_param_nvme_path", OutOfScope(DEEPSPEED)),
    ("zero3_init_flag", OutOfScope(DEEPSPEED)),
    ("zero3_save_16bit_model", OutOfScope(DEEPSPEED)),
    ("fp16_master_weights_and_gradients", OutOfScope(DEEPSPEED)),
    ("ddp_timeout", OutOfScope(DDP)),
    ("ddp_gradient_as_bucket_view", OutOfScope(DDP)),
    ("ddp_static_graph", OutOfScope(DDP)),
    ("torch_compile", OutOfScope(TORCH)),
    ("dynamo_backend", OutOfScope(TORCH)),
    (
        "fp8_base",
        OutOfScope("fp8 base weights are not planned for SD 1.x/2.x; use --full_bf16 to save memory"),
    ),
    ("huggingface_repo_id", OutOfScope(HUB)),
    ("huggingface_repo_type", OutOfScope(HUB)),
    ("huggingface_path_in_repo", OutOfScope(HUB)),
    ("huggingface_token", OutOfScope(HUB)),
    ("huggingface_repo_visibility", OutOfScope(HUB)),
    ("save_state_to_huggingface", OutOfScope(HUB)),
    ("resume_from_huggingface", OutOfScope(HUB)),
    ("async_upload", OutOfScope(HUB)),
];

/// Why a set flag cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    NotYet,
    OutOfScope,
}

/// One refused flag, with the message the user sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub flag: String,
    pub kind: RefusalKind,
    pub message: String,
}

/// The status of one flag in the table (None: not a flag of ours).
pub fn support_of(flag: &str) -> Option<Support> {
    FLAG_SUPPORT.iter().find(|(f, _)| *f == flag).map(|(_, s)| *s)
}

impl TrainArgs {
    /// Every set flag this build does not implement, with its message, in table order. A flag
    /// value that cannot train (`check_values`) is an error first, so every command that checks
    /// its flags (train, its dry run, bench) checks their values too.
    pub fn refusals(&self) -> Result<Vec<Refusal>, ArgsError> {
        self.check_values()?;
        let changed = self.changed_flags()?;
        let mut out = Vec::new();
        for (flag, status) in FLAG_SUPPORT {
            if !changed.iter().any(|c| c == flag) {
                continue;
            }
            // --log_with: the value decides. wandb (and "all", which includes it) is out of scope.
            let status = match (*flag, self.logging.log_with) {
                ("log_with", Some(super::types::LogWith::Wandb | super::types::LogWith::All)) => {
                    OutOfScope(WANDB)
                }
                _ => *status,
            };
            match status {
                Implemented | Ignored(_) => {}
                NotYet => out.push(Refusal {
                    flag: flag.to_string(),
                    kind: RefusalKind::NotYet,
                    message: format!("--{flag} is not supported yet"),
                }),
                OutOfScope(why) => out.push(Refusal {
                    flag: flag.to_string(),
                    kind: RefusalKind::OutOfScope,
                    message: format!("--{flag} is out of scope: {why}"),
                }),
            }
        }
        Ok(out)
    }

    /// Warnings for set flags that sdbooth accepts but has no use for.
    pub fn ignored_flag_warnings(&self) -> Result<Vec<String>, ArgsError> {
        let changed = self.changed_flags()?;
        Ok(FLAG_SUPPORT
            .iter()
            .filter(|(f, _)| changed.iter().any(|c| c == f))
            .filter_map(|(f, s)| match s {
                Ignored(why) => Some(format!("--{f} is ignored: {why}")),
                _ => None,
            })
            .collect())
    }

    /// `Ok` when every set flag is implemented; else one message per refused flag:
    /// "--x is not supported yet" or "--x is out of scope: why".
    pub fn check_supported(&self) -> Result<(), Vec<String>> {
        match self.refusals() {
            Ok(r) if r.is_empty() => Ok(()),
            Ok(r) => Err(r.into_iter().map(|r| r.message).collect()),
            Err(e) => Err(vec![e.to_string()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> TrainArgs {
        match TrainArgs::try_parse_from(flags) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn table_lists_every_flag_once() {
        let map = TrainArgs::defaults().and_then(|d| d.to_flag_map()).map_err(|e| e.to_string());
        let map = match map {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        for key in map.keys() {
            assert!(support_of(key).is_some(), "flag --{key} is missing from FLAG_SUPPORT");
        }
        for (i, (flag, _)) in FLAG_SUPPORT.iter().enumerate() {
            assert!(map.contains_key(*flag), "FLAG_SUPPORT lists --{flag}, which TrainArgs does not have");
            assert!(!FLAG_SUPPORT[..i].iter().any(|(f, _)| f == flag), "--{flag} is listed twice");
        }
        assert_eq!(map.len(), FLAG_SUPPORT.len());
    }

    #[test]
    fn defaults_and_dataset_flags_pass() {
        assert_eq!(parse(&[]).check_supported(), Ok(()));
        let a = parse(&[
            "--pretrained_model_name_or_path=builtin:tiny-sd1",
            "--dataset_config=dataset.toml",
            "--output_dir=out",
            "--dry_run",
            "--skip_bad_images",
            "--resolution=768,512",
            "--enable_bucket",
            "--seed=3",
        ]);
        assert_eq!(a.check_supported(), Ok(()));
    }

    #[test]
    fn refuses_each_unimplemented_flag_by_name() {
        let a = parse(&[
            "--full_fp16",
            "--deepspeed",
            "--zero_stage=3",
            "--learning_rate=1e-6",
            "--torch_compile",
        ]);
        let msgs = match a.check_supported() {
            Err(m) => m,
            Ok(()) => panic!("refusals expected"),
        };
        assert!(msgs.contains(&"--full_fp16 is not supported yet".to_string()), "{msgs:?}");
        // Implemented flags are not refused.
        assert!(!msgs.iter().any(|m| m.contains("--learning_rate")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("--deepspeed is out of scope: ")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("--zero_stage is out of scope: ")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("--torch_compile is out of scope: ")), "{msgs:?}");
        assert_eq!(msgs.len(), 4);
    }

    #[test]
    fn log_with_value_decides() {
        let wandb = parse(&["--log_with=wandb"]).refusals().unwrap_or_default();
        assert_eq!(wandb.len(), 1);
        assert_eq!(wandb[0].kind, RefusalKind::OutOfScope);
        let all = parse(&["--log_with=all"]).refusals().unwrap_or_default();
        assert_eq!(all[0].kind, RefusalKind::OutOfScope);
        let tb = parse(&["--log_with=tensorboard"]).refusals().unwrap_or_default();
        assert!(tb.is_empty(), "TensorBoard logging is implemented: {tb:?}");
    }

    #[test]
    fn every_out_of_scope_group_is_refused() {
        for flags in [
            vec!["--ddp_static_graph"],
            vec!["--ddp_timeout=30"],
            vec!["--fp8_base"],
            vec!["--dynamo_backend=eager"],
            vec!["--huggingface_repo_id=me/model"],
            vec!["--async_upload"],
            vec!["--offload_optimizer_device=cpu"],
        ] {
            let r = parse(&flags).refusals().unwrap_or_default();
            assert_eq!(r.len(), 1, "{flags:?}");
            assert_eq!(r[0].kind, RefusalKind::OutOfScope, "{flags:?}");
        }
    }

    #[test]
    fn ignored_flags_warn_but_pass() {
        let a = parse(&["--tokenizer_cache_dir=cache"]);
        assert_eq!(a.check_supported(), Ok(()));
        let w = a.ignored_flag_warnings().unwrap_or_default();
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("--tokenizer_cache_dir is ignored"));
    }
}
