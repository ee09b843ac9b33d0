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

    /// The stream this state describes; the error says what is wrong with it (the caller names
    /// the file it came from).
    pub fn restore(&self) -> std::result::Result<ChaCha8Rng, String> {
        let bad = || format!("invalid RNG state {self:?}");
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

/// Writes a folder atomically: `fill` writes into a temporary sibling folder, whose files are then
/// fsynced and which is renamed to `dir` (an existing `dir` is replaced only after the new one is
/// complete). The same routine writes Diffusers model folders.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    sdbooth_checkpoint::atomic::atomic_write_dir(dir, fill, |path, e| TrainError::io(path, e))
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
        let w = tmp.join(WEIGHTS_FILE);
        candle_core::safetensors::save(weights, &w).map_err(|e| TrainError::state(&w, e.to_string()))?;
        // candle writes through a private (0600) temporary file; give the weights the mode every
        // other output gets (the umask's), that of state.json.
        let mode = std::fs::metadata(&p).map_err(|e| TrainError::io(&p, e))?.permissions();
        std::fs::set_permissions(&w, mode).map_err(|e| TrainError::io(&w, e))?;
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
    let w = dir.join(WEIGHTS_FILE);
    let weights = match std::fs::metadata(&w) {
        Err(e) => return Err(TrainError::io(&w, e)),
        Ok(_) => {
            candle_core::safetensors::load(&w, device).map_err(|e| TrainError::state(&w, e.to_string()))?
        }
    };
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

/// The process id in a temporary name left by an atomic write of one of `output_name`'s files or
/// folders: `.{inner}.tmp-{pid}`, `.{inner}.tmp-{pid}-{n}` or `.{inner}.old-{pid}`, where `inner`
/// is one of kohya's names for this output (`{name}`, `{name}.ext`, `{name}-step…`, `{name}-…`).
fn stale_temp_pid(file_name: &str, output_name: Option<&str>) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (inner, tail) = rest.rsplit_once(".tmp-").or_else(|| rest.rsplit_once(".old-"))?;
    let pid: u32 = tail.split('-').next()?.parse().ok()?;
    let prefixes: Vec<String> = match output_name {
        Some(n) => vec![n.to_string()],
        None => vec![DEFAULT_STEP_NAME.into(), DEFAULT_EPOCH_NAME.into(), DEFAULT_LAST_OUTPUT_NAME.into()],
    };
    let ours = prefixes.iter().any(|p| {
        inner == p || inner.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('-') || r.starts_with('.'))
    });
    ours.then_some(pid)
}

/// Whether process `pid` is running. Without /proc (not Linux) every process counts as live, so
/// nothing is removed.
fn process_is_live(pid: u32) -> bool {
    let proc = Path::new("/proc");
    pid == std::process::id() || !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Removes the temporary files and folders that atomic saves of this output name left behind
/// when their process was killed (or stopped by a second Ctrl-C), skipping those of a live
/// process. Returns what was removed.
pub fn clean_stale_temps(output_dir: &Path, output_name: Option<&str>) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(output_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(output_dir, e)),
    };
    let mut removed = Vec::new();
    for entry in rd {
        let path = entry.map_err(|e| TrainError::io(output_dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(pid) = stale_temp_pid(&name, output_name) else { continue };
        if process_is_live(pid) {
            continue;
        }
        remove_if_exists(&path)?;
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temps_of_this_output_and_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let dir = match dir {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        // Above the largest pid_max Linux allows (2^22), so never a live process.
        let dead = 4_194_305u32;
        let me = std::process::id();
        let made = [
            (format!(".m-step00000003-state.tmp-{dead}"), true, true),
            (format!(".m-step00000003-state.old-{dead}"), true, true),
            (format!(".m.safetensors.tmp-{dead}-4"), false, true),
            (format!(".m-step00000004-state.tmp-{me}"), true, false),
            (format!(".other-state.tmp-{dead}"), true, false),
            (format!(".mine.safetensors.tmp-{dead}-1"), false, false),
            ("m-step00000002-state".to_string(), true, false),
        ];
        for (name, is_dir, _) in &made {
            let p = dir.path().join(name);
            let r = if *is_dir { std::fs::create_dir(&p) } else { std::fs::write(&p, b"x") };
            assert!(r.is_ok(), "{name}");
        }
        let removed = clean_stale_temps(dir.path(), Some("m")).unwrap_or_default();
        for (name, _, gone) in &made {
            assert_eq!(!dir.path().join(name).exists(), *gone, "{name}");
        }
        assert_eq!(removed.len(), 3);
        assert_eq!(stale_temp_pid(&format!(".at-step00000001-state.tmp-{dead}"), None), Some(dead));
        assert_eq!(stale_temp_pid(&format!(".last.ckpt.tmp-{dead}-0"), None), Some(dead));
    }
}
