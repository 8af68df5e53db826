//! flywheel-train: LoRA fine-tuning on top of the runtime and the adapters of `flywheel-peft`.
//!
//! - [`data`]: training data formats (chat, prompt/completion, alpaca, text) → token ids + loss mask.
//! - [`recipe`]: the TOML training recipe, with defaults and validation naming the bad key.
//! - [`train`]: the trainer (AdamW, schedules, accumulation, clipping, eval, checkpoints, resume).
//! - [`plot`]: the loss curve as SVG.
//! - [`merge`]: an adapter folded into its base model, written as a Hugging Face folder.
#![deny(missing_docs)]

pub mod data;
pub mod merge;
pub mod plot;
pub mod recipe;
pub mod train;

pub use recipe::Recipe;
pub use train::{TrainEvent, TrainObserver, TrainSummary, Trainer};

use std::path::Path;

/// Errors of fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process is writing the same run folder or store.
    #[error(transparent)]
    Lock(#[from] flywheel_api::lock::LockError),
    /// A recipe setting (or a merge argument) is missing or out of range.
    #[error("config `{field}`: {reason}")]
    Config {
        /// The key, as `section.key`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The recipe file could not be parsed.
    #[error("{path}: {reason}")]
    Recipe {
        /// The recipe file.
        path: String,
        /// The parser's message (names the key and line).
        reason: String,
    },
    /// A line of a data file is malformed.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The data file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint cannot be resumed.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Training diverged.
    #[error("loss became {value} at step {step}; stopping (last checkpoint kept). Lower the learning rate or check the data")]
    NonFinite {
        /// The optimizer step.
        step: usize,
        /// The offending value.
        value: f64,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// An adapter error (its config, files or shapes).
    #[error(transparent)]
    Peft(#[from] flywheel_peft::Error),
    /// The runtime failed (loading, tokenizing, templates).
    #[error(transparent)]
    Runtime(#[from] flywheel_runtime::Error),
    /// A model error.
    #[error(transparent)]
    Model(#[from] flywheel_models::Error),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            error: source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes `bytes` to `path` atomically (see [`flywheel_api::files::atomic_write`]).
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    flywheel_api::files::atomic_write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes `v` as pretty JSON to `path` atomically.
pub(crate) fn write_json_atomic<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("serialisable value");
    atomic_write(path, text.as_bytes())
}

/// Hex sha256 of a file.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    flywheel_api::files::sha256_file(path).map_err(|e| Error::io(path, e))
}

/// Moves the finished folder `tmp` to `dst`, replacing an older `dst`.
pub(crate) fn replace_dir(tmp: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    }
    std::fs::rename(tmp, dst).map_err(|e| Error::io(dst, e))
}
