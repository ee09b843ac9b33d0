//! Model files and training states, named and pruned as kohya names and prunes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use sdbooth_checkpoint::{modelspec_metadata, save_model, ModelParts, ModelSpecArgs, SaveOptions};
use sdbooth_data::SamplerState;

use super::setup::{model_err, Model};
use super::{LossScale, Trainer};
use crate::error::{Result, TrainError};
use crate::logs::LossRecorder;
use crate::optim::Optimizer;
use crate::state::{self, RngState, TrainingState};

const UNET_PREFIX: &str = "unet.";
const TEXT_PREFIX: &str = "text_encoder.";

/// What `--resume` restores.
pub struct SavedState {
    pub optimizer: Optimizer,
    pub global_step: u64,
    pub noise_rng: ChaCha8Rng,
    pub vae_rng: ChaCha8Rng,
    pub sampler: SamplerState,
    pub recorder: LossRecorder,
    pub(super) loss_scale: Option<LossScale>,
}

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
                    vae: t.args.model.vae.as_ref().map(PathBuf::from),
                    dtype: None,
                },
            )
            .map_err(|e| TrainError::Config(format!("reloading the VAE to save: {e}")))?;
            vae_map = reloaded.vae;
            Some(&vae_map)
        }
    };
    let parts = ModelParts { unet: &unet, text_encoder: &text, vae };
    let a = &t.args.metadata;
    let spec_args = ModelSpecArgs {
        title: a.metadata_title.clone(),
        output_name: t.output.name.clone(),
        author: a.metadata_author.clone(),
        description: a.metadata_description.clone(),
        license: a.metadata_license.clone(),
        tags: a.metadata_tags.clone(),
        usage_hint: a.metadata_usage_hint.clone(),
        thumbnail: a.metadata_thumbnail.clone(),
        merged_from: a.metadata_merged_from.clone(),
        trigger_phrase: a.metadata_trigger_phrase.clone(),
        preprocessor: a.metadata_preprocessor.clone(),
        is_negative_embedding: a.metadata_is_negative_embedding.clone(),
        resolution: None,
        timesteps: None,
        clip_skip: t.args.model.clip_skip.map(|v| v as usize),
    };
    let mut metadata = modelspec_metadata(
        &t.model.config,
        t.model.v_parameterization,
        &spec_args,
        std::time::SystemTime::now(),
    );
    metadata.insert("sdbooth.global_step".into(), t.global_step.to_string());
    metadata.insert("sdbooth.epoch".into(), epoch.to_string());
    let mut opts = SaveOptions::new(t.output.format);
    opts.precision = t.args.saving.save_precision.map(|p| match p {
        crate::args::types::SavePrecision::Float => sdbooth_checkpoint::Precision::Float,
        crate::args::types::SavePrecision::Fp16 => sdbooth_checkpoint::Precision::Fp16,
        crate::args::types::SavePrecision::Bf16 => sdbooth_checkpoint::Precision::Bf16,
    });
    opts.source = Some(&t.model.loaded.source);
    opts.metadata = metadata;
    opts.epoch = epoch as i64;
    opts.global_step = t.global_step as i64;
    opts.v_parameterization = t.model.v_parameterization;
    save_model(path, &parts, &t.model.config, &opts)
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    eprintln!("saved {}", path.display());
    Ok(())
}

pub(super) fn save_state_dir(t: &Trainer<'_>, dir: &Path, epoch: u64) -> Result<()> {
    let mut st = TrainingState::new(t.global_step, epoch);
    st.rng_streams.insert("noise".into(), RngState::capture(&t.noise_rng));
    st.rng_streams.insert("vae".into(), RngState::capture(&t.vae_rng));
    st.data_order =
        serde_json::to_value(t.sampler.state()).map_err(|e| TrainError::state(dir, e.to_string()))?;
    st.loss_recorder = t.recorder.clone();
    st.extra = serde_json::json!({ "loss_scale": t.loss_scale });
    let mut weights = HashMap::new();
    for (k, v) in t.model.unet_params.iter() {
        weights.insert(format!("{UNET_PREFIX}{k}"), v.as_tensor().detach());
    }
    for (k, v) in t.model.text_params.iter() {
        weights.insert(format!("{TEXT_PREFIX}{k}"), v.as_tensor().detach());
    }
    state::save_state(dir, &st, &t.optimizer, &weights)?;
    eprintln!("saved state {}", dir.display());
    Ok(())
}

