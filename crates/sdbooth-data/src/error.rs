//! Typed errors of the data path. Every variant that comes from a user file names the file, and
//! where it has one, the line and the key, so the binary can print it as is.

use std::fmt;
use std::path::PathBuf;

/// One problem with one file or folder of the dataset, found by the upfront check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadFile {
    pub path: PathBuf,
    pub cause: String,
}

/// All problems the upfront check found, reported together.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct BadFiles(pub Vec<BadFile>);

impl fmt::Display for BadFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} problem(s) in the dataset (use --skip_bad_images to train without them):",
            self.0.len()
        )?;
        for b in &self.0 {
            writeln!(f, "  {}: {}", b.path.display(), b.cause)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}:{line}:{column}: TOML syntax error: {message}", path.display())]
    ConfigSyntax { path: PathBuf, line: usize, column: usize, message: String },

    #[error("{}:{line}: unknown key `{key}` in {table}{}", path.display(), did_you_mean(suggestion))]
    ConfigUnknownKey { path: PathBuf, line: usize, key: String, table: String, suggestion: Option<String> },

    #[error("{}:{line}: key `{key}` must be {expected}, found {found}", path.display())]
    ConfigType { path: PathBuf, line: usize, key: String, expected: String, found: String },

    #[error("{}:{line}: {table} is missing the required key `{key}`", path.display())]
    ConfigMissingKey { path: PathBuf, line: usize, key: String, table: String },

    #[error("{}:{line}: key `{key}`: {message}", path.display())]
    ConfigValue { path: PathBuf, line: usize, key: String, message: String },

    /// A value from the command line (or a resolved dataset value) that kohya would refuse.
    #[error("{key}: {message}")]
    InvalidOption { key: String, message: String },

    #[error("{what} is not supported yet")]
    Unsupported { what: String },

    #[error("{0}")]
    BadFiles(BadFiles),

    #[error("no images found: {detail}")]
    EmptyDataset { detail: String },

    #[error("caption file {}: {message}", path.display())]
    Caption { path: PathBuf, message: String },

    #[error("cannot load image {}: {message}", path.display())]
    ImageLoad { path: PathBuf, message: String },

    #[error("{0}")]
    Sampler(String),
}

fn did_you_mean(s: &Option<String>) -> String {
    match s {
        Some(k) => format!(" (did you mean `{k}`?)"),
        None => String::new(),
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
