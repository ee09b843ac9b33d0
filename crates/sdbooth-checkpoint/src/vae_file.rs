//! `--vae`: a separate VAE from an SD single file (full model or VAE-only, e.g.
//! `vae-ft-mse-840000-ema-pruned.safetensors`), a Diffusers VAE weights file, or a Diffusers
//! folder (the VAE folder itself or a model folder with `vae/`).

use std::path::Path;

use candle_core::{DType, Tensor};
use sdbooth_models::ModelConfig;

use crate::error::{CheckpointError, Result};
use crate::keymap::{KeyMap, Part};
use crate::keymap_vae::VAE_PREFIX;
use crate::model::{LoadOptions, TensorMap};

pub fn load_vae(path: &Path, config: &ModelConfig, dtype: Option<DType>) -> Result<TensorMap> {
    let map = KeyMap::new(config);
    let opts = LoadOptions { dtype, ..Default::default() };
    if path.is_dir() {
        let dir = if path.join("vae").is_dir() { path.join("vae") } else { path.to_path_buf() };
        let w =
            crate::diffusers::find_weights(&dir, Part::Vae).ok_or_else(|| CheckpointError::NotAModel {
                path: dir.clone(),
                reason: "no VAE weights (diffusion_pytorch_model.safetensors/.bin)".into(),
            })?;
        return crate::diffusers::load_part(&w, Part::Vae, &map, &opts, &mut Vec::new());
    }
    let index = crate::single_file::open_index(path)?;
    if index.entries.iter().any(|e| e.key.starts_with("encoder.down_blocks.")) {
        return crate::diffusers::load_part(path, Part::Vae, &map, &opts, &mut Vec::new());
    }
    // SD names, with or without the `first_stage_model.` prefix.
    let full = index.entries.iter().any(|e| e.key.starts_with(VAE_PREFIX));
    let mut file = index.reopen()?;
    let mut out = TensorMap::new();
    for e in &index.entries {
        let key = if full { e.key.clone() } else { format!("{VAE_PREFIX}{}", e.key) };
        let Some(m) = map.from_sd(&key).into_iter().find(|m| m.part == Part::Vae) else { continue };
        if e.shape != m.sd_shape {
            return Err(CheckpointError::BadTensor {
                path: path.into(),
                key: e.key.clone(),
                reason: format!("shape {:?}, the model's VAE needs {:?}", e.shape, m.sd_shape),
            });
        }
        let t: Tensor = index.read(&mut file, e)?.reshape(m.hf_shape.as_slice())?;
        let t = match dtype {
            Some(d) => t.to_dtype(d)?,
            None => t,
        };
        out.insert(m.hf.clone(), t);
    }
    let missing: Vec<String> = map
        .entries
        .iter()
        .filter(|m| m.part == Part::Vae && !out.contains_key(&m.hf))
        .map(|m| m.sd.clone())
        .take(10)
        .collect();
    if !missing.is_empty() {
        return Err(CheckpointError::MissingKeys { path: path.into(), keys: missing });
    }
    Ok(out)
}