/// Reads a state folder and writes its weights into the model.
pub fn load_state(dir: &Path, model: &mut Model) -> Result<SavedState> {
    let (st, optimizer, weights) = state::load_state(dir, &candle_core::Device::Cpu)?;
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
        Ok(())
    };
    check(&model.unet_params, &unet, "U-Net")?;
    check(&model.text_params, &text, "text encoder")?;
    model.unet_params = sdbooth_models::ParamStore::from_tensors(unet).map_err(model_err)?;
    model.text_params = sdbooth_models::ParamStore::from_tensors(text).map_err(model_err)?;
    let rng = |name: &str| -> Result<ChaCha8Rng> {
        st.rng_streams
            .get(name)
            .ok_or_else(|| TrainError::state(dir, format!("no {name} RNG stream")))?
            .restore()
    };
    let sampler: SamplerState =
        serde_json::from_value(st.data_order.clone()).map_err(|e| TrainError::state(dir, e.to_string()))?;
    let loss_scale = st.extra.get("loss_scale").cloned().and_then(|v| serde_json::from_value(v).ok());
    Ok(SavedState {
        optimizer,
        global_step: st.global_step,
        noise_rng: rng("noise")?,
        vae_rng: rng("vae")?,
        sampler,
        recorder: st.loss_recorder.clone(),
        loss_scale,
    })
}

/// `--save_every_n_steps` (model and, with `--save_state`, state), with kohya's pruning.
pub(super) fn save_on_step(t: &mut Trainer<'_>, epoch: u64) -> Result<()> {
    let Some(n) = t.args.saving.save_every_n_steps.filter(|&n| n > 0) else { return Ok(()) };
    let step = t.global_step;
    if !step.is_multiple_of(n) {
        return Ok(());
    }
    let name = t.output.name.as_deref();
    let ext = t.output.ext();
    save_model_file(t, &t.output.path(&state::step_file_name(name, step, ext)), epoch)?;
    if let Some(old) = state::remove_step_no(step, n, t.args.saving.save_last_n_steps) {
        state::remove_if_exists(&t.output.path(&state::step_file_name(name, old, ext)))?;
    }
    if t.args.saving.save_state {
        save_state_dir(t, &t.output.path(&state::step_state_name(name, step)), epoch)?;
        let last_n = t.args.saving.save_last_n_steps_state.or(t.args.saving.save_last_n_steps);
        if let Some(old) = state::remove_state_step_no(step, n, last_n) {
            state::remove_if_exists(&t.output.path(&state::step_state_name(name, old)))?;
        }
    }
    Ok(())
}

/// `--save_every_n_epochs`: every n-th epoch but the last (the final save covers that one).
pub(super) fn save_on_epoch_end(t: &mut Trainer<'_>, epoch: u64) -> Result<()> {
    // kohya: --save_n_epoch_ratio r sets save_every_n_epochs to floor(epochs / r), at least 1.
    let from_ratio =
        t.args.saving.save_n_epoch_ratio.filter(|&r| r > 0).map(|r| (t.num_epochs / r as u64).max(1));
    let every = from_ratio.or(t.args.saving.save_every_n_epochs.map(u64::from));
    let Some(n) = every.filter(|&n| n > 0) else { return Ok(()) };
    if !epoch.is_multiple_of(n) || epoch >= t.num_epochs {
        return Ok(());
    }
    let name = t.output.name.as_deref();
    let ext = t.output.ext();
    save_model_file(t, &t.output.path(&state::epoch_file_name(name, epoch, ext)), epoch)?;
    let last_n = t.args.saving.save_last_n_epochs.map(u64::from);
    if let Some(old) = state::remove_epoch_no(epoch, n, last_n) {
        state::remove_if_exists(&t.output.path(&state::epoch_file_name(name, old, ext)))?;
    }
    if t.args.saving.save_state {
        save_state_dir(t, &t.output.path(&state::epoch_state_name(name, epoch)), epoch)?;
        let last_n =
            t.args.saving.save_last_n_epochs_state.or(t.args.saving.save_last_n_epochs).map(u64::from);
        if let Some(old) = state::remove_epoch_no(epoch, n, last_n) {
            state::remove_if_exists(&t.output.path(&state::epoch_state_name(name, old)))?;
        }
    }
    Ok(())
}

/// The final model (`{output_name}.{ext}`, or kohya's `last`) and, with
/// `--save_state_on_train_end`, the final state.
pub(super) fn save_final(t: &mut Trainer<'_>, epoch: u64) -> Result<PathBuf> {
    let name = t.output.name.as_deref();
    let path = t.output.path(&state::last_file_name(name, t.output.ext()));
    save_model_file(t, &path, epoch)?;
    if t.args.saving.save_state_on_train_end {
        save_state_dir(t, &t.output.path(&state::last_state_name(name)), epoch)?;
    }
    Ok(path)
}

/// Ctrl-C: the state of the step just finished, under kohya's step-state name.
pub(super) fn save_interrupted(t: &Trainer<'_>, epoch: u64) -> Result<PathBuf> {
    let dir = t.output.path(&state::step_state_name(t.output.name.as_deref(), t.global_step));
    if !dir.is_dir() {
        save_state_dir(t, &dir, epoch)?;
    }
    Ok(dir)
}
