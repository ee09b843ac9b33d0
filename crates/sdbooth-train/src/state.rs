//! Training-state folders (`--save_state`, `--resume`) and kohya's file naming and pruning rules.
//!
//! A state folder holds `state.json` (the whole [`RunState`]: step, data order, random streams,
//! loss recorder, loss scale), `weights.safetensors` (the trained parameters) and
//! `optimizer.safetensors`. It is
//! written into a temporary sibling folder, every file fsynced, then renamed into place, so a run
//! killed during a save leaves the previous state loadable; `find_latest_state` ignores the
//! leftovers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sdbooth_data::{Sampler, Streams};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::logs::LossRecorder;
use crate::optim::Optimizer;
use crate::update::LossScale;

pub const DEFAULT_EPOCH_NAME: &str = "epoch";
pub const DEFAULT_STEP_NAME: &str = "at";
pub const DEFAULT_LAST_OUTPUT_NAME: &str = "last";

pub const STATE_JSON: &str = "state.json";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The `format` of `state.json`. 2: the whole [`RunState`] (1, before it: named fields of a loose
/// map).
const FORMAT: &str = "sdbooth-state/2";

/// `{name}-{epoch:06}` + ext (ext with its dot, e.g. ".safetensors"); name defaults to "epoch".
pub fn epoch_file_name(output_name: Option<&str>, epoch: u64, ext: &str) -> String {
    format!("{}-{epoch:06}{ext}", output_name.unwrap_or(DEFAULT_EPOCH_NAME))
}
/// `{name}-step{step:08}` + ext; name defaults to "at".
pub fn step_file_name(output_name: Option<&str>, step: u64, ext: &str) -> String {
    format!("{}-step{step:08}{ext}", output_name.unwrap_or(DEFAULT_STEP_NAME))
}
/// `{name}` + ext; name defaults to "last".
pub fn last_file_name(output_name: Option<&str>, ext: &str) -> String {
    format!("{}{ext}", output_name.unwrap_or(DEFAULT_LAST_OUTPUT_NAME))
}
/// `{name}-{epoch:06}-state`; name defaults to "epoch".
pub fn epoch_state_name(output_name: Option<&str>, epoch: u64) -> String {
    format!("{}-{epoch:06}-state", output_name.unwrap_or(DEFAULT_EPOCH_NAME))
}
/// `{name}-step{step:08}-state`; name defaults to "at".
pub fn step_state_name(output_name: Option<&str>, step: u64) -> String {
    format!("{}-step{step:08}-state", output_name.unwrap_or(DEFAULT_STEP_NAME))
}
/// `{name}-state`; name defaults to "last".
pub fn last_state_name(output_name: Option<&str>) -> String {
    format!("{}-state", output_name.unwrap_or(DEFAULT_LAST_OUTPUT_NAME))
}

/// kohya's get_remove_epoch_no: the epoch file to delete after saving epoch `epoch`.
pub fn remove_epoch_no(epoch: u64, save_every_n_epochs: u64, save_last_n_epochs: Option<u64>) -> Option<u64> {
    let n = save_last_n_epochs?;
    let r = epoch as i64 - (save_every_n_epochs * n) as i64;
    (r >= 0).then_some(r as u64)
}

/// kohya's get_remove_step_no: the step file to delete after saving step `step` (the newest
/// `save_last_n_steps` steps' worth of files are kept).
pub fn remove_step_no(step: u64, save_every_n_steps: u64, save_last_n_steps: Option<u64>) -> Option<u64> {
    let n = save_last_n_steps?;
    if save_every_n_steps == 0 {
        return None;
    }
    let r = step as i64 - n as i64 - 1;
    // Python's % is non-negative for a positive divisor.
    let r = r - r.rem_euclid(save_every_n_steps as i64);
    (r >= 0).then_some(r as u64)
}

/// The state-folder variant (save_and_remove_state_stepwise): kohya removes only when the number
/// is > 0.
pub fn remove_state_step_no(step: u64, save_every_n_steps: u64, last_n_steps: Option<u64>) -> Option<u64> {
    remove_step_no(step, save_every_n_steps, last_n_steps).filter(|&r| r > 0)
}

/// A ChaCha8 stream's position, enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    pub stream: u64,
    /// The word position (u128, as a decimal string: JSON numbers lose precision past 2^53).
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        RngState {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        let bad = || TrainError::Config(format!("invalid RNG state {self:?}"));
        if self.seed.len() != 64 {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse::<u128>().map_err(|_| bad())?);
        Ok(rng)
    }
}

/// (De)serializes a ChaCha8 stream as its [`RngState`].
mod rng_serde {
    use rand_chacha::ChaCha8Rng;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RngState;

