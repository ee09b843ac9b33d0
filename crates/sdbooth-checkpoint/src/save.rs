//! Saving as kohya's train_db saves: SD single files (.safetensors / .ckpt) laid over the source
//! file, or Diffusers folders; modelspec metadata; the SD2 `.yaml` beside single files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sdbooth_models::ModelConfig;

use crate::atomic::atomic_write_bytes;
use crate::error::{io_err, CheckpointError, Result};
use crate::model::{ModelParts, SourceInfo, SourceKind};
use crate::single_file::{plan_single_file, Precision};

pub const V2_INFERENCE_YAML: &str = include_str!("../assets/v2-inference.yaml");
pub const V2_INFERENCE_V_YAML: &str = include_str!("../assets/v2-inference-v.yaml");

/// `--save_model_as`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveFormat {
    Ckpt,
    Safetensors,
    Diffusers,
    DiffusersSafetensors,
}

impl SaveFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ckpt" => Some(SaveFormat::Ckpt),
            "safetensors" => Some(SaveFormat::Safetensors),
            "diffusers" => Some(SaveFormat::Diffusers),
            "diffusers_safetensors" => Some(SaveFormat::DiffusersSafetensors),
            _ => None,
        }
    }

    /// The format an output path implies: `.safetensors`, `.ckpt`, else a Diffusers folder.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("safetensors") => SaveFormat::Safetensors,
            Some("ckpt") | Some("pt") | Some("pth") => SaveFormat::Ckpt,
            _ => SaveFormat::DiffusersSafetensors,
        }
    }

    /// kohya's default when `--save_model_as` is absent: the source's format.
    pub fn of_source(source: &SourceInfo) -> Self {
        match source.kind {
            SourceKind::SingleCkpt => SaveFormat::Ckpt,
            SourceKind::SingleSafetensors => SaveFormat::Safetensors,
            SourceKind::Diffusers | SourceKind::Builtin => SaveFormat::Diffusers,
        }
    }

    pub fn is_single_file(self) -> bool {
        matches!(self, SaveFormat::Ckpt | SaveFormat::Safetensors)
    }

    pub fn extension(self) -> &'static str {
        match self {
            SaveFormat::Ckpt => ".ckpt",
            SaveFormat::Safetensors => ".safetensors",
            _ => "",
        }
    }
}

pub struct SaveOptions<'a> {
    pub format: SaveFormat,
    /// None: each tensor keeps its dtype (kohya without `--save_precision`).
    pub precision: Option<Precision>,
    /// The loaded model's source: single-file sources are laid under the saved weights.
    pub source: Option<&'a SourceInfo>,
    /// safetensors `__metadata__` (modelspec.* from [`modelspec_metadata`], plus `sdbooth.*`).
    pub metadata: BTreeMap<String, String>,
    /// Added to the source .ckpt's counters, as kohya does.
    pub epoch: i64,
    pub global_step: i64,
    pub v_parameterization: bool,
    /// Write `<name>.yaml` (v2-inference[-v].yaml) beside SD2 single files.
    pub sd2_yaml: bool,
}

