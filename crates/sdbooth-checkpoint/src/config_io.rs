//! Architecture from a file: inferred from an SD single file's tensor shapes, or read from a
//! Diffusers folder's config.json files; and the config.json files we write.

use std::collections::BTreeMap;
use std::path::Path;

use sdbooth_models::config::{Activation, BlockKind, ClipConfig, UNetConfig, VaeConfig};
use sdbooth_models::{ModelConfig, Prediction};
use serde_json::{json, Value};

use crate::error::{CheckpointError, Result};

/// Shapes by SD key, as read from a file's index.
pub type ShapeMap = BTreeMap<String, Vec<usize>>;

fn dim(shapes: &ShapeMap, key: &str, i: usize) -> Option<usize> {
    shapes.get(key).and_then(|s| s.get(i)).copied()
}

fn max_index(shapes: &ShapeMap, prefix: &str) -> Option<usize> {
    shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next())
        .filter_map(|i| i.parse::<usize>().ok())
        .max()
}

/// The named configs, for recognising a file as exactly one of them.
fn named() -> [ModelConfig; 5] {
    [
        ModelConfig::sd1(),
        ModelConfig::sd2_512(),
        ModelConfig::sd2_768_v(),
        ModelConfig::tiny_sd1(),
        ModelConfig::tiny_sd2(),
    ]
}

fn same_structure(a: &ModelConfig, b: &ModelConfig) -> bool {
    let u = |c: &UNetConfig| {
        (
            c.in_channels,
            c.out_channels,
            c.block_out_channels.clone(),
            c.down_blocks.clone(),
            c.layers_per_block,
        )
    };
    u(&a.unet) == u(&b.unet)
        && a.unet.cross_attention_dim == b.unet.cross_attention_dim
        && a.unet.use_linear_projection == b.unet.use_linear_projection
        && (a.text.vocab_size, a.text.hidden_size, a.text.intermediate_size, a.text.num_hidden_layers)
            == (b.text.vocab_size, b.text.hidden_size, b.text.intermediate_size, b.text.num_hidden_layers)
        && a.text.max_position_embeddings == b.text.max_position_embeddings
        && (a.vae.block_out_channels.clone(), a.vae.layers_per_block, a.vae.latent_channels)
            == (b.vae.block_out_channels.clone(), b.vae.layers_per_block, b.vae.latent_channels)
}

/// Replaces the fields shapes cannot tell (heads, norm groups, scaling) with a named config's
/// when the structure is one of them; otherwise keeps SD's conventions.
fn settle(mut cfg: ModelConfig) -> ModelConfig {
    for n in named() {
        if n.v2 == cfg.v2 && same_structure(&n, &cfg) {
            let prediction = cfg.prediction;
            let mut out = n;
            if out.v2 && prediction != out.prediction {
                out = if prediction == Prediction::VPrediction {
                    ModelConfig::sd2_768_v()
                } else {
                    ModelConfig::sd2_512()
                };
                if !same_structure(&out, &cfg) {
                    // A tiny SD2: same structure, only the prediction differs.
                    out = cfg.clone();
                }
            }
            out.prediction = prediction;
            return out;
        }
    }
    cfg.name = if cfg.v2 { "custom-sd2".into() } else { "custom-sd1".into() };
    cfg
}

fn groups_for(channels: &[usize]) -> usize {
    [32, 16, 8, 4, 2, 1].into_iter().find(|g| channels.iter().all(|c| c % g == 0)).unwrap_or(1)
}

