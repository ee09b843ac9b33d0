//! Diffusers parameter names and shapes for a `ModelConfig`, derived from the architecture rules
//! of diffusers' `UNet2DConditionModel`, transformers' `CLIPTextModel` and `AutoencoderKL`.
//!
//! The key maps are built from these lists, so a name we do not know is reported as "extra" rather
//! than guessed at, and the no-source save path can produce kohya's key set without any weights.
//! sdbooth-models will own the canonical lists; a test checks the two agree once both exist.

use sdbooth_models::config::{BlockKind, ClipConfig, UNetConfig, VaeConfig};

pub type Shapes = Vec<(String, Vec<usize>)>;

fn push(out: &mut Shapes, name: String, shape: &[usize]) {
    out.push((name, shape.to_vec()));
}

fn wb(out: &mut Shapes, p: &str, w: &[usize], b: usize) {
    push(out, format!("{p}.weight"), w);
    push(out, format!("{p}.bias"), &[b]);
}

fn norm(out: &mut Shapes, p: &str, c: usize) {
    wb(out, p, &[c], c);
}

/// ResNet block; `temb` is the time-embedding width (None for the VAE's blocks).
fn resnet(out: &mut Shapes, p: &str, cin: usize, cout: usize, temb: Option<usize>) {
    norm(out, &format!("{p}.norm1"), cin);
    wb(out, &format!("{p}.conv1"), &[cout, cin, 3, 3], cout);
    if let Some(t) = temb {
        wb(out, &format!("{p}.time_emb_proj"), &[cout, t], cout);
    }
    norm(out, &format!("{p}.norm2"), cout);
    wb(out, &format!("{p}.conv2"), &[cout, cout, 3, 3], cout);
    if cin != cout {
        wb(out, &format!("{p}.conv_shortcut"), &[cout, cin, 1, 1], cout);
    }
}

fn transformer(out: &mut Shapes, p: &str, c: usize, cfg: &UNetConfig) {
    norm(out, &format!("{p}.norm"), c);
    let proj: Vec<usize> = if cfg.use_linear_projection { vec![c, c] } else { vec![c, c, 1, 1] };
    wb(out, &format!("{p}.proj_in"), &proj, c);
    let b = format!("{p}.transformer_blocks.0");
    norm(out, &format!("{b}.norm1"), c);
    for (attn, kv) in [("attn1", c), ("attn2", cfg.cross_attention_dim)] {
        push(out, format!("{b}.{attn}.to_q.weight"), &[c, c]);
        push(out, format!("{b}.{attn}.to_k.weight"), &[c, kv]);
        push(out, format!("{b}.{attn}.to_v.weight"), &[c, kv]);
        wb(out, &format!("{b}.{attn}.to_out.0"), &[c, c], c);
        if attn == "attn1" {
            norm(out, &format!("{b}.norm2"), c);
        }
    }
    norm(out, &format!("{b}.norm3"), c);
    // GEGLU: one projection to 2 * 4c (value and gate).
    wb(out, &format!("{b}.ff.net.0.proj"), &[8 * c, c], 8 * c);
    wb(out, &format!("{b}.ff.net.2"), &[c, 4 * c], c);
    wb(out, &format!("{p}.proj_out"), &proj, c);
}

pub fn unet_shapes(cfg: &UNetConfig) -> Shapes {
    let mut out = Shapes::new();
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let c0 = ch[0];
    let temb = 4 * c0;
    wb(&mut out, "conv_in", &[c0, cfg.in_channels, 3, 3], c0);
    wb(&mut out, "time_embedding.linear_1", &[temb, c0], temb);
    wb(&mut out, "time_embedding.linear_2", &[temb, temb], temb);
    let mut cin = c0;
    for (i, &cout) in ch.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            resnet(
                &mut out,
                &format!("down_blocks.{i}.resnets.{j}"),
                if j == 0 { cin } else { cout },
                cout,
                Some(temb),
            );
            if cfg.down_blocks.get(i) == Some(&BlockKind::CrossAttn) {
                transformer(&mut out, &format!("down_blocks.{i}.attentions.{j}"), cout, cfg);
            }
        }
        if i + 1 < n {
            wb(&mut out, &format!("down_blocks.{i}.downsamplers.0.conv"), &[cout, cout, 3, 3], cout);
        }
        cin = cout;
    }
    let cl = ch[n - 1];
    resnet(&mut out, "mid_block.resnets.0", cl, cl, Some(temb));
    transformer(&mut out, "mid_block.attentions.0", cl, cfg);
    resnet(&mut out, "mid_block.resnets.1", cl, cl, Some(temb));
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut prev = rev[0];
    for i in 0..n {
        let cout = rev[i];
        let cskip_in = rev[(i + 1).min(n - 1)];
        let kind = cfg.down_blocks.get(n - 1 - i).copied().unwrap_or(BlockKind::Plain);
        for j in 0..=cfg.layers_per_block {
            let skip = if j == cfg.layers_per_block { cskip_in } else { cout };
            let res_in = if j == 0 { prev } else { cout };
            resnet(&mut out, &format!("up_blocks.{i}.resnets.{j}"), res_in + skip, cout, Some(temb));
            if kind == BlockKind::CrossAttn {
                transformer(&mut out, &format!("up_blocks.{i}.attentions.{j}"), cout, cfg);
            }
        }
        if i + 1 < n {
            wb(&mut out, &format!("up_blocks.{i}.upsamplers.0.conv"), &[cout, cout, 3, 3], cout);
        }
        prev = cout;
    }
    norm(&mut out, "conv_norm_out", c0);
    wb(&mut out, "conv_out", &[cfg.out_channels, c0, 3, 3], cfg.out_channels);
    out
}

