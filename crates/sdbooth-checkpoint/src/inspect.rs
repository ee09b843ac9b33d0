//! `sdbooth inspect`: what a model file or folder holds, from its tensor index alone (no tensor
//! data is read, so a 4 GB file inspects in milliseconds): architecture, version, parameters per
//! part, dtypes, metadata, and keys that are missing or unexpected for the architecture.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use sdbooth_models::{ModelConfig, Prediction};

use crate::config_io::{self as cio, infer_single_file, ShapeMap};
use crate::dtype::Dtype;
use crate::error::{CheckpointError, Result};
use crate::keymap::{KeyMap, Part};
use crate::single_file::{metadata_v, open_index};
use crate::tensor_file::{SingleFormat, TensorIndex};

#[derive(Clone, Debug)]
pub struct Inspection {
    pub path: String,
    pub format: String,
    pub config: ModelConfig,
    /// None: the file does not say (single files without modelspec metadata).
    pub v_parameterization: Option<bool>,
    /// Scalar parameter counts per part.
    pub params: BTreeMap<Part, usize>,
    /// Tensor counts per dtype.
    pub dtypes: BTreeMap<Dtype, usize>,
    pub metadata: BTreeMap<String, String>,
    pub missing: Vec<String>,
    /// Keys that feed no parameter (EMA copies, schedule buffers, SD2's 24th block, …).
    pub extra: Vec<String>,
    pub epoch: Option<i64>,
    pub global_step: Option<i64>,
    pub tensors: usize,
}

fn count_params(map: &KeyMap, present: impl Fn(&str) -> bool, by_sd: bool) -> BTreeMap<Part, usize> {
    let mut params = BTreeMap::new();
    for m in &map.entries {
        let key = if by_sd { &m.sd } else { &m.hf };
        if present(key) {
            *params.entry(m.part).or_insert(0) += m.hf_shape.iter().product::<usize>();
        }
    }
    params
}

fn single(path: &Path, index: TensorIndex) -> Result<Inspection> {
    let shapes: ShapeMap = index.entries.iter().map(|e| (e.key.clone(), e.shape.clone())).collect();
    let said = metadata_v(&index.metadata);
    let config = infer_single_file(path, &shapes, said.unwrap_or(false))?;
    let map = KeyMap::new(&config);
    let sd = map.sd_shapes();
    let mut missing = Vec::new();
    for (k, s) in &sd {
        match shapes.get(k) {
            None => missing.push(k.clone()),
            Some(fs) if fs != s => missing.push(format!("{k} (shape {fs:?}, expected {s:?})")),
            _ => {}
        }
    }
    let extra = shapes.keys().filter(|k| !sd.contains_key(*k)).cloned().collect();
    let mut dtypes = BTreeMap::new();
    for e in &index.entries {
        *dtypes.entry(e.dtype).or_insert(0) += 1;
    }
    Ok(Inspection {
        path: path.display().to_string(),
        format: match index.format {
            SingleFormat::Safetensors => "SD single file (.safetensors)".into(),
            SingleFormat::Ckpt => "SD single file (PyTorch .ckpt)".into(),
        },
        params: count_params(&map, |k| shapes.contains_key(k), true),
        config,
        v_parameterization: said,
        dtypes,
        metadata: index.metadata.clone(),
        missing,
        extra,
        epoch: index.epoch,
        global_step: index.global_step,
        tensors: index.entries.len(),
    })
}

fn diffusers(dir: &Path) -> Result<Inspection> {
    crate::diffusers::check_model_index(dir)?;
    let unet = cio::read_unet_config(&dir.join("unet/config.json"))?;
    let text = cio::read_clip_config(&dir.join("text_encoder/config.json"))?;
    let vae = cio::read_vae_config(&dir.join("vae/config.json"))?;
    let pred = cio::read_prediction(&dir.join("scheduler/scheduler_config.json"));
    let config = cio::assemble(unet, text, vae, pred.unwrap_or(Prediction::Epsilon));
    let map = KeyMap::new(&config);
    let (mut missing, mut extra, mut dtypes, mut present) =
        (Vec::new(), Vec::new(), BTreeMap::new(), Vec::new());
    let mut tensors = 0;
    for part in Part::ALL {
        let sub = dir.join(part.folder());
        let w = crate::diffusers::find_weights(&sub, part).ok_or_else(|| CheckpointError::NotAModel {
            path: sub.clone(),
            reason: "no weights file".into(),
        })?;
        let index = TensorIndex::open(&w)?;
        tensors += index.entries.len();
        let expected: BTreeMap<String, Vec<usize>> = map.hf_shapes(part).into_iter().collect();
        for e in &index.entries {
            *dtypes.entry(e.dtype).or_insert(0) += 1;
            if expected.contains_key(&e.key) {
                present.push((part, e.key.clone()));
            } else {
                extra.push(format!("{}/{}", part.folder(), e.key));
            }
        }
        for k in expected.keys() {
            if !index.entries.iter().any(|e| &e.key == k) {
                missing.push(format!("{}/{k}", part.folder()));
            }
        }
    }
    let mut params = BTreeMap::new();
    for (part, k) in &present {
        if let Some(m) = map.from_hf(*part, k) {
            *params.entry(*part).or_insert(0) += m.hf_shape.iter().product::<usize>();
        }
    }
    Ok(Inspection {
        path: dir.display().to_string(),
        format: "Diffusers folder".into(),
        config,
        v_parameterization: pred.map(|p| p == Prediction::VPrediction),
        params,
        dtypes,
        metadata: BTreeMap::new(),
        missing,
        extra,
        epoch: None,
        global_step: None,
        tensors,
    })
}

