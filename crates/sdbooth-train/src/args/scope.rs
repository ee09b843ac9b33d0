//! kohya flags that sdbooth accepts only to refuse them with a reason (see support.rs): they
//! parse, so an old command line gets "--x is out of scope: why" instead of a parse error.

use clap::Args;
use serde::{Deserialize, Serialize};

use super::types::DYNAMO_BACKENDS;

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Refused (out of scope)")]
pub struct OutOfScopeArgs {
    /// DeepSpeed training.
    #[arg(long)]
    pub deepspeed: bool,
    /// DeepSpeed ZeRO stage.
    #[arg(long, value_name = "0-3", default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=3))]
    pub zero_stage: u8,
    /// DeepSpeed optimizer offload device.
    #[arg(long, value_name = "DEVICE", value_parser = ["cpu", "nvme"])]
    pub offload_optimizer_device: Option<String>,
    /// DeepSpeed optimizer NVMe path.
    #[arg(long, value_name = "PATH")]
    pub offload_optimizer_nvme_path: Option<String>,
    /// DeepSpeed parameter offload device.
    #[arg(long, value_name = "DEVICE", value_parser = ["cpu", "nvme"])]
    pub offload_param_device: Option<String>,
    /// DeepSpeed parameter NVMe path.
    #[arg(long, value_name = "PATH")]
    pub offload_param_nvme_path: Option<String>,
    /// DeepSpeed zero.Init.
    #[arg(long)]
    pub zero3_init_flag: bool,
    /// DeepSpeed 16-bit model saving.
    #[arg(long)]
    pub zero3_save_16bit_model: bool,
    /// DeepSpeed fp16 master weights.
    #[arg(long)]
    pub fp16_master_weights_and_gradients: bool,
    /// DDP timeout in minutes.
    #[arg(long, value_name = "MIN")]
    pub ddp_timeout: Option<u64>,
    /// DDP gradient_as_bucket_view.
    #[arg(long)]
    pub ddp_gradient_as_bucket_view: bool,
    /// DDP static_graph.
    #[arg(long)]
    pub ddp_static_graph: bool,
    /// torch.compile.
    #[arg(long)]
    pub torch_compile: bool,
    /// torch.compile backend.
    #[arg(long, value_name = "BACKEND", default_value = "inductor", value_parser = DYNAMO_BACKENDS)]
    pub dynamo_backend: String,
    /// fp8 base model weights.
    #[arg(long)]
    pub fp8_base: bool,
    /// Hugging Face upload: repository id.
    #[arg(long, value_name = "REPO")]
    pub huggingface_repo_id: Option<String>,
    /// Hugging Face upload: repository type.
    #[arg(long, value_name = "TYPE")]
    pub huggingface_repo_type: Option<String>,
    /// Hugging Face upload: path in the repository.
    #[arg(long, value_name = "PATH")]
    pub huggingface_path_in_repo: Option<String>,
    /// Hugging Face upload: token.
    #[arg(long, value_name = "TOKEN")]
    pub huggingface_token: Option<String>,
    /// Hugging Face upload: repository visibility.
    #[arg(long, value_name = "public|private")]
    pub huggingface_repo_visibility: Option<String>,
    /// Hugging Face upload: states too.
    #[arg(long)]
    pub save_state_to_huggingface: bool,
    /// Hugging Face: resume from a state in a repository.
    #[arg(long)]
    pub resume_from_huggingface: bool,
    /// Hugging Face upload in the background.
    #[arg(long)]
    pub async_upload: bool,
}