    pub fn serialize<S: Serializer>(rng: &ChaCha8Rng, s: S) -> Result<S::Ok, S::Error> {
        RngState::capture(rng).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ChaCha8Rng, D::Error> {
        RngState::deserialize(d)?.restore().map_err(serde::de::Error::custom)
    }
}

/// Everything but tensors that a run continues from. The trainer keeps its progress in this one
/// struct and it is saved and loaded whole, so a resumed run cannot miss a field.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done.
    pub global_step: u64,
    /// Where the data order is (epoch, next batch); the order itself is rebuilt from the seed.
    pub sampler: Sampler,
    /// Noise and timesteps ([`Streams::noise`]), consumed step by step.
    #[serde(with = "rng_serde")]
    pub noise_rng: ChaCha8Rng,
    /// VAE sampling of latents that are not cached ([`Streams::vae_sampling`]).
    #[serde(with = "rng_serde")]
    pub vae_rng: ChaCha8Rng,
    pub loss_recorder: LossRecorder,
    /// fp16's dynamic loss scale (`None` without fp16).
    pub loss_scale: Option<LossScale>,
}

impl RunState {
    /// The state of a run that has not started.
    pub fn start(streams: Streams, sampler: Sampler, loss_scale: Option<LossScale>) -> Self {
        RunState {
            global_step: 0,
            sampler,
            noise_rng: streams.noise(),
            vae_rng: streams.vae_sampling(),
            loss_recorder: LossRecorder::default(),
            loss_scale,
        }
    }
}

/// `state.json`: the run state under its format tag.
#[derive(Serialize)]
struct StateJsonRef<'a> {
    format: &'a str,
    #[serde(flatten)]
    run: &'a RunState,
}

fn fsync_path(p: &Path) -> Result<()> {
    std::fs::File::open(p).and_then(|f| f.sync_all()).map_err(|e| TrainError::io(p, e))
}

/// Writes a folder atomically: `fill` writes into a temporary sibling folder, whose files are then
/// fsynced and which is renamed to `dir` (an existing `dir` is replaced only after the new one is
/// complete).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .ok_or_else(|| TrainError::Config(format!("{}: not a folder name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    fill(&tmp)?;
    for entry in std::fs::read_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))? {
        let p = entry.map_err(|e| TrainError::io(&tmp, e))?.path();
        if p.is_file() {
            fsync_path(&p)?;
        }
    }
    fsync_path(&tmp)?;
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let replaced = dir.exists();
    if replaced {
        std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    fsync_path(parent)?;
    if replaced {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(())
}

/// Saves a complete training state folder.
pub fn save_state(
    dir: &Path,
    state: &RunState,
    optimizer: &Optimizer,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    write_dir_atomic(dir, |tmp| {
        let file = StateJsonRef { format: FORMAT, run: state };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| TrainError::state(tmp, e.to_string()))?;
        let p = tmp.join(STATE_JSON);
        std::fs::write(&p, json).map_err(|e| TrainError::io(&p, e))?;
        candle_core::safetensors::save(weights, tmp.join(WEIGHTS_FILE))?;
        optimizer.save(&tmp.join(OPTIMIZER_FILE))
    })
}

/// Reads `state.json` of a state folder.
pub fn read_state_json(dir: &Path) -> Result<RunState> {
    let p = dir.join(STATE_JSON);
    let bytes = std::fs::read(&p).map_err(|e| TrainError::io(&p, e))?;
    // The format tag first, so a state of another version is named as such.
    #[derive(Deserialize)]
    struct Format {
        format: String,
    }
    let format: Format = serde_json::from_slice(&bytes).map_err(|e| TrainError::state(&p, e.to_string()))?;
    if format.format != FORMAT {
        return Err(TrainError::state(
            &p,
            format!(
                "format {:?}, this sdbooth reads {FORMAT:?} (a state written by another version)",
                format.format
            ),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| TrainError::state(&p, e.to_string()))
}

/// Loads a state folder written by `save_state`; weights land on `device`.
pub fn load_state(dir: &Path, device: &Device) -> Result<(RunState, Optimizer, HashMap<String, Tensor>)> {
    let st = read_state_json(dir)?;
    let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), device)?;
    let opt = Optimizer::load(&dir.join(OPTIMIZER_FILE))?;
    Ok((st, opt, weights))
}

/// `--resume auto`: the complete state folder (`*-state` with a readable state.json) in
/// `output_dir` with the highest global step; ties go to the most recently modified.
pub fn find_latest_state(output_dir: &Path) -> Result<Option<PathBuf>> {
    let rd = match std::fs::read_dir(output_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::io(output_dir, e)),
    };
    let mut best: Option<(u64, std::time::SystemTime, PathBuf)> = None;
    for entry in rd {
        let p = entry.map_err(|e| TrainError::io(output_dir, e))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !p.is_dir() || name.starts_with('.') || !name.ends_with("-state") {
            continue;
        }
        let Ok(st) = read_state_json(&p) else { continue };
        let mtime = std::fs::metadata(p.join(STATE_JSON))
            .and_then(|m| m.modified())
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        let key = (st.global_step, mtime);
        let newer = match &best {
            None => true,
            Some(b) => key > (b.0, b.1),
        };
        if newer {
            best = Some((key.0, key.1, p));
        }
    }
    Ok(best.map(|b| b.2))
}

/// Removes a saved model file or state folder if it exists (save_last_n_* pruning).
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    let r = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(TrainError::io(path, e)),
    }
}
