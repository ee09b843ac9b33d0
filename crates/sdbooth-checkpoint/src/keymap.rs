//! The whole-model key map for one `ModelConfig`: every diffusers parameter with its SD
//! single-file name and shape. Built from the architecture, not from a file, so loading can
//! report what is missing and saving without a source knows kohya's key set.

use std::collections::{BTreeMap, HashMap};

use sdbooth_models::{clip, unet, vae, ModelConfig};

use crate::keymap_clip::{clip_v2_hf_to_sd, CLIP_V1_PREFIX, CLIP_V2_PREFIX};
use crate::keymap_unet::{unet_hf_to_sd, unet_sd_shape, UNET_PREFIX};
use crate::keymap_vae::{vae_hf_to_sd, vae_sd_shape, VAE_PREFIX};

/// The three trained/loaded parts of an SD model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Unet,
    TextEncoder,
    Vae,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Unet, Part::TextEncoder, Part::Vae];

    /// Diffusers sub-folder name.
    pub fn folder(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::TextEncoder => "text_encoder",
            Part::Vae => "vae",
        }
    }
}

#[derive(Clone, Debug)]
pub struct MapEntry {
    pub part: Part,
    pub hf: String,
    pub hf_shape: Vec<usize>,
    /// Full SD key, prefix included.
    pub sd: String,
    /// Shape of the SD tensor (for a fused q/k/v tensor: the fused shape).
    pub sd_shape: Vec<usize>,
    /// Some(i): rows [i*n, (i+1)*n) of a fused SD2 `in_proj` tensor.
    pub qkv: Option<usize>,
}

/// Every parameter of a model under both naming schemes.
#[derive(Clone, Debug)]
pub struct KeyMap {
    pub entries: Vec<MapEntry>,
    by_sd: HashMap<String, Vec<usize>>,
    by_hf: HashMap<(Part, String), usize>,
}

impl KeyMap {
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut entries = Vec::new();
        for (hf, shape) in unet::param_shapes(&cfg.unet) {
            // unet_hf_to_sd covers every name of the U-Net's parameter list; a None would be a bug in this crate.
            let sd = unet_hf_to_sd(&hf, &cfg.unet).unwrap_or_else(|| format!("?{hf}"));
            let sd_shape = unet_sd_shape(&hf, &shape, cfg.v2);
            entries.push(MapEntry {
                part: Part::Unet,
                sd: format!("{UNET_PREFIX}{sd}"),
                hf,
                hf_shape: shape,
                sd_shape,
                qkv: None,
            });
        }
        for (hf, shape) in clip::param_shapes(&cfg.text) {
            let (sd, sd_shape, qkv) = if cfg.v2 {
                match clip_v2_hf_to_sd(&hf) {
                    Some(t) => {
                        let mut s = shape.clone();
                        if t.qkv.is_some() {
                            s[0] *= 3;
                        }
                        (format!("{CLIP_V2_PREFIX}{}", t.sd), s, t.qkv)
                    }
                    None => (format!("?{hf}"), shape.clone(), None),
                }
            } else {
                (format!("{CLIP_V1_PREFIX}{hf}"), shape.clone(), None)
            };
            entries.push(MapEntry { part: Part::TextEncoder, hf, hf_shape: shape, sd, sd_shape, qkv });
        }
        for (hf, shape) in vae::param_shapes(&cfg.vae) {
            let sd = vae_hf_to_sd(&hf, &cfg.vae).unwrap_or_else(|| format!("?{hf}"));
            let sd_shape = vae_sd_shape(&hf, &shape);
            entries.push(MapEntry {
                part: Part::Vae,
                sd: format!("{VAE_PREFIX}{sd}"),
                hf,
                hf_shape: shape,
                sd_shape,
                qkv: None,
            });
        }
        let mut by_sd: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_hf = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_sd.entry(e.sd.clone()).or_default().push(i);
            by_hf.insert((e.part, e.hf.clone()), i);
        }
        KeyMap { entries, by_sd, by_hf }
    }

    /// The entries an SD key feeds (three for a fused q/k/v tensor), in q, k, v order.
    pub fn from_sd(&self, sd: &str) -> Vec<&MapEntry> {
        let mut v: Vec<&MapEntry> =
            self.by_sd.get(sd).map(|ix| ix.iter().map(|&i| &self.entries[i]).collect()).unwrap_or_default();
        v.sort_by_key(|e| e.qkv);
        v
    }

    pub fn from_hf(&self, part: Part, hf: &str) -> Option<&MapEntry> {
        self.by_hf.get(&(part, hf.to_string())).map(|&i| &self.entries[i])
    }

    /// Distinct SD keys with their SD shapes, in a stable order (fused tensors once).
    pub fn sd_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.entries.iter().map(|e| (e.sd.clone(), e.sd_shape.clone())).collect()
    }

    /// Diffusers names and shapes of one part.
    pub fn hf_shapes(&self, part: Part) -> Vec<(String, Vec<usize>)> {
        self.entries.iter().filter(|e| e.part == part).map(|e| (e.hf.clone(), e.hf_shape.clone())).collect()
    }
}

