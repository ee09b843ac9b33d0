//! SD single files (.safetensors / .ckpt) ↔ the in-memory model.
//!
//! Loading reads each tensor once, straight into its destination, splitting SD2's fused q/k/v.
//! Saving builds a list of output tensors (ours under SD names, the source's other keys as raw byte
//! ranges) and streams it: no second copy of the model is ever held.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use sdbooth_models::{ModelConfig, Prediction};

use crate::config_io::{infer_single_file, ShapeMap};
use crate::dtype::Dtype;
use crate::error::{CheckpointError, Result};
use crate::keymap::{v2_filler_copies, KeyMap, Part, LOGIT_SCALE_KEY, TEXT_PROJECTION_KEY};
use crate::keymap_clip::normalize_old_clip_key;
use crate::model::{resolve_v, LoadOptions, LoadedModel, ModelParts, SourceInfo, SourceKind, TensorMap};
use crate::tensor_file::{OutData, OutTensor, SingleFormat, TensorIndex};

/// Opens a single file's index with kohya's load-time renames applied (old CLIP key names).
pub fn open_index(path: &Path) -> Result<TensorIndex> {
    let mut index = TensorIndex::open(path)?;
    for e in &mut index.entries {
        if let Some(new) = normalize_old_clip_key(&e.key) {
            e.key = new;
        }
    }
    Ok(index)
}

/// modelspec's prediction type, if the metadata carries one.
pub fn metadata_v(meta: &BTreeMap<String, String>) -> Option<bool> {
    match meta.get("modelspec.prediction_type").map(String::as_str) {
        Some("v") | Some("v_prediction") => Some(true),
        Some("epsilon") => Some(false),
        _ => None,
    }
}

pub fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let index = open_index(path)?;
    let mut notes = index.notes.clone();
    let said = metadata_v(&index.metadata);
    let v = resolve_v(said, opts.v_parameterization, "the file's modelspec metadata", &mut notes);
    let shapes: ShapeMap = index.entries.iter().map(|e| (e.key.clone(), e.shape.clone())).collect();
    let config = infer_single_file(path, &shapes, v)?;
    let map = KeyMap::new(&config);
    let mut parts: [TensorMap; 3] = Default::default();
    let mut unused = Vec::new();
    let mut file = index.reopen()?;
    for e in &index.entries {
        let targets = map.from_sd(&e.key);
        if targets.is_empty() {
            unused.push(e.key.clone());
            continue;
        }
        let bad =
            |reason: String| CheckpointError::BadTensor { path: path.into(), key: e.key.clone(), reason };
        if e.shape != targets[0].sd_shape {
            return Err(bad(format!(
                "shape {:?}, this architecture needs {:?}",
                e.shape, targets[0].sd_shape
            )));
        }
        let t = index.read(&mut file, e)?;
        let t = match opts.dtype {
            Some(d) => t.to_dtype(d)?,
            None => t,
        };
        for m in &targets {
            let part = match m.qkv {
                // Rows i*n..(i+1)*n of the fused tensor; `contiguous` copies just this third.
                Some(i) => t.narrow(0, i * m.hf_shape[0], m.hf_shape[0])?.contiguous()?,
                None => t.reshape(m.hf_shape.as_slice())?,
            };
            parts[m.part as usize].insert(m.hf.clone(), part);
        }
    }
    let missing: Vec<String> = map
        .entries
        .iter()
        .filter(|m| !parts[m.part as usize].contains_key(&m.hf))
        .map(|m| m.sd.clone())
        .collect();
    if !missing.is_empty() {
        let mut keys: Vec<String> = missing.iter().take(10).cloned().collect();
        if missing.len() > 10 {
            keys.push(format!("… {} more", missing.len() - 10));
        }
        return Err(CheckpointError::MissingKeys { path: path.into(), keys });
    }
    let kind = if index.format == SingleFormat::Ckpt {
        SourceKind::SingleCkpt
    } else {
        SourceKind::SingleSafetensors
    };
    let [unet, text_encoder, vae] = parts;
    Ok(LoadedModel {
        config,
        unet,
        text_encoder,
        vae,
        v_parameterization: v,
        source: SourceInfo {
            spec: path.display().to_string(),
            kind,
            path: Some(path.into()),
            metadata: index.metadata.clone(),
            index: Some(index),
            unused_keys: unused,
            notes,
        },
    })
}

/// `--save_precision`: fp16 / bf16 / float; None keeps each tensor's dtype (kohya's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Fp16,
    Bf16,
    Float,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fp16" | "float16" | "half" => Some(Precision::Fp16),
            "bf16" | "bfloat16" => Some(Precision::Bf16),
            "float" | "fp32" | "float32" => Some(Precision::Float),
            _ => None,
        }
    }
    pub fn dtype(self) -> Dtype {
        match self {
            Precision::Fp16 => Dtype::F16,
            Precision::Bf16 => Dtype::BF16,
            Precision::Float => Dtype::F32,
        }
    }
}

fn out_dtype(t: &Tensor, precision: Option<Precision>) -> Result<Dtype> {
    match precision {
        Some(p) => Ok(p.dtype()),
        None => Dtype::from_candle(t.dtype())
            .ok_or_else(|| CheckpointError::Invalid(format!("cannot save tensors of type {:?}", t.dtype()))),
    }
}

