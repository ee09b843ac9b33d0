//! Architecture descriptions: the real SD1/SD2 sizes and tiny test models of the same structure.
//!
//! Field names follow diffusers' config.json keys, so a Diffusers folder's configs map onto these
//! structs one to one.

use serde::{Deserialize, Serialize};

/// What the model predicts; training targets and samplers depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// The two kinds of blocks in the U-Net's down and up paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// ResNet blocks with transformer blocks (cross-attention to the text).
    CrossAttn,
    /// ResNet blocks only.
    Plain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// OpenAI CLIP (SD1): `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// OpenCLIP (SD2): exact GELU.
    Gelu,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Kind of each down block; the up path mirrors it in reverse.
    pub down_blocks: Vec<BlockKind>,
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// Number of attention heads in each block (diffusers calls this `attention_head_dim` for
    /// SD1/SD2 checkpoints, a historical misnomer).
    pub num_heads: Vec<usize>,
    /// SD2 uses linear `proj_in`/`proj_out` in transformer blocks, SD1 1x1 convolutions.
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Latent size the model was trained at (64 for 512 px, 96 for 768 px).
    pub sample_size: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Layers held (SD2: 23 of OpenCLIP's 24, as kohya and diffusers hold it).
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `sd1`, `sd2-512`, `sd2-768-v`, `tiny-sd1`, `tiny-sd2`.
    pub name: String,
    /// SD 2.x family (OpenCLIP text encoder, linear projections, pad token "!").
    pub v2: bool,
    pub prediction: Prediction,
    /// Native image resolution in pixels.
    pub resolution: usize,
    pub unet: UNetConfig,
    pub text: ClipConfig,
    pub vae: VaeConfig,
}

const SD_BLOCKS: [BlockKind; 4] =
    [BlockKind::CrossAttn, BlockKind::CrossAttn, BlockKind::CrossAttn, BlockKind::Plain];

fn sd_vae() -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        latent_channels: 4,
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        norm_num_groups: 32,
        scaling_factor: 0.18215,
    }
}

impl ModelConfig {
    /// Stable Diffusion 1.x (CLIP ViT-L/14 text encoder).
    pub fn sd1() -> Self {
        ModelConfig {
            name: "sd1".into(),
            v2: false,
            prediction: Prediction::Epsilon,
            resolution: 512,
            unet: UNetConfig {
                in_channels: 4,
                out_channels: 4,
                block_out_channels: vec![320, 640, 1280, 1280],
                down_blocks: SD_BLOCKS.to_vec(),
                layers_per_block: 2,
                cross_attention_dim: 768,
                num_heads: vec![8, 8, 8, 8],
                use_linear_projection: false,
                norm_num_groups: 32,
                norm_eps: 1e-5,
                flip_sin_to_cos: true,
                freq_shift: 0.0,
                sample_size: 64,
            },
            text: ClipConfig {
                vocab_size: 49408,
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                max_position_embeddings: 77,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            vae: sd_vae(),
        }
    }

    /// Stable Diffusion 2.x base (512 px, ε-prediction; OpenCLIP ViT-H text encoder).
    pub fn sd2_512() -> Self {
        ModelConfig {
            name: "sd2-512".into(),
            v2: true,
            prediction: Prediction::Epsilon,
            resolution: 512,
            unet: UNetConfig {
                cross_attention_dim: 1024,
                // Head dim 64 in every block.
                num_heads: vec![5, 10, 20, 20],
                use_linear_projection: true,
                ..ModelConfig::sd1().unet
            },
            text: ClipConfig {
                vocab_size: 49408,
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 23,
                num_attention_heads: 16,
                max_position_embeddings: 77,
                hidden_act: Activation::Gelu,
                layer_norm_eps: 1e-5,
            },
            vae: sd_vae(),
        }
    }

    /// Stable Diffusion 2.x 768 px, v-prediction.
    pub fn sd2_768_v() -> Self {
        let mut c = ModelConfig::sd2_512();
        c.name = "sd2-768-v".into();
        c.prediction = Prediction::VPrediction;
        c.resolution = 768;
        c.unet.sample_size = 96;
        c
    }

    /// A few-channel SD1 with the same block structure, for tests.
    pub fn tiny_sd1() -> Self {
        ModelConfig {
            name: "tiny-sd1".into(),
            v2: false,
            prediction: Prediction::Epsilon,
            resolution: 64,
            unet: UNetConfig {
                in_channels: 4,
                out_channels: 4,
                block_out_channels: vec![32, 32, 64, 64],
                down_blocks: SD_BLOCKS.to_vec(),
                layers_per_block: 1,
                cross_attention_dim: 32,
                num_heads: vec![2, 2, 2, 2],
                use_linear_projection: false,
                norm_num_groups: 8,
                norm_eps: 1e-5,
                flip_sin_to_cos: true,
                freq_shift: 0.0,
                sample_size: 8,
            },
            text: ClipConfig {
                vocab_size: 49408,
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                max_position_embeddings: 77,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            vae: VaeConfig {
                in_channels: 3,
                out_channels: 3,
                latent_channels: 4,
                block_out_channels: vec![16, 16, 32, 32],
                layers_per_block: 1,
                norm_num_groups: 8,
                scaling_factor: 0.18215,
            },
        }
    }

    /// A few-channel SD2 (linear projections, GELU text encoder, head dim 16), for tests.
    pub fn tiny_sd2() -> Self {
        let mut c = ModelConfig::tiny_sd1();
        c.name = "tiny-sd2".into();
        c.v2 = true;
        c.unet.use_linear_projection = true;
        c.unet.num_heads = vec![2, 2, 4, 4];
        c.text.hidden_act = Activation::Gelu;
        c
    }

    /// Looks a configuration up by name (`sd1`, `sd2-512`, `sd2-768-v`, `tiny-sd1`, `tiny-sd2`).
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "sd1" => Some(Self::sd1()),
            "sd2-512" => Some(Self::sd2_512()),
            "sd2-768-v" => Some(Self::sd2_768_v()),
            "tiny-sd1" => Some(Self::tiny_sd1()),
            "tiny-sd2" => Some(Self::tiny_sd2()),
            _ => None,
        }
    }
}

/// A model created in memory with seeded random weights: no file needed.
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltinModel {
    pub config: ModelConfig,
    pub seed: u64,
}

/// Resolves `builtin:tiny-sd1`, `builtin:tiny-sd2`, `builtin:sd15-random`, `builtin:sd21-random`
/// (with or without the `builtin:` prefix). The seed is fixed per name so runs are reproducible.
pub fn builtin(spec: &str) -> Option<BuiltinModel> {
    let name = spec.strip_prefix("builtin:").unwrap_or(spec);
    let (config, seed) = match name {
        "tiny-sd1" => (ModelConfig::tiny_sd1(), 1),
        "tiny-sd2" => (ModelConfig::tiny_sd2(), 2),
        "sd15-random" => (ModelConfig::sd1(), 15),
        "sd21-random" => (ModelConfig::sd2_768_v(), 21),
        _ => return None,
    };
    Some(BuiltinModel { config, seed })
}

/// The names `builtin()` accepts, for error messages.
pub const BUILTIN_NAMES: [&str; 4] =
    ["builtin:tiny-sd1", "builtin:tiny-sd2", "builtin:sd15-random", "builtin:sd21-random"];