/// SD2 keys kohya writes with no single-file source, though diffusers holds no such weights:
/// OpenCLIP's 24th block (a copy of the 23rd), `text_projection` and `logit_scale`.
/// Returns (new SD key, SD key it copies) for the copied block.
pub fn v2_filler_copies(cfg: &ModelConfig, map: &KeyMap) -> Vec<(String, String)> {
    let last = cfg.text.num_hidden_layers;
    if !cfg.v2 || last == 0 {
        return Vec::new();
    }
    let from = format!("{CLIP_V2_PREFIX}transformer.resblocks.{}.", last - 1);
    let to = format!("{CLIP_V2_PREFIX}transformer.resblocks.{last}.");
    map.sd_shapes()
        .keys()
        .filter_map(|k| k.strip_prefix(&from).map(|t| (format!("{to}{t}"), k.clone())))
        .collect()
}

pub const TEXT_PROJECTION_KEY: &str = "cond_stage_model.model.text_projection";
pub const LOGIT_SCALE_KEY: &str = "cond_stage_model.model.logit_scale";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd1_key_counts_and_known_names() {
        let map = KeyMap::new(&ModelConfig::sd1());
        let sd = map.sd_shapes();
        // SD1.5 single files hold 686 U-Net, 196 text and 248 VAE tensors (plus non-weight keys).
        let count = |p: &str| sd.keys().filter(|k| k.starts_with(p)).count();
        assert_eq!(count("model.diffusion_model."), 686);
        assert_eq!(count("cond_stage_model."), 196);
        assert_eq!(count("first_stage_model."), 248);
        assert_eq!(sd["model.diffusion_model.output_blocks.2.1.conv.weight"], vec![1280, 1280, 3, 3]);
        assert_eq!(sd["model.diffusion_model.output_blocks.5.2.conv.weight"], vec![1280, 1280, 3, 3]);
        assert_eq!(sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"], vec![320, 320, 1, 1]);
        assert_eq!(sd["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"], vec![128, 256, 1, 1]);
        assert_eq!(sd["first_stage_model.encoder.mid.attn_1.q.weight"], vec![512, 512, 1, 1]);
    }

    #[test]
    fn sd2_text_is_fused_openclip() {
        let cfg = ModelConfig::sd2_768_v();
        let map = KeyMap::new(&cfg);
        let sd = map.sd_shapes();
        let k = "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight";
        assert_eq!(sd[k], vec![3072, 1024]);
        let parts = map.from_sd(k);
        assert_eq!(parts.len(), 3);
        assert!(parts[1].hf.ends_with("layers.22.self_attn.k_proj.weight"));
        assert_eq!(sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"], vec![320, 320]);
        assert!(!sd.contains_key("cond_stage_model.model.transformer.resblocks.23.ln_1.weight"));
        assert_eq!(v2_filler_copies(&cfg, &map).len(), 12);
    }
}