pub fn clip_shapes(cfg: &ClipConfig) -> Shapes {
    let mut out = Shapes::new();
    let h = cfg.hidden_size;
    push(&mut out, "text_model.embeddings.token_embedding.weight".into(), &[cfg.vocab_size, h]);
    push(
        &mut out,
        "text_model.embeddings.position_embedding.weight".into(),
        &[cfg.max_position_embeddings, h],
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("text_model.encoder.layers.{l}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            wb(&mut out, &format!("{p}.self_attn.{proj}"), &[h, h], h);
        }
        norm(&mut out, &format!("{p}.layer_norm1"), h);
        wb(&mut out, &format!("{p}.mlp.fc1"), &[cfg.intermediate_size, h], cfg.intermediate_size);
        wb(&mut out, &format!("{p}.mlp.fc2"), &[h, cfg.intermediate_size], h);
        norm(&mut out, &format!("{p}.layer_norm2"), h);
    }
    norm(&mut out, "text_model.final_layer_norm", h);
    out
}

fn vae_attention(out: &mut Shapes, p: &str, c: usize) {
    norm(out, &format!("{p}.group_norm"), c);
    for q in ["to_q", "to_k", "to_v", "to_out.0"] {
        wb(out, &format!("{p}.{q}"), &[c, c], c);
    }
}

fn vae_mid(out: &mut Shapes, p: &str, c: usize) {
    resnet(out, &format!("{p}.mid_block.resnets.0"), c, c, None);
    vae_attention(out, &format!("{p}.mid_block.attentions.0"), c);
    resnet(out, &format!("{p}.mid_block.resnets.1"), c, c, None);
}

pub fn vae_shapes(cfg: &VaeConfig) -> Shapes {
    let mut out = Shapes::new();
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let (c0, cl, lat) = (ch[0], ch[n - 1], cfg.latent_channels);
    wb(&mut out, "encoder.conv_in", &[c0, cfg.in_channels, 3, 3], c0);
    let mut cin = c0;
    for (i, &cout) in ch.iter().enumerate() {
        for j in 0..cfg.layers_per_block {
            resnet(
                &mut out,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                if j == 0 { cin } else { cout },
                cout,
                None,
            );
        }
        if i + 1 < n {
            wb(&mut out, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), &[cout, cout, 3, 3], cout);
        }
        cin = cout;
    }
    vae_mid(&mut out, "encoder", cl);
    norm(&mut out, "encoder.conv_norm_out", cl);
    wb(&mut out, "encoder.conv_out", &[2 * lat, cl, 3, 3], 2 * lat);
    wb(&mut out, "quant_conv", &[2 * lat, 2 * lat, 1, 1], 2 * lat);
    wb(&mut out, "post_quant_conv", &[lat, lat, 1, 1], lat);
    wb(&mut out, "decoder.conv_in", &[cl, lat, 3, 3], cl);
    vae_mid(&mut out, "decoder", cl);
    let mut prev = cl;
    for i in 0..n {
        let cout = ch[n - 1 - i];
        for j in 0..=cfg.layers_per_block {
            resnet(
                &mut out,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                if j == 0 { prev } else { cout },
                cout,
                None,
            );
        }
        if i + 1 < n {
            wb(&mut out, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), &[cout, cout, 3, 3], cout);
        }
        prev = cout;
    }
    norm(&mut out, "decoder.conv_norm_out", c0);
    wb(&mut out, "decoder.conv_out", &[cfg.out_channels, c0, 3, 3], cfg.out_channels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdbooth_models::ModelConfig;

    /// Our name lists must be the model crate's, for every architecture.
    #[test]
    fn shapes_agree_with_sdbooth_models() {
        for cfg in
            [ModelConfig::sd1(), ModelConfig::sd2_768_v(), ModelConfig::tiny_sd1(), ModelConfig::tiny_sd2()]
        {
            let sort = |mut v: Shapes| {
                v.sort();
                v
            };
            assert_eq!(
                sort(unet_shapes(&cfg.unet)),
                sort(sdbooth_models::unet::param_shapes(&cfg.unet)),
                "{}",
                cfg.name
            );
            assert_eq!(
                sort(clip_shapes(&cfg.text)),
                sort(sdbooth_models::clip::param_shapes(&cfg.text)),
                "{}",
                cfg.name
            );
            assert_eq!(
                sort(vae_shapes(&cfg.vae)),
                sort(sdbooth_models::vae::param_shapes(&cfg.vae)),
                "{}",
                cfg.name
            );
        }
    }
}