/// Infers the architecture of an SD single file from its tensor shapes.
pub fn infer_single_file(path: &Path, shapes: &ShapeMap, v_pred: bool) -> Result<ModelConfig> {
    let not_model = |reason: &str| CheckpointError::NotAModel { path: path.into(), reason: reason.into() };
    let u = "model.diffusion_model.";
    let conv_in = shapes
        .get(&format!("{u}input_blocks.0.0.weight"))
        .ok_or_else(|| not_model("no U-Net (model.diffusion_model.input_blocks.0.0.weight) in the file"))?;
    if conv_in.len() != 4 {
        return Err(not_model("U-Net conv_in is not a 4-D convolution"));
    }
    let v2 = shapes.keys().any(|k| k.starts_with("cond_stage_model.model."));
    // The first downsampler sits at input_blocks.(L+1).0.op.
    let first_op = (1..64)
        .find(|k| shapes.contains_key(&format!("{u}input_blocks.{k}.0.op.weight")))
        .ok_or_else(|| not_model("no U-Net downsampler found"))?;
    let l = first_op - 1;
    let n_in = max_index(shapes, &format!("{u}input_blocks.")).unwrap_or(0) + 1;
    let n = n_in / (l + 1);
    let mut channels = Vec::new();
    let mut kinds = Vec::new();
    for i in 0..n {
        let b = (l + 1) * i + 1;
        let c = dim(shapes, &format!("{u}input_blocks.{b}.0.out_layers.3.weight"), 0)
            .ok_or_else(|| not_model("U-Net down block without a ResNet"))?;
        channels.push(c);
        let attn = shapes.contains_key(&format!("{u}input_blocks.{b}.1.norm.weight"));
        kinds.push(if attn { BlockKind::CrossAttn } else { BlockKind::Plain });
    }
    let cross = shapes
        .iter()
        .find(|(k, _)| k.starts_with(u) && k.ends_with("attn2.to_k.weight"))
        .and_then(|(_, s)| s.get(1).copied())
        .ok_or_else(|| not_model("no U-Net cross-attention found"))?;
    let linear = shapes
        .iter()
        .find(|(k, _)| k.starts_with(u) && k.ends_with("proj_in.weight"))
        .map(|(_, s)| s.len() == 2)
        .unwrap_or(v2);
    let base = if v2 { ModelConfig::sd2_512() } else { ModelConfig::sd1() };
    let unet = UNetConfig {
        in_channels: conv_in[1],
        out_channels: dim(shapes, &format!("{u}out.2.weight"), 0).unwrap_or(4),
        block_out_channels: channels.clone(),
        down_blocks: kinds,
        layers_per_block: l,
        cross_attention_dim: cross,
        num_heads: channels.iter().map(|c| if v2 { (c / 64).max(1) } else { 8 }).collect(),
        use_linear_projection: linear,
        norm_num_groups: groups_for(&channels),
        ..base.unet.clone()
    };
    let text = if v2 {
        let p = "cond_stage_model.model.";
        let tok = shapes
            .get(&format!("{p}token_embedding.weight"))
            .ok_or_else(|| not_model("SD2 text encoder without token_embedding"))?;
        let blocks = max_index(shapes, &format!("{p}transformer.resblocks.")).map(|m| m + 1).unwrap_or(0);
        ClipConfig {
            vocab_size: tok[0],
            hidden_size: tok[1],
            intermediate_size: dim(shapes, &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), 0)
                .unwrap_or(4 * tok[1]),
            // kohya and diffusers hold OpenCLIP without its last block.
            num_hidden_layers: blocks.saturating_sub(1),
            num_attention_heads: (tok[1] / 64).max(1),
            max_position_embeddings: dim(shapes, &format!("{p}positional_embedding"), 0).unwrap_or(77),
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    } else {
        let p = "cond_stage_model.transformer.text_model.";
        let tok = shapes
            .get(&format!("{p}embeddings.token_embedding.weight"))
            .ok_or_else(|| not_model("no text encoder (cond_stage_model.*) in the file"))?;
        ClipConfig {
            vocab_size: tok[0],
            hidden_size: tok[1],
            intermediate_size: dim(shapes, &format!("{p}encoder.layers.0.mlp.fc1.weight"), 0)
                .unwrap_or(4 * tok[1]),
            num_hidden_layers: max_index(shapes, &format!("{p}encoder.layers.")).map(|m| m + 1).unwrap_or(0),
            num_attention_heads: (tok[1] / 64).max(1),
            max_position_embeddings: dim(shapes, &format!("{p}embeddings.position_embedding.weight"), 0)
                .unwrap_or(77),
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    };
    let vae = infer_vae(shapes, "first_stage_model.")
        .ok_or_else(|| not_model("no VAE (first_stage_model.*) in the file"))?;
    let resolution = if v2 && v_pred { 768 } else { 512 };
    let cfg = ModelConfig {
        name: String::new(),
        v2,
        prediction: if v_pred { Prediction::VPrediction } else { Prediction::Epsilon },
        resolution,
        unet: UNetConfig { sample_size: resolution / 8, ..unet },
        text,
        vae,
    };
    Ok(settle(cfg))
}

/// VAE architecture from SD-named shapes under `prefix` (`first_stage_model.` or `` for a VAE file).
pub fn infer_vae(shapes: &ShapeMap, prefix: &str) -> Option<VaeConfig> {
    let conv_in = shapes.get(&format!("{prefix}encoder.conv_in.weight"))?;
    let n = max_index(shapes, &format!("{prefix}encoder.down."))? + 1;
    let mut channels = Vec::new();
    for i in 0..n {
        channels.push(dim(shapes, &format!("{prefix}encoder.down.{i}.block.0.conv2.weight"), 0)?);
    }
    let l = max_index(shapes, &format!("{prefix}encoder.down.0.block."))? + 1;
    Some(VaeConfig {
        in_channels: *conv_in.get(1)?,
        out_channels: dim(shapes, &format!("{prefix}decoder.conv_out.weight"), 0)?,
        latent_channels: dim(shapes, &format!("{prefix}post_quant_conv.weight"), 0)?,
        norm_num_groups: groups_for(&channels),
        block_out_channels: channels,
        layers_per_block: l,
        scaling_factor: 0.18215,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    serde_json::from_str(&text)
        .map_err(|e| CheckpointError::BadConfig { path: path.into(), reason: e.to_string() })
}

fn usize_list(v: &Value, key: &str, path: &Path) -> Result<Vec<usize>> {
    v.get(key)
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| CheckpointError::BadConfig {
            path: path.into(),
            reason: format!("`{key}` missing or not a list"),
        })
}

fn num(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| CheckpointError::BadConfig { path: path.into(), reason: format!("`{key}` missing") })
}

fn float_or(v: &Value, key: &str, d: f64) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(d)
}