/// Inspects a single file, a Diffusers folder, an HF id in the cache, or a `builtin:*` name.
pub fn inspect(spec: &str) -> Result<Inspection> {
    if let Some(b) = sdbooth_models::builtin(spec).filter(|_| spec.starts_with("builtin:")) {
        let map = KeyMap::new(&b.config);
        return Ok(Inspection {
            path: spec.into(),
            format: "builtin (seeded random weights, in memory)".into(),
            params: count_params(&map, |_| true, true),
            v_parameterization: Some(b.config.prediction == Prediction::VPrediction),
            dtypes: [(Dtype::F32, map.entries.len())].into_iter().collect(),
            tensors: map.entries.len(),
            config: b.config,
            metadata: BTreeMap::new(),
            missing: Vec::new(),
            extra: Vec::new(),
            epoch: None,
            global_step: None,
        });
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return diffusers(path);
    }
    if path.is_file() {
        return single(path, open_index(path)?);
    }
    if let Some(dir) = crate::hf_cache::resolve(spec)? {
        return diffusers(&dir);
    }
    Err(CheckpointError::NotFound { spec: spec.into(), reason: "no such file or folder".into() })
}

fn millions(n: usize) -> String {
    format!("{:.2} M", n as f64 / 1e6)
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(f, "{}", self.path)?;
        writeln!(f, "  format:        {}", self.format)?;
        writeln!(
            f,
            "  version:       {}",
            if c.v2 { "Stable Diffusion 2.x" } else { "Stable Diffusion 1.x" }
        )?;
        writeln!(f, "  architecture:  {} (U-Net channels {:?}, {} layers/block, cross-attn {}, text {}×{} {}, VAE {:?})",
            c.name, c.unet.block_out_channels, c.unet.layers_per_block, c.unet.cross_attention_dim,
            c.text.num_hidden_layers, c.text.hidden_size, if c.v2 { "OpenCLIP" } else { "CLIP" }, c.vae.block_out_channels)?;
        let pred = match self.v_parameterization {
            Some(true) => "v-prediction",
            Some(false) => "epsilon",
            None => "not recorded (pass --v_parameterization for v models)",
        };
        writeln!(f, "  prediction:    {pred}")?;
        let total: usize = self.params.values().sum();
        for p in Part::ALL {
            writeln!(
                f,
                "  {:<14} {} parameters",
                format!("{}:", p.folder()),
                millions(self.params.get(&p).copied().unwrap_or(0))
            )?;
        }
        writeln!(f, "  total:         {} parameters in {} tensors", millions(total), self.tensors)?;
        let dt: Vec<String> = self.dtypes.iter().map(|(d, n)| format!("{d}×{n}")).collect();
        writeln!(f, "  dtypes:        {}", dt.join(", "))?;
        if let (Some(e), Some(s)) = (self.epoch, self.global_step) {
            writeln!(f, "  epoch/step:    {e} / {s}")?;
        }
        if !self.metadata.is_empty() {
            writeln!(f, "  metadata:")?;
            for (k, v) in &self.metadata {
                let v = if v.len() > 100 {
                    format!("{}… ({} chars)", &v[..v.floor_char_boundary_compat(100)], v.len())
                } else {
                    v.clone()
                };
                writeln!(f, "    {k}: {v}")?;
            }
        }
        writeln!(f, "  missing keys:  {}", self.missing.len())?;
        for k in self.missing.iter().take(20) {
            writeln!(f, "    {k}")?;
        }
        writeln!(f, "  extra keys:    {} (kept on save; not loaded)", self.extra.len())?;
        if c.v2 && !self.extra.is_empty() {
            // Every SD2 single file holds these; kohya and diffusers drop them on load.
            writeln!(
                f,
                "    (SD2: OpenCLIP's last block, text_projection and logit_scale are expected here)"
            )?;
        }
        for k in self.extra.iter().take(20) {
            writeln!(f, "    {k}")?;
        }
        if self.extra.len() > 20 {
            writeln!(f, "    … {} more", self.extra.len() - 20)?;
        }
        Ok(())
    }
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorBoundary for String {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}