/// Our weights under SD names (fused q/k/v concatenated), keyed by SD key.
pub fn sd_tensors(
    parts: &ModelParts<'_>,
    config: &ModelConfig,
    precision: Option<Precision>,
) -> Result<BTreeMap<String, OutTensor>> {
    let map = KeyMap::new(config);
    let mut out = BTreeMap::new();
    let sources: [(Part, Option<&TensorMap>); 3] = [
        (Part::Unet, Some(parts.unet)),
        (Part::TextEncoder, Some(parts.text_encoder)),
        (Part::Vae, parts.vae),
    ];
    let mut fused: HashMap<String, Vec<(usize, Tensor)>> = HashMap::new();
    for (part, tensors) in sources {
        let Some(tensors) = tensors else { continue };
        for name in tensors.keys() {
            if map.from_hf(part, name).is_none() {
                return Err(CheckpointError::Invalid(format!(
                    "{}: parameter `{name}` is not part of the {} architecture",
                    part.folder(),
                    config.name
                )));
            }
        }
        for m in map.entries.iter().filter(|m| m.part == part) {
            let t = tensors.get(&m.hf).ok_or_else(|| {
                CheckpointError::Invalid(format!("{}: parameter `{}` is missing", part.folder(), m.hf))
            })?;
            if t.dims() != m.hf_shape.as_slice() {
                return Err(CheckpointError::Invalid(format!(
                    "{}: `{}` has shape {:?}, expected {:?}",
                    part.folder(),
                    m.hf,
                    t.dims(),
                    m.hf_shape
                )));
            }
            match m.qkv {
                Some(i) => fused.entry(m.sd.clone()).or_default().push((i, t.clone())),
                None => {
                    let dtype = out_dtype(t, precision)?;
                    // Reshape only where SD's shape differs (1×1 conv ↔ linear): a no-op reshape of
                    // a strided tensor would copy it.
                    let t =
                        if m.sd_shape == m.hf_shape { t.clone() } else { t.reshape(m.sd_shape.as_slice())? };
                    let data = OutData::Tensor(t);
                    out.insert(
                        m.sd.clone(),
                        OutTensor { key: m.sd.clone(), dtype, shape: m.sd_shape.clone(), data },
                    );
                }
            }
        }
    }
    for (key, mut pieces) in fused {
        pieces.sort_by_key(|(i, _)| *i);
        let ts: Vec<Tensor> = pieces.into_iter().map(|(_, t)| t).collect();
        let t = Tensor::cat(&ts, 0)?;
        let dtype = out_dtype(&t, precision)?;
        let shape = t.dims().to_vec();
        out.insert(key.clone(), OutTensor { key, dtype, shape, data: OutData::Tensor(t) });
    }
    Ok(out)
}

/// Kohya's SD2 filler keys for a file written with no single-file source.
fn add_v2_filler(
    out: &mut BTreeMap<String, OutTensor>,
    config: &ModelConfig,
    precision: Option<Precision>,
) -> Result<()> {
    let map = KeyMap::new(config);
    for (new, from) in v2_filler_copies(config, &map) {
        if let Some(t) = out.get(&from).cloned() {
            out.insert(new.clone(), OutTensor { key: new, ..t });
        }
    }
    let h = config.text.hidden_size;
    // kohya: ones in the text encoder's dtype; logit_scale = torch.tensor(1), an int64 scalar
    // unless a save precision converts it.
    let first =
        out.values().find(|t| t.key.starts_with("cond_stage_model.")).map(|t| t.dtype).unwrap_or(Dtype::F32);
    let proj_dtype = precision.map(Precision::dtype).unwrap_or(first);
    let ones = Tensor::ones((h, h), DType::F32, &candle_core::Device::Cpu)?;
    out.insert(
        TEXT_PROJECTION_KEY.into(),
        OutTensor {
            key: TEXT_PROJECTION_KEY.into(),
            dtype: proj_dtype,
            shape: vec![h, h],
            data: OutData::Tensor(ones),
        },
    );
    let scale_dtype = precision.map(Precision::dtype).unwrap_or(Dtype::I64);
    let one = Tensor::new(1i64, &candle_core::Device::Cpu)?;
    out.insert(
        LOGIT_SCALE_KEY.into(),
        OutTensor {
            key: LOGIT_SCALE_KEY.into(),
            dtype: scale_dtype,
            shape: vec![],
            data: OutData::Tensor(one),
        },
    );
    Ok(())
}

/// The full list of tensors an SD single file gets: the source's keys in the source's order (ours
/// replacing theirs, the rest copied as raw bytes), then our keys the source lacks; or, with no
/// single-file source, kohya's converter key set.
pub fn plan_single_file(
    parts: &ModelParts<'_>,
    config: &ModelConfig,
    precision: Option<Precision>,
    source: Option<&TensorIndex>,
) -> Result<Vec<OutTensor>> {
    let mut ours = sd_tensors(parts, config, precision)?;
    let Some(src) = source else {
        if parts.vae.is_none() {
            return Err(CheckpointError::Invalid(
                "a VAE is needed to save a single file without a source file".into(),
            ));
        }
        if config.v2 {
            add_v2_filler(&mut ours, config, precision)?;
        }
        return Ok(ours.into_values().collect());
    };
    let mut out = Vec::with_capacity(src.entries.len() + ours.len());
    for e in &src.entries {
        match ours.remove(&e.key) {
            Some(t) => {
                if t.shape != e.shape {
                    return Err(CheckpointError::Mismatch {
                        path: src.path.clone(),
                        reason: format!(
                            "`{}` is {:?} in the source but {:?} in the model",
                            e.key, e.shape, t.shape
                        ),
                    });
                }
                out.push(t);
            }
            None => out.push(OutTensor {
                key: e.key.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                data: OutData::Raw { path: src.path.clone(), offset: e.offset },
            }),
        }
    }
    out.extend(ours.into_values());
    Ok(out)
}

/// `prediction` as modelspec spells it.
pub fn prediction_str(p: Prediction) -> &'static str {
    match p {
        Prediction::VPrediction => "v",
        Prediction::Epsilon => "epsilon",
    }
}