pub fn read_unet_config(path: &Path) -> Result<UNetConfig> {
    let v = read_json(path)?;
    let channels = usize_list(&v, "block_out_channels", path)?;
    let kinds = v
        .get("down_block_types")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| {
                    if t.as_str().unwrap_or("").starts_with("CrossAttn") {
                        BlockKind::CrossAttn
                    } else {
                        BlockKind::Plain
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| ModelConfig::sd1().unet.down_blocks);
    // `attention_head_dim` in SD configs is really the number of heads (an int or one per block).
    let heads = match v.get("attention_head_dim") {
        Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().unwrap_or(8) as usize).collect(),
        Some(x) => vec![x.as_u64().unwrap_or(8) as usize; channels.len()],
        None => vec![8; channels.len()],
    };
    Ok(UNetConfig {
        in_channels: num(&v, "in_channels", path)?,
        out_channels: num(&v, "out_channels", path)?,
        down_blocks: kinds,
        layers_per_block: num(&v, "layers_per_block", path)?,
        cross_attention_dim: num(&v, "cross_attention_dim", path)?,
        num_heads: heads,
        use_linear_projection: v.get("use_linear_projection").and_then(Value::as_bool).unwrap_or(false),
        norm_num_groups: v.get("norm_num_groups").and_then(Value::as_u64).unwrap_or(32) as usize,
        norm_eps: float_or(&v, "norm_eps", 1e-5),
        flip_sin_to_cos: v.get("flip_sin_to_cos").and_then(Value::as_bool).unwrap_or(true),
        freq_shift: float_or(&v, "freq_shift", 0.0),
        sample_size: v.get("sample_size").and_then(Value::as_u64).unwrap_or(64) as usize,
        block_out_channels: channels,
    })
}

pub fn read_clip_config(path: &Path) -> Result<ClipConfig> {
    let v = read_json(path)?;
    let act = match v.get("hidden_act").and_then(Value::as_str) {
        Some("gelu") => Activation::Gelu,
        _ => Activation::QuickGelu,
    };
    Ok(ClipConfig {
        vocab_size: num(&v, "vocab_size", path)?,
        hidden_size: num(&v, "hidden_size", path)?,
        intermediate_size: num(&v, "intermediate_size", path)?,
        num_hidden_layers: num(&v, "num_hidden_layers", path)?,
        num_attention_heads: num(&v, "num_attention_heads", path)?,
        max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(77)
            as usize,
        hidden_act: act,
        layer_norm_eps: float_or(&v, "layer_norm_eps", 1e-5),
    })
}

