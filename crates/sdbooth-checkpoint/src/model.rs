//! The loaded model, load options and the `load_model` entry point that dispatches on the spec:
//! `builtin:*`, an SD single file, a Diffusers folder, or an HF model id in the local cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sdbooth_models::{ModelConfig, Prediction};

use crate::error::{CheckpointError, Result};
use crate::keymap::Part;
use crate::tensor_file::TensorIndex;

/// Tensors of one model part under diffusers' names.
pub type TensorMap = BTreeMap<String, Tensor>;

/// Where a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Builtin,
    SingleSafetensors,
    SingleCkpt,
    Diffusers,
}

/// What saving needs to know about the source: for single files, the full tensor index so keys we
/// do not train (EMA, `betas`, …) are copied over unchanged, as kohya keeps them.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub spec: String,
    pub kind: SourceKind,
    pub path: Option<PathBuf>,
    /// Single-file sources: every tensor in the file (old CLIP key names normalised as kohya does).
    pub index: Option<TensorIndex>,
    /// safetensors metadata of the source (modelspec.* etc.).
    pub metadata: BTreeMap<String, String>,
    /// Keys in the source that feed no parameter (kept on save; listed by inspect).
    pub unused_keys: Vec<String>,
    /// Other observations for the user (dtype mix, v-prediction source, …).
    pub notes: Vec<String>,
}

impl SourceInfo {
    pub fn builtin(spec: &str) -> Self {
        SourceInfo {
            spec: spec.into(),
            kind: SourceKind::Builtin,
            path: None,
            index: None,
            metadata: BTreeMap::new(),
            unused_keys: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// A model in memory: configuration plus the three parts under diffusers' names.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub unet: TensorMap,
    pub text_encoder: TensorMap,
    pub vae: TensorMap,
    /// Whether the model predicts v (from metadata / scheduler config, else the flag).
    pub v_parameterization: bool,
    pub source: SourceInfo,
}

impl LoadedModel {
    pub fn part(&self, p: Part) -> &TensorMap {
        match p {
            Part::Unet => &self.unet,
            Part::TextEncoder => &self.text_encoder,
            Part::Vae => &self.vae,
        }
    }

    pub fn parts(&self) -> ModelParts<'_> {
        ModelParts { unet: &self.unet, text_encoder: &self.text_encoder, vae: Some(&self.vae) }
    }
}

/// The weights to save (borrowed: the trainer keeps ownership).
#[derive(Clone, Copy)]
pub struct ModelParts<'a> {
    pub unet: &'a TensorMap,
    pub text_encoder: &'a TensorMap,
    /// None: keep the source's VAE tensors (single-file sources only).
    pub vae: Option<&'a TensorMap>,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `--v2`: Some(flag) checks the file agrees; None detects.
    pub v2: Option<bool>,
    /// `--v_parameterization`: used when the file does not say.
    pub v_parameterization: bool,
    /// `--vae`: a separate VAE (SD single file, VAE-only file, Diffusers VAE folder/file).
    pub vae: Option<PathBuf>,
    /// Cast every tensor as it is read (None: keep the file's dtype, for exact round trips).
    pub dtype: Option<DType>,
}

/// Loads `spec`: `builtin:NAME`, an SD `.safetensors`/`.ckpt` file, a Diffusers folder, or an HF
/// model id (`org/name`) found in the local Hugging Face cache.
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let mut model = load_base(spec, opts)?;
    if let Some(v2) = opts.v2 {
        check_v2(&model, v2)?;
    }
    if let Some(vae_path) = &opts.vae {
        model.vae = crate::vae_file::load_vae(vae_path, &model.config, opts.dtype)?;
        model.source.notes.push(format!("VAE replaced by {}", vae_path.display()));
    }
    Ok(model)
}

fn load_base(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    if let Some(b) =
        sdbooth_models::builtin(spec).filter(|_| spec.starts_with("builtin:") || !Path::new(spec).exists())
    {
        return load_builtin(spec, &b, opts);
    }
    if spec.starts_with("builtin:") {
        return Err(CheckpointError::NotFound {
            spec: spec.into(),
            reason: format!(
                "unknown builtin model; known: {}",
                sdbooth_models::config::BUILTIN_NAMES.join(", ")
            ),
        });
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return crate::diffusers::load_diffusers(path, spec, opts);
    }
    if path.is_file() {
        return crate::single_file::load_single_file(path, opts);
    }
    if let Some(dir) = crate::hf_cache::resolve(spec)? {
        let mut m = crate::diffusers::load_diffusers(&dir, spec, opts)?;
        m.source.notes.push(format!("resolved from the Hugging Face cache: {}", dir.display()));
        return Ok(m);
    }
    Err(CheckpointError::NotFound {
        spec: spec.into(),
        reason: "not a file, a folder, a builtin:* name, or a model id in the local Hugging Face cache"
            .into(),
    })
}

fn load_builtin(spec: &str, b: &sdbooth_models::BuiltinModel, opts: &LoadOptions) -> Result<LoadedModel> {
    let sd = sdbooth_models::random_model(b)
        .map_err(|e| CheckpointError::Invalid(format!("building {spec}: {e}")))?;
    let cast = |m: TensorMap| -> Result<TensorMap> {
        match opts.dtype {
            None => Ok(m),
            Some(d) => m.into_iter().map(|(k, t)| Ok((k, t.to_dtype(d)?))).collect(),
        }
    };
    let v = b.config.prediction == Prediction::VPrediction;
    Ok(LoadedModel {
        config: b.config.clone(),
        unet: cast(sd.unet.to_tensors())?,
        text_encoder: cast(sd.text_encoder.to_tensors())?,
        vae: cast(sd.vae.to_tensors())?,
        v_parameterization: v,
        source: SourceInfo::builtin(spec),
    })
}

/// `--v2` must agree with the file; explain which keys told us otherwise.
pub fn check_v2(model: &LoadedModel, v2: bool) -> Result<()> {
    if model.config.v2 == v2 {
        return Ok(());
    }
    let path = model.source.path.clone().unwrap_or_else(|| model.source.spec.clone().into());
    let reason = if model.config.v2 {
        "this is a Stable Diffusion 2.x model (OpenCLIP-H text encoder: cond_stage_model.model.* keys, \
         1024-wide cross-attention) but --v2 was not given; add --v2"
    } else {
        "--v2 was given but this is a Stable Diffusion 1.x model (CLIP-L text encoder: \
         cond_stage_model.transformer.* keys, 768-wide cross-attention); remove --v2"
    };
    Err(CheckpointError::Mismatch { path, reason: reason.into() })
}

/// v-parameterization as the source says it (modelspec metadata or scheduler), else the flag.
pub(crate) fn resolve_v(said: Option<bool>, flag: bool, where_: &str, notes: &mut Vec<String>) -> bool {
    match said {
        Some(v) => {
            if v != flag && flag {
                notes.push(format!("{where_} says epsilon prediction; --v_parameterization overrides it"));
                return true;
            }
            v
        }
        None => flag,
    }
}