impl<'a> SaveOptions<'a> {
    pub fn new(format: SaveFormat) -> Self {
        SaveOptions {
            format,
            precision: None,
            source: None,
            metadata: BTreeMap::new(),
            epoch: 0,
            global_step: 0,
            v_parameterization: false,
            sd2_yaml: true,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SaveReport {
    pub files: Vec<PathBuf>,
    pub tensors: usize,
}

/// Saves the model at `path` in `opts.format`. Every file is written atomically.
pub fn save_model(
    path: &Path,
    parts: &ModelParts<'_>,
    config: &ModelConfig,
    opts: &SaveOptions<'_>,
) -> Result<SaveReport> {
    let mut report = SaveReport::default();
    if !opts.format.is_single_file() {
        let st = opts.format == SaveFormat::DiffusersSafetensors;
        crate::diffusers::save_diffusers(path, parts, config, opts.v_parameterization, opts.precision, st)?;
        report.files.push(path.into());
        report.tensors = parts.unet.len() + parts.text_encoder.len() + parts.vae.map_or(0, |v| v.len());
        return Ok(report);
    }
    let index = opts.source.and_then(|s| s.index.as_ref());
    if let Some(ix) = index {
        let same = std::fs::canonicalize(&ix.path)
            .ok()
            .zip(std::fs::canonicalize(path).ok())
            .is_some_and(|(a, b)| a == b);
        if same {
            return Err(CheckpointError::Invalid(format!(
                "{}: refusing to overwrite the model being trained from (its untrained keys are copied from it)",
                path.display()
            )));
        }
    }
    let tensors = plan_single_file(parts, config, opts.precision, index)?;
    report.tensors = tensors.len();
    match opts.format {
        SaveFormat::Safetensors => crate::safetensors_io::write_safetensors(path, &tensors, &opts.metadata)?,
        _ => {
            let (e0, s0) = index.map_or((0, 0), |ix| (ix.epoch.unwrap_or(0), ix.global_step.unwrap_or(0)));
            crate::ckpt_pickle::write_ckpt(path, &tensors, opts.epoch + e0, opts.global_step + s0)?;
        }
    }
    report.files.push(path.into());
    if config.v2 && opts.sd2_yaml {
        let yaml = path.with_extension("yaml");
        let text = if opts.v_parameterization { V2_INFERENCE_V_YAML } else { V2_INFERENCE_YAML };
        atomic_write_bytes(&yaml, text.as_bytes()).map_err(io_err(&yaml))?;
        report.files.push(yaml);
    }
    Ok(report)
}

/// The `--metadata_*` flags and training facts modelspec records.
#[derive(Clone, Debug, Default)]
pub struct ModelSpecArgs {
    pub title: Option<String>,
    pub output_name: Option<String>,
    pub author: Option<String>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub tags: Option<String>,
    pub usage_hint: Option<String>,
    pub thumbnail: Option<String>,
    pub merged_from: Option<String>,
    pub trigger_phrase: Option<String>,
    pub preprocessor: Option<String>,
    pub is_negative_embedding: Option<String>,
    /// `--resolution` (width, height); default by architecture.
    pub resolution: Option<(usize, usize)>,
    /// `--min_timestep` / `--max_timestep`.
    pub timesteps: Option<(u32, u32)>,
    pub clip_skip: Option<usize>,
}

/// ISO-8601 date-time (UTC) of a Unix timestamp, as modelspec.date holds it.
fn iso_date(secs: u64) -> String {
    crate::time::UtcTime::from_unix(secs).iso()
}

/// modelspec metadata as kohya's `get_sai_model_spec(..., is_stable_diffusion_ckpt=True)` writes it
/// for a DreamBooth checkpoint.
pub fn modelspec_metadata(
    config: &ModelConfig,
    v_parameterization: bool,
    args: &ModelSpecArgs,
    now: SystemTime,
) -> BTreeMap<String, String> {
    let ts = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            m.insert(format!("modelspec.{k}"), v);
        }
    };
    let arch = match (config.v2, v_parameterization) {
        (false, _) => "stable-diffusion-v1",
        (true, false) => "stable-diffusion-v2-512",
        (true, true) => "stable-diffusion-v2-768-v",
    };
    put("sai_model_spec", Some("1.0.1".into()));
    put("architecture", Some(arch.into()));
    put("implementation", Some("https://github.com/Stability-AI/generative-models".into()));
    let title =
        args.title.clone().or_else(|| args.output_name.clone()).unwrap_or_else(|| format!("Checkpoint@{ts}"));
    put("title", Some(title));
    put("date", Some(iso_date(ts as u64)));
    let (w, h) =
        args.resolution.unwrap_or(if config.v2 && v_parameterization { (768, 768) } else { (512, 512) });
    put("resolution", Some(format!("{w}x{h}")));
    put("prediction_type", Some(if v_parameterization { "v" } else { "epsilon" }.into()));
    put("timestep_range", args.timesteps.map(|(a, b)| format!("{a},{b}")));
    put("encoder_layer", args.clip_skip.map(|c| c.to_string()));
    put("author", args.author.clone());
    put("description", args.description.clone());
    put("license", args.license.clone());
    put("tags", args.tags.clone());
    put("usage_hint", args.usage_hint.clone());
    put("thumbnail", args.thumbnail.clone());
    put("merged_from", args.merged_from.clone());
    put("trigger_phrase", args.trigger_phrase.clone());
    put("preprocessor", args.preprocessor.clone());
    put("is_negative_embedding", args.is_negative_embedding.clone());
    put("implementation_version", Some(format!("sdbooth/{}", env!("CARGO_PKG_VERSION"))));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00");
        assert_eq!(iso_date(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(iso_date(951_782_400), "2000-02-29T00:00:00");
    }

    #[test]
    fn modelspec_matches_kohya_fields() {
        let args =
            ModelSpecArgs { output_name: Some("last".into()), clip_skip: Some(2), ..Default::default() };
        let m = modelspec_metadata(&ModelConfig::sd2_768_v(), true, &args, UNIX_EPOCH);
        assert_eq!(m["modelspec.architecture"], "stable-diffusion-v2-768-v");
        assert_eq!(m["modelspec.resolution"], "768x768");
        assert_eq!(m["modelspec.prediction_type"], "v");
        assert_eq!(m["modelspec.title"], "last");
        assert_eq!(m["modelspec.encoder_layer"], "2");
        assert!(!m.contains_key("modelspec.author"));
    }
}