pub fn read_vae_config(path: &Path) -> Result<VaeConfig> {
    let v = read_json(path)?;
    Ok(VaeConfig {
        in_channels: num(&v, "in_channels", path)?,
        out_channels: num(&v, "out_channels", path)?,
        latent_channels: num(&v, "latent_channels", path)?,
        block_out_channels: usize_list(&v, "block_out_channels", path)?,
        layers_per_block: num(&v, "layers_per_block", path)?,
        norm_num_groups: v.get("norm_num_groups").and_then(Value::as_u64).unwrap_or(32) as usize,
        scaling_factor: float_or(&v, "scaling_factor", 0.18215),
    })
}

/// `prediction_type` from a scheduler config, if it says.
pub fn read_prediction(path: &Path) -> Option<Prediction> {
    let v = read_json(path).ok()?;
    match v.get("prediction_type")?.as_str()? {
        "v_prediction" => Some(Prediction::VPrediction),
        "epsilon" => Some(Prediction::Epsilon),
        _ => None,
    }
}

/// Assembles a ModelConfig from a Diffusers folder's parts.
pub fn assemble(unet: UNetConfig, text: ClipConfig, vae: VaeConfig, prediction: Prediction) -> ModelConfig {
    let v2 = text.hidden_act == Activation::Gelu;
    let resolution = unet.sample_size * 8;
    let cfg = ModelConfig { name: String::new(), v2, prediction, resolution, unet, text, vae };
    for n in named() {
        if n.v2 == cfg.v2 && n.unet == cfg.unet && n.text == cfg.text && n.vae == cfg.vae {
            return ModelConfig { name: n.name, ..cfg };
        }
    }
    ModelConfig { name: if v2 { "custom-sd2".into() } else { "custom-sd1".into() }, ..cfg }
}

const DIFFUSERS_VERSION: &str = "0.32.1";

pub fn unet_config_json(c: &UNetConfig) -> Value {
    let down: Vec<&str> = c
        .down_blocks
        .iter()
        .map(|k| if *k == BlockKind::CrossAttn { "CrossAttnDownBlock2D" } else { "DownBlock2D" })
        .collect();
    let up: Vec<&str> = c
        .down_blocks
        .iter()
        .rev()
        .map(|k| if *k == BlockKind::CrossAttn { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    let heads: Value = if c.num_heads.iter().all(|h| *h == c.num_heads[0]) {
        json!(c.num_heads[0])
    } else {
        json!(c.num_heads)
    };
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": c.block_out_channels,
        "center_input_sample": false,
        "cross_attention_dim": c.cross_attention_dim,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift as i64,
        "in_channels": c.in_channels,
        "layers_per_block": c.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": c.norm_eps,
        "norm_num_groups": c.norm_num_groups,
        "out_channels": c.out_channels,
        "sample_size": c.sample_size,
        "up_block_types": up,
        "use_linear_projection": c.use_linear_projection,
    })
}

pub fn clip_config_json(c: &ClipConfig) -> Value {
    let gelu = c.hidden_act == Activation::Gelu;
    json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": if gelu { "gelu" } else { "quick_gelu" },
        "hidden_size": c.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_norm_eps": c.layer_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "clip_text_model",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "pad_token_id": 1,
        "projection_dim": if gelu { 512 } else { 768 },
        "torch_dtype": "float32",
        "vocab_size": c.vocab_size,
    })
}

pub fn vae_config_json(c: &VaeConfig, sample_size: usize) -> Value {
    let n = c.block_out_channels.len();
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": c.block_out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "in_channels": c.in_channels,
        "latent_channels": c.latent_channels,
        "layers_per_block": c.layers_per_block,
        "norm_num_groups": c.norm_num_groups,
        "out_channels": c.out_channels,
        "sample_size": sample_size,
        "scaling_factor": c.scaling_factor,
        "up_block_types": vec!["UpDecoderBlock2D"; n],
    })
}

/// The DDIM scheduler config kohya's Diffusers output carries (SD's training schedule).
pub fn scheduler_config_json(prediction: Prediction) -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": if prediction == Prediction::VPrediction { "v_prediction" } else { "epsilon" },
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "trained_betas": null,
    })
}

pub fn model_index_json() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "requires_safety_checker": null,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

pub fn tokenizer_config_json(v2: bool) -> Value {
    json!({
        "add_prefix_space": false,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": true,
        "do_lower_case": true,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": if v2 { "!" } else { "<|endoftext|>" },
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    })
}

pub fn special_tokens_map_json(v2: bool) -> Value {
    json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": if v2 { "!" } else { "<|endoftext|>" },
        "unk_token": "<|endoftext|>",
    })
}
