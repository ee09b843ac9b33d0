//! Diffusers folders: `unet/ text_encoder/ vae/` weights (.safetensors or .bin, fp16 variants as a
//! fallback), config.json files for the architecture, `scheduler/` for the prediction type; and
//! writing such folders with every config embedded in the binary (no hub download).

use std::path::{Path, PathBuf};

use sdbooth_models::{ModelConfig, Prediction};

use crate::atomic::atomic_write_bytes;
use crate::config_io as cio;
use crate::error::{io_err, CheckpointError, Result};
use crate::keymap::{KeyMap, Part};
use crate::model::{resolve_v, LoadOptions, LoadedModel, SourceInfo, SourceKind, TensorMap};
use crate::single_file::Precision;
use crate::tensor_file::{OutData, OutTensor, TensorIndex};

fn weight_names(part: Part) -> [&'static str; 2] {
    match part {
        Part::TextEncoder => ["model", "pytorch_model"],
        _ => ["diffusion_pytorch_model", "diffusion_pytorch_model"],
    }
}

/// The weights file of one part folder: safetensors first, then .bin, then fp16 variants.
pub fn find_weights(dir: &Path, part: Part) -> Option<PathBuf> {
    let [st, bin] = weight_names(part);
    [
        format!("{st}.safetensors"),
        format!("{bin}.bin"),
        format!("{st}.fp16.safetensors"),
        format!("{bin}.fp16.bin"),
    ]
    .into_iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

/// Reads one part's tensors by diffusers name, checked against the architecture.
pub fn load_part(
    path: &Path,
    part: Part,
    map: &KeyMap,
    opts: &LoadOptions,
    unused: &mut Vec<String>,
) -> Result<TensorMap> {
    let index = TensorIndex::open(path)?;
    let mut file = index.reopen()?;
    let mut out = TensorMap::new();
    for e in &index.entries {
        let Some(m) = map.from_hf(part, &e.key) else {
            unused.push(format!("{}/{}", part.folder(), e.key));
            continue;
        };
        let t = index.read(&mut file, e)?;
        // Old SD2 Diffusers exports hold proj_in/out as 1×1 convs; same data, other shape.
        let t = if e.shape != m.hf_shape && t.elem_count() == m.hf_shape.iter().product::<usize>() {
            t.reshape(m.hf_shape.as_slice())?
        } else if e.shape != m.hf_shape {
            return Err(CheckpointError::BadTensor {
                path: path.into(),
                key: e.key.clone(),
                reason: format!("shape {:?}, config.json implies {:?}", e.shape, m.hf_shape),
            });
        } else {
            t
        };
        let t = match opts.dtype {
            Some(d) => t.to_dtype(d)?,
            None => t,
        };
        out.insert(e.key.clone(), t);
    }
    let missing: Vec<String> = map
        .entries
        .iter()
        .filter(|m| m.part == part && !out.contains_key(&m.hf))
        .map(|m| m.hf.clone())
        .take(10)
        .collect();
    if !missing.is_empty() {
        return Err(CheckpointError::MissingKeys { path: path.into(), keys: missing });
    }
    Ok(out)
}

/// A Diffusers folder has `model_index.json`, written last by diffusers and by us (after every
/// weight): without it the folder is an interrupted or partial save, refused rather than loaded.
pub fn check_model_index(dir: &Path) -> Result<()> {
    if dir.join("model_index.json").is_file() {
        return Ok(());
    }
    Err(CheckpointError::NotAModel {
        path: dir.into(),
        reason: "not a complete Diffusers folder: model_index.json is missing (an interrupted save, or \
                 not a pipeline folder)"
            .into(),
    })
}

pub fn load_diffusers(dir: &Path, spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    check_model_index(dir)?;
    let need = |p: PathBuf| -> Result<PathBuf> {
        if p.is_file() {
            Ok(p)
        } else {
            Err(CheckpointError::NotAModel {
                path: dir.into(),
                reason: format!("not a Diffusers folder: {} is missing", p.display()),
            })
        }
    };
    let unet_cfg = cio::read_unet_config(&need(dir.join("unet/config.json"))?)?;
    let text_cfg = cio::read_clip_config(&need(dir.join("text_encoder/config.json"))?)?;
    let vae_cfg = cio::read_vae_config(&need(dir.join("vae/config.json"))?)?;
    let mut notes = Vec::new();
    let said = cio::read_prediction(&dir.join("scheduler/scheduler_config.json"))
        .map(|p| p == Prediction::VPrediction);
    let v = resolve_v(said, opts.v_parameterization, "the scheduler config", &mut notes);
    let pred = if v { Prediction::VPrediction } else { Prediction::Epsilon };
    let config = cio::assemble(unet_cfg, text_cfg, vae_cfg, pred);
    let map = KeyMap::new(&config);
    let mut unused = Vec::new();
    let mut parts: [TensorMap; 3] = Default::default();
    for part in Part::ALL {
        let sub = dir.join(part.folder());
        let w = find_weights(&sub, part).ok_or_else(|| CheckpointError::NotAModel {
            path: sub.clone(),
            reason: "no weights file (model.safetensors / diffusion_pytorch_model.safetensors / .bin)".into(),
        })?;
        parts[part as usize] = load_part(&w, part, &map, opts, &mut unused)?;
    }
    // transformers < 4.31 saved this buffer; it is not a parameter.
    unused.retain(|k| !k.ends_with("embeddings.position_ids"));
    let [unet, text_encoder, vae] = parts;
    Ok(LoadedModel {
        config,
        unet,
        text_encoder,
        vae,
        v_parameterization: v,
        source: SourceInfo {
            spec: spec.into(),
            kind: SourceKind::Diffusers,
            path: Some(dir.into()),
            index: None,
            metadata: Default::default(),
            unused_keys: unused,
            notes,
        },
    })
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s.into_bytes()
}

/// Writes a Diffusers folder. `safetensors` picks .safetensors over .bin weights. Every file,
/// tokenizer included, comes from inside the binary. The folder is written under a temporary name
/// and renamed into place (an existing one is replaced only then), so a kill during the save never
/// leaves a folder that mixes old and new parts or lacks `model_index.json`.
pub fn save_diffusers(
    dir: &Path,
    parts: &crate::model::ModelParts<'_>,
    config: &ModelConfig,
    v_parameterization: bool,
    precision: Option<Precision>,
    safetensors: bool,
) -> Result<()> {
    crate::atomic::atomic_write_dir(
        dir,
        |tmp| fill_diffusers(tmp, parts, config, v_parameterization, precision, safetensors),
        |path, source| CheckpointError::Io { path: path.into(), source },
    )
}

fn fill_diffusers(
    dir: &Path,
    parts: &crate::model::ModelParts<'_>,
    config: &ModelConfig,
    v_parameterization: bool,
    precision: Option<Precision>,
    safetensors: bool,
) -> Result<()> {
    let vae = parts.vae.ok_or_else(|| CheckpointError::Invalid("a Diffusers folder needs the VAE".into()))?;
    let map = KeyMap::new(config);
    let pred = if v_parameterization { Prediction::VPrediction } else { Prediction::Epsilon };
    for sub in ["unet", "text_encoder", "vae", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io_err(dir.join(sub)))?;
    }
    let write_json = |rel: &str, v: serde_json::Value| -> Result<()> {
        let p = dir.join(rel);
        atomic_write_bytes(&p, &json_bytes(&v)).map_err(io_err(p))
    };
    for (part, tensors) in
        [(Part::Unet, parts.unet), (Part::TextEncoder, parts.text_encoder), (Part::Vae, vae)]
    {
        let mut out = Vec::new();
        for m in map.entries.iter().filter(|m| m.part == part) {
            let t = tensors.get(&m.hf).ok_or_else(|| {
                CheckpointError::Invalid(format!("{}: parameter `{}` is missing", part.folder(), m.hf))
            })?;
            let dtype = match precision {
                Some(p) => p.dtype(),
                None => crate::dtype::Dtype::from_candle(t.dtype()).ok_or_else(|| {
                    CheckpointError::Invalid(format!("cannot save {:?} tensors", t.dtype()))
                })?,
            };
            out.push(OutTensor {
                key: m.hf.clone(),
                dtype,
                shape: m.hf_shape.clone(),
                data: OutData::Tensor(t.clone()),
            });
        }
        let [st, bin] = weight_names(part);
        let sub = dir.join(part.folder());
        if safetensors {
            let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
            crate::safetensors_io::write_safetensors(&sub.join(format!("{st}.safetensors")), &out, &meta)?;
        } else {
            crate::ckpt_pickle::write_torch_state_dict(&sub.join(format!("{bin}.bin")), &out)?;
        }
    }
    write_json("unet/config.json", cio::unet_config_json(&config.unet))?;
    write_json("text_encoder/config.json", cio::clip_config_json(&config.text))?;
    write_json("vae/config.json", cio::vae_config_json(&config.vae, config.resolution))?;
    write_json("scheduler/scheduler_config.json", cio::scheduler_config_json(pred))?;
    write_json("tokenizer/tokenizer_config.json", cio::tokenizer_config_json(config.v2))?;
    write_json("tokenizer/special_tokens_map.json", cio::special_tokens_map_json(config.v2))?;
    let bad = |reason: String| CheckpointError::Invalid(format!("tokenizer files: {reason}"));
    for (name, text) in [
        ("tokenizer/vocab.json", crate::tokenizer_files::clip_vocab_json().map_err(bad)?),
        ("tokenizer/merges.txt", crate::tokenizer_files::clip_merges_txt().map_err(bad)?),
    ] {
        let p = dir.join(name);
        atomic_write_bytes(&p, text.as_bytes()).map_err(io_err(p))?;
    }
    write_json("model_index.json", cio::model_index_json())?;
    Ok(())
}
