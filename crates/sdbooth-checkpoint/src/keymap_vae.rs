//! VAE names: diffusers `AutoencoderKL` ↔ SD's `first_stage_model.*` (ldm `AutoencoderKL`). As in
//! kohya's `convert_vae_state_dict`, with the decoder's up blocks numbered in reverse in SD.

use sdbooth_models::config::VaeConfig;

pub const VAE_PREFIX: &str = "first_stage_model.";

fn take_index<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (idx, tail) = rest.split_once('.')?;
    Some((idx.parse().ok()?, tail))
}

fn resnet_local(tail: &str) -> String {
    match tail.strip_prefix("conv_shortcut.") {
        Some(t) => format!("nin_shortcut.{t}"),
        None => tail.to_string(),
    }
}

fn attn_local(tail: &str) -> Option<String> {
    for (hf, sd) in [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ] {
        if let Some(t) = tail.strip_prefix(hf) {
            return Some(format!("{sd}{t}"));
        }
    }
    None
}

/// SD name (without `first_stage_model.`) of a diffusers VAE parameter.
pub fn vae_hf_to_sd(name: &str, cfg: &VaeConfig) -> Option<String> {
    let n = cfg.block_out_channels.len();
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return Some(name.to_string());
    }
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(name.to_string());
    }
    if let Some(t) = rest.strip_prefix("conv_norm_out.") {
        return Some(format!("{side}.norm_out.{t}"));
    }
    if let Some(mid) = rest.strip_prefix("mid_block.") {
        if let Some((j, t)) = take_index(mid, "resnets.") {
            return Some(format!("{side}.mid.block_{}.{}", j + 1, resnet_local(t)));
        }
        if let Some(t) = mid.strip_prefix("attentions.0.") {
            return Some(format!("{side}.mid.attn_1.{}", attn_local(t)?));
        }
        return None;
    }
    if side == "encoder" {
        let (i, r) = take_index(rest, "down_blocks.")?;
        if let Some((j, t)) = take_index(r, "resnets.") {
            return Some(format!("encoder.down.{i}.block.{j}.{}", resnet_local(t)));
        }
        let t = r.strip_prefix("downsamplers.0.")?;
        return Some(format!("encoder.down.{i}.downsample.{t}"));
    }
    let (i, r) = take_index(rest, "up_blocks.")?;
    let sd_i = n.checked_sub(1 + i)?;
    if let Some((j, t)) = take_index(r, "resnets.") {
        return Some(format!("decoder.up.{sd_i}.block.{j}.{}", resnet_local(t)));
    }
    let t = r.strip_prefix("upsamplers.0.")?;
    Some(format!("decoder.up.{sd_i}.upsample.{t}"))
}

/// SD holds the mid-block attention projections as 1×1 convolutions, diffusers as linear layers.
pub fn vae_sd_shape(hf_name: &str, hf_shape: &[usize]) -> Vec<usize> {
    if hf_name.contains("mid_block.attentions.0.to_") && hf_name.ends_with(".weight") && hf_shape.len() == 2 {
        return vec![hf_shape[0], hf_shape[1], 1, 1];
    }
    hf_shape.to_vec()
}
