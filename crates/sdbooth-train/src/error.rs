//! Typed errors of the training building blocks.

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
    #[error("unknown LR scheduler {0:?}")]
    UnknownScheduler(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("parameter {name}: {reason}")]
    Param { name: String, reason: String },
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

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
