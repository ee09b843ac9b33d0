//! Text encoder names. SD1: `cond_stage_model.transformer.` + the transformers `CLIPTextModel`
//! name, unchanged. SD2: OpenCLIP's `cond_stage_model.model.*` with fused `attn.in_proj_*`
//! (q, k, v stacked along dim 0), as in kohya's `convert_text_encoder_state_dict_to_sd_v2`.

pub const CLIP_V1_PREFIX: &str = "cond_stage_model.transformer.";
pub const CLIP_V2_PREFIX: &str = "cond_stage_model.model.";

/// Where a diffusers text-encoder parameter lives in an SD2 file: a plain key, or one third of a
/// fused `in_proj` tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipV2Target {
    pub sd: String,
    /// Some(0|1|2) for q/k/v inside `in_proj_weight`/`in_proj_bias`.
    pub qkv: Option<usize>,
}

/// SD2 name (without `cond_stage_model.model.`) of a diffusers text-encoder parameter.
pub fn clip_v2_hf_to_sd(name: &str) -> Option<ClipV2Target> {
    let plain = |sd: String| Some(ClipV2Target { sd, qkv: None });
    match name {
        "text_model.embeddings.token_embedding.weight" => return plain("token_embedding.weight".into()),
        "text_model.embeddings.position_embedding.weight" => return plain("positional_embedding".into()),
        _ => {}
    }
    if let Some(t) = name.strip_prefix("text_model.final_layer_norm.") {
        return plain(format!("ln_final.{t}"));
    }
    let rest = name.strip_prefix("text_model.encoder.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let layer: usize = idx.parse().ok()?;
    let p = format!("transformer.resblocks.{layer}");
    for (i, q) in ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."].iter().enumerate() {
        if let Some(wb) = tail.strip_prefix(q) {
            return Some(ClipV2Target { sd: format!("{p}.attn.in_proj_{wb}"), qkv: Some(i) });
        }
    }
    for (hf, sd) in [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ] {
        if let Some(t) = tail.strip_prefix(hf) {
            return plain(format!("{p}.{sd}{t}"));
        }
    }
    None
}

/// Keys older SD1 checkpoints use without the `text_model.` level; kohya renames them on load
/// (and so writes the new names on save). Returns the new name, if `key` is an old one.
pub fn normalize_old_clip_key(key: &str) -> Option<String> {
    for old in ["embeddings.", "encoder.", "final_layer_norm."] {
        let from = format!("{CLIP_V1_PREFIX}{old}");
        if let Some(t) = key.strip_prefix(&from) {
            return Some(format!("{CLIP_V1_PREFIX}text_model.{old}{t}"));
        }
    }
    None
}
