//! Model and text-encoder flags (kohya: add_sd_models_arguments, train_db's own flags).

use clap::Args;
use serde::{Deserialize, Serialize};

use super::types::parse_max_token_length;

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Model")]
pub struct ModelArgs {
    /// Base model: SD .safetensors/.ckpt file, Diffusers folder, Hugging Face id, or builtin:NAME.
    #[arg(long, value_name = "MODEL")]
    pub pretrained_model_name_or_path: Option<String>,
    /// The model is Stable Diffusion 2.x.
    #[arg(long)]
    pub v2: bool,
    /// Train with v-prediction (SD 2.x 768-v models).
    #[arg(long)]
    pub v_parameterization: bool,
    /// VAE to use instead of the model's own (file or Diffusers folder).
    #[arg(long, value_name = "PATH")]
    pub vae: Option<String>,
    /// Keep the VAE in fp32 under --mixed_precision.
    #[arg(long)]
    pub no_half_vae: bool,
    /// Folder for tokenizer files (kohya downloads them; sdbooth ships its tokenizer in the binary).
    #[arg(long, value_name = "DIR")]
    pub tokenizer_cache_dir: Option<String>,
    /// Use the output of the N-th text encoder layer from the end (1 = last).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub clip_skip: Option<u32>,
    /// Longer captions: 150 or 225 tokens (unset: 75).
    #[arg(long, value_name = "150|225", value_parser = parse_max_token_length)]
    pub max_token_length: Option<u32>,
    /// Do not pad token sequences (old Diffusers DreamBooth behaviour; kohya ignores this flag).
    #[arg(long)]
    pub no_token_padding: bool,
}
