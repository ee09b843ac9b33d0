//! Model files and training states, named and pruned as kohya names and prunes them: the
//! [`Saver`] part of the run, and the loading half for `--resume`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sdbooth_checkpoint::{modelspec_metadata, save_model, ModelParts, SaveOptions};

use super::parts::{Board, RunPart};
use super::setup::Model;
use super::Trainer;
use crate::error::{Result, TrainError};
use crate::logs::StepRecord;
use crate::optim::Optimizer;
use crate::state::{self, RunState};

const UNET_PREFIX: &str = "unet.";
const TEXT_PREFIX: &str = "text_encoder.";

fn save_model_file(t: &Trainer<'_>, path: &Path, epoch: u64) -> Result<()> {
    let unet = t.model.unet_params.to_tensors();
    let text = t.model.text_params.to_tensors();
    let vae_map;
    let vae = match &t.model.vae_params {
        Some(p) => {
            vae_map = p.to_tensors();
            Some(&vae_map)
        }
        // The VAE was freed after caching: single-file sources keep theirs; others reload it.
        None if t.model.loaded.source.index.is_some() => None,
        None => {
            let reloaded = sdbooth_checkpoint::load_model(
                &t.model.loaded.source.spec,
                &sdbooth_checkpoint::LoadOptions {
                    v2: None,
                    v_parameterization: t.model.v_parameterization,
                    vae: t.plan.model.vae.clone(),
                    dtype: None,
                },
            )
            .map_err(|e| TrainError::LoadModel {
                spec: t.model.loaded.source.spec.clone(),
                source: Box::new(e),
            })?;
            vae_map = reloaded.vae;
            Some(&vae_map)
        }
    };
    let parts = ModelParts { unet: &unet, text_encoder: &text, vae };
    let mut metadata = modelspec_metadata(
        &t.model.config,
        t.model.v_parameterization,
        &t.plan.saving.metadata,
        std::time::SystemTime::now(),
    );
    metadata.insert("sdbooth.global_step".into(), t.state.global_step.to_string());
    metadata.insert("sdbooth.epoch".into(), epoch.to_string());
    let mut opts = SaveOptions::new(t.output.format);
    opts.precision = t.plan.saving.precision;
    opts.source = Some(&t.model.loaded.source);
    opts.metadata = metadata;
    opts.epoch = epoch as i64;
    opts.global_step = t.state.global_step as i64;
    opts.v_parameterization = t.model.v_parameterization;
    save_model(path, &parts, &t.model.config, &opts)
        .map_err(|e| TrainError::SaveModel { path: path.to_path_buf(), source: Box::new(e) })?;
    tracing::info!("saved {}", path.display());
    Ok(())
}

pub(super) fn save_state_dir(t: &Trainer<'_>, dir: &Path) -> Result<()> {
    let mut weights = HashMap::new();
    for (k, v) in t.model.unet_params.iter() {
        weights.insert(format!("{UNET_PREFIX}{k}"), v.as_tensor().detach());
    }
    for (k, v) in t.model.text_params.iter() {
        weights.insert(format!("{TEXT_PREFIX}{k}"), v.as_tensor().detach());
    }
    state::save_state(dir, &t.state, &t.optimizer, &weights)?;
    tracing::info!("saved state {}", dir.display());
    Ok(())
}

/// Reads a state folder and writes its weights, on `device`, into the model.
pub fn load_state(dir: &Path, model: &mut Model, device: &Device) -> Result<(RunState, Optimizer)> {
    let (st, optimizer, weights) = state::load_state(dir, device)?;
    let mut unet = std::collections::BTreeMap::new();
    let mut text = std::collections::BTreeMap::new();
    for (k, v) in weights {
        if let Some(n) = k.strip_prefix(UNET_PREFIX) {
            unet.insert(n.to_string(), v);
        } else if let Some(n) = k.strip_prefix(TEXT_PREFIX) {
            text.insert(n.to_string(), v);
        }
    }
    let check = |expected: &sdbooth_models::ParamStore,
                 got: &std::collections::BTreeMap<String, Tensor>,
                 what: &str| {
        if expected.len() != got.len() {
            return Err(TrainError::state(
                dir,
                format!("{what}: {} tensors, the model has {}", got.len(), expected.len()),
            ));
        }
        // Another architecture (an SD1 state on an SD2 model) has other shapes.
        for (name, var) in expected.iter() {
            let saved = got.get(name).map(|t| t.dims().to_vec());
            if saved.as_deref() != Some(var.dims()) {
                return Err(TrainError::state(
                    dir,
                    format!(
                        "--resume: {what} tensor {name} is {saved:?} in the state but {:?} in this model: \
                         the state is of another model architecture",
                        var.dims()
                    ),
                ));
            }
        }
        Ok(())
    };
    check(&model.unet_params, &unet, "U-Net")?;
    check(&model.text_params, &text, "text encoder")?;
    model.unet_params = sdbooth_models::ParamStore::from_tensors(unet)?;
    model.text_params = sdbooth_models::ParamStore::from_tensors(text)?;
    Ok((st, optimizer))
}

