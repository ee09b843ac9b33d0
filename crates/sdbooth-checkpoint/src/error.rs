//! Typed errors: every variant names the file (and the key where one is involved), because a user
//! holding a broken 4 GB checkpoint needs to know which file and which tensor is at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid .safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("{path}: not a valid PyTorch checkpoint: {reason}")]
    BadCkpt { path: PathBuf, reason: String },
    #[error(
        "{path}: refused to load: the pickle asks for `{global}`, which is not one of the tensor-rebuild \
         functions a model checkpoint needs (a pickle can run arbitrary code; sdbooth never runs it). \
         Convert the file with a trusted tool or use a .safetensors file"
    )]
    UnsafePickle { path: PathBuf, global: String },
    #[error("{path}: tensor `{key}`: {reason}")]
    BadTensor { path: PathBuf, key: String, reason: String },
    #[error("{path}: does not look like a Stable Diffusion 1.x/2.x model: {reason}")]
    NotAModel { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    #[error("{path}: missing tensors for this architecture: {}", .keys.join(", "))]
    MissingKeys { path: PathBuf, keys: Vec<String> },
    #[error("{path}: bad config: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("model `{spec}` not found: {reason}")]
    NotFound { spec: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// Shorthand for wrapping an I/O error with the path it concerns.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.into();
    move |source| CheckpointError::Io { path, source }
}

/// Placeholder path of I/O errors raised inside [`crate::atomic_write`] (temp file create, fsync,
/// rename) before [`CheckpointError::at`] names the real file.
const UNNAMED: &str = "(output)";

impl From<std::io::Error> for CheckpointError {
    fn from(source: std::io::Error) -> Self {
        CheckpointError::Io { path: UNNAMED.into(), source }
    }
}

impl CheckpointError {
    /// Names `path` in an I/O error that did not know its file.
    pub(crate) fn at(self, path: &std::path::Path) -> Self {
        match self {
            CheckpointError::Io { path: p, source } if p.as_os_str() == UNNAMED => {
                CheckpointError::Io { path: path.into(), source }
            }
            e => e,
        }
    }
}
