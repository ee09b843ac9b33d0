//! U-Net names: diffusers `UNet2DConditionModel` ↔ SD's original `model.diffusion_model.*`
//! (ldm `openaimodel.UNetModel`). Same rules as kohya's `convert_unet_state_dict_to_sd`, generalised
//! from its hard-coded 4 blocks × 2 layers to any block count and `layers_per_block`, so the tiny
//! test models map too.

use sdbooth_models::config::{BlockKind, UNetConfig};

pub const UNET_PREFIX: &str = "model.diffusion_model.";

/// Local renames inside a ResNet block, diffusers → SD.
fn resnet_local(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ];
    for (hf, sd) in MAP {
        if let Some(tail) = rest.strip_prefix(hf) {
            return format!("{sd}{tail}");
        }
    }
    rest.to_string()
}

/// Splits `a.3.b.5.rest` style names: returns (index, remainder) after `prefix`.
fn take_index<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (idx, tail) = rest.split_once('.')?;
    Some((idx.parse().ok()?, tail))
}

/// SD name (without the `model.diffusion_model.` prefix) of a diffusers U-Net parameter.
pub fn unet_hf_to_sd(name: &str, cfg: &UNetConfig) -> Option<String> {
    let l1 = cfg.layers_per_block + 1;
    let n = cfg.block_out_channels.len();
    for (hf, sd) in [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ] {
        if let Some(tail) = name.strip_prefix(hf) {
            return Some(format!("{sd}{tail}"));
        }
    }
    if let Some((i, rest)) = take_index(name, "down_blocks.") {
        if let Some((j, tail)) = take_index(rest, "resnets.") {
            return Some(format!("input_blocks.{}.0.{}", l1 * i + j + 1, resnet_local(tail)));
        }
        if let Some((j, tail)) = take_index(rest, "attentions.") {
            return Some(format!("input_blocks.{}.1.{tail}", l1 * i + j + 1));
        }
        if let Some(tail) = rest.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{tail}", l1 * (i + 1)));
        }
        return None;
    }
    if let Some(rest) = name.strip_prefix("mid_block.") {
        if let Some((j, tail)) = take_index(rest, "resnets.") {
            return Some(format!("middle_block.{}.{}", 2 * j, resnet_local(tail)));
        }
        if let Some(tail) = rest.strip_prefix("attentions.0.") {
            return Some(format!("middle_block.1.{tail}"));
        }
        return None;
    }
    if let Some((i, rest)) = take_index(name, "up_blocks.") {
        if let Some((j, tail)) = take_index(rest, "resnets.") {
            return Some(format!("output_blocks.{}.0.{}", l1 * i + j, resnet_local(tail)));
        }
        if let Some((j, tail)) = take_index(rest, "attentions.") {
            return Some(format!("output_blocks.{}.1.{tail}", l1 * i + j));
        }
        if let Some(tail) = rest.strip_prefix("upsamplers.0.") {
            // The upsampler sits after the resnet (index 1), or after resnet + attention (index 2).
            let has_attn = i < n && cfg.down_blocks.get(n - 1 - i) == Some(&BlockKind::CrossAttn);
            return Some(format!(
                "output_blocks.{}.{}.{tail}",
                l1 * i + cfg.layers_per_block,
                1 + has_attn as usize
            ));
        }
    }
    None
}

/// SD's shape for a U-Net tensor: SD2 files hold the transformer `proj_in`/`proj_out` as linear
/// layers, SD1 files as 1×1 convolutions, whatever the diffusers config says.
pub fn unet_sd_shape(hf_name: &str, hf_shape: &[usize], v2: bool) -> Vec<usize> {
    if hf_name.ends_with("proj_in.weight") || hf_name.ends_with("proj_out.weight") {
        if v2 && hf_shape.len() == 4 {
            return hf_shape[..2].to_vec();
        }
        if !v2 && hf_shape.len() == 2 {
            return vec![hf_shape[0], hf_shape[1], 1, 1];
        }
    }
    hf_shape.to_vec()
}