/// The saving part of a run: models and states at kohya's moments, pruned as kohya prunes them;
/// on Ctrl-C, the state of the step just finished, and the run stops.
pub(super) struct Saver {
    /// `--save_every_n_epochs`, or what `--save_n_epoch_ratio` makes of it for this run.
    every_n_epochs: Option<u64>,
}

impl Saver {
    pub fn new(t: &Trainer<'_>) -> Self {
        let s = &t.plan.saving;
        // kohya: --save_n_epoch_ratio r sets save_every_n_epochs to floor(epochs / r), at least 1.
        let from_ratio = s.n_epoch_ratio.map(|r| (t.num_epochs / r).max(1));
        Saver { every_n_epochs: from_ratio.or(s.every_n_epochs).filter(|&n| n > 0) }
    }
}

impl RunPart for Saver {
    fn after_step(&mut self, t: &Trainer<'_>, r: &StepRecord, _board: &mut Board) -> Result<()> {
        save_on_step(t, r.epoch)?;
        if super::interrupt_requested() {
            let state = save_interrupted(t)?;
            return Err(TrainError::Interrupted { step: t.state.global_step, state });
        }
        Ok(())
    }

    fn at_epoch_end(&mut self, t: &Trainer<'_>, epoch: u64, _board: &mut Board) -> Result<()> {
        match self.every_n_epochs {
            Some(n) => save_on_epoch_end(t, epoch, n),
            None => Ok(()),
        }
    }

    fn at_end(&mut self, t: &Trainer<'_>, epoch: u64, _board: &mut Board) -> Result<()> {
        save_final(t, epoch)
    }
}

/// `--save_every_n_steps` (model and, with `--save_state`, state), with kohya's pruning.
fn save_on_step(t: &Trainer<'_>, epoch: u64) -> Result<()> {
    let s = &t.plan.saving;
    let Some(n) = s.every_n_steps else { return Ok(()) };
    let step = t.state.global_step;
    if !step.is_multiple_of(n) {
        return Ok(());
    }
    let name = t.output.name.as_deref();
    let ext = t.output.ext();
    save_model_file(t, &t.output.path(&state::step_file_name(name, step, ext)), epoch)?;
    if let Some(old) = state::remove_step_no(step, n, s.last_n_steps) {
        state::remove_if_exists(&t.output.path(&state::step_file_name(name, old, ext)))?;
    }
    if s.save_state {
        save_state_dir(t, &t.output.path(&state::step_state_name(name, step)))?;
        let last_n = s.last_n_steps_state.or(s.last_n_steps);
        if let Some(old) = state::remove_state_step_no(step, n, last_n) {
            state::remove_if_exists(&t.output.path(&state::step_state_name(name, old)))?;
        }
    }
    Ok(())
}

/// Every n-th epoch but the last (the final save covers that one).
fn save_on_epoch_end(t: &Trainer<'_>, epoch: u64, n: u64) -> Result<()> {
    if !epoch.is_multiple_of(n) || epoch >= t.num_epochs {
        return Ok(());
    }
    let s = &t.plan.saving;
    let name = t.output.name.as_deref();
    let ext = t.output.ext();
    save_model_file(t, &t.output.path(&state::epoch_file_name(name, epoch, ext)), epoch)?;
    if let Some(old) = state::remove_epoch_no(epoch, n, s.last_n_epochs) {
        state::remove_if_exists(&t.output.path(&state::epoch_file_name(name, old, ext)))?;
    }
    if s.save_state {
        save_state_dir(t, &t.output.path(&state::epoch_state_name(name, epoch)))?;
        let last_n = s.last_n_epochs_state.or(s.last_n_epochs);
        if let Some(old) = state::remove_epoch_no(epoch, n, last_n) {
            state::remove_if_exists(&t.output.path(&state::epoch_state_name(name, old)))?;
        }
    }
    Ok(())
}

/// The final model (`{output_name}.{ext}`, or kohya's `last`) and, with
/// `--save_state_on_train_end`, the final state.
fn save_final(t: &Trainer<'_>, epoch: u64) -> Result<()> {
    save_model_file(t, &t.output.final_model_path(), epoch)?;
    if t.plan.saving.save_state_on_train_end {
        let name = t.output.name.as_deref();
        save_state_dir(t, &t.output.path(&state::last_state_name(name)))?;
    }
    Ok(())
}

/// Ctrl-C: the state of the step just finished, under kohya's step-state name.
pub(super) fn save_interrupted(t: &Trainer<'_>) -> Result<PathBuf> {
    let dir = t.output.path(&state::step_state_name(t.output.name.as_deref(), t.state.global_step));
    if !dir.is_dir() {
        save_state_dir(t, &dir)?;
    }
    Ok(dir)
}
