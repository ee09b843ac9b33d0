//! Typed errors of training: each says what went wrong in the user's terms and names the file,
//! flag or step concerned. `Config` is for option values and combinations only.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid --optimizer_args entry {arg:?}: {reason}")]
    OptimizerArg { arg: String, reason: String },
    #[error("unknown optimizer type {0:?} (known: AdamW, AdamW8bit, Lion, SGDNesterov, Adafactor)")]
    UnknownOptimizer(String),
    #[error(
        "unknown LR scheduler {0:?} (known: constant, constant_with_warmup, linear, cosine, \
         cosine_with_restarts, polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, adafactor)"
    )]
    UnknownScheduler(String),
    /// An option value or a combination of options this build cannot run.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Flags this build refuses (one message per flag).
    #[error("{}", .0.join("\n"))]
    Refused(Vec<String>),
    #[error(transparent)]
    Flags(#[from] crate::args::ArgsError),
    #[error("model: {0}")]
    Model(#[from] sdbooth_models::ModelError),
    // The larger error types are boxed to keep `Result<T, TrainError>` small.
    #[error(transparent)]
    Data(Box<sdbooth_data::DataError>),
    /// A model file or folder that cannot be read or written (the message names it).
    #[error(transparent)]
    Checkpoint(Box<sdbooth_checkpoint::CheckpointError>),
    #[error("loading the model {spec}: {source}")]
    LoadModel { spec: String, source: Box<sdbooth_checkpoint::CheckpointError> },
    #[error("saving {path}: {source}")]
    SaveModel { path: PathBuf, source: Box<sdbooth_checkpoint::CheckpointError> },
    #[error("caption {caption:?}: {source}")]
    Caption { caption: String, source: Box<sdbooth_data::tokenizer::TokenizerError> },
    #[error("sample image {index}: {source}")]
    Sample { index: usize, source: Box<sdbooth_sample::generate::GenerateError> },
    #[error("parameter {name}: {reason}")]
    Param { name: String, reason: String },
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    /// A saved optimizer buffer that does not fit its parameter: the optimizer state given to
    /// `--resume` was damaged or written for another model.
    #[error(
        "optimizer state of {param}: buffer {buffer}: {reason} (the --resume state's optimizer file \
         does not fit this model and optimizer)"
    )]
    OptimizerState { param: String, buffer: String, reason: String },
    /// `--device` names a device this build or machine cannot use.
    #[error("--device {choice}: {reason}")]
    Device { choice: String, reason: String },
    /// `--sample_prompts` cannot be read or asks for a size too large (the message names the file).
    #[error("--sample_prompts: {0}")]
    SamplePrompts(String),
    /// Ctrl-C: the step in flight finished and its state was saved.
    #[error(
        "interrupted after step {step}; the state is saved in {} (continue with --resume {})",
        state.display(),
        state.display()
    )]
    Interrupted { step: u64, state: PathBuf },
    /// An error after steps were trained in this process: their state was saved first, so the
    /// run can continue from it.
    #[error(
        "{source}\nthe run is saved at step {step} as a state in {} (continue with --resume {})",
        state.display(),
        state.display()
    )]
    SavedAfterError { step: u64, state: PathBuf, source: Box<TrainError> },
    /// A NaN or infinite loss: nothing is saved over the last good files.
    #[error(
        "the loss became {loss} at step {step}; stopped without saving (the last saved model and state in \
         {} are intact)",
        output_dir.display()
    )]
    NonFiniteLoss { loss: f64, step: u64, output_dir: PathBuf },
    /// A broken invariant of sdbooth itself, not of the user's input.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl From<sdbooth_data::DataError> for TrainError {
    fn from(e: sdbooth_data::DataError) -> Self {
        TrainError::Data(Box::new(e))
    }
}

impl From<sdbooth_checkpoint::CheckpointError> for TrainError {
    fn from(e: sdbooth_checkpoint::CheckpointError) -> Self {
        TrainError::Checkpoint(Box::new(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io { path: path.into(), source }
    }
    pub(crate) fn param(name: &str, reason: impl Into<String>) -> Self {
        TrainError::Param { name: name.to_string(), reason: reason.into() }
    }
    pub(crate) fn state(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        TrainError::State { path: path.into(), reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_errors_say_what_happened_and_where() {
        let e = TrainError::Interrupted { step: 7, state: PathBuf::from("out/at-step00000007-state") };
        let msg = e.to_string();
        assert!(msg.starts_with("interrupted after step 7"), "{msg}");
        assert!(msg.contains("--resume out/at-step00000007-state"), "{msg}");
        let e = TrainError::NonFiniteLoss { loss: f64::NAN, step: 3, output_dir: PathBuf::from("out") };
        let msg = e.to_string();
        assert!(msg.contains("NaN at step 3") && msg.contains("in out are intact"), "{msg}");
        let e = TrainError::from(sdbooth_models::ModelError::BadInput("latents must be 4-D".into()));
        assert_eq!(e.to_string(), "model: bad input: latents must be 4-D");
        let e = TrainError::io("out/model.safetensors", std::io::Error::other("disk full"));
        assert_eq!(e.to_string(), "out/model.safetensors: disk full");
    }
}
