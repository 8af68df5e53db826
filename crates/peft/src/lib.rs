//! flywheel-peft: parameter-efficient fine-tuning on top of the runtime.
//!
//! - [`lora`]: the LoRA layer and the load-time hook that wraps a model's projections.
//! - [`adapter`]: adapters on disk in the Hugging Face PEFT layout, plus a provenance record.
//! - [`data`]: training data formats (chat, prompt/completion, alpaca, text) → token ids + loss mask.
//! - [`recipe`]: the TOML training recipe, with defaults and validation naming the bad key.
//! - [`train`]: the trainer (AdamW, schedules, accumulation, clipping, eval, checkpoints, resume).
//! - [`merge`]: folding an adapter into the base weights and writing a Hugging Face folder.
#![deny(missing_docs)]

pub mod adapter;
pub mod data;
pub mod lora;
pub mod merge;
pub mod plot;
pub mod recipe;
pub mod train;

pub use adapter::{Adapter, AdapterRecord};
pub use lora::{
    with_routing, LoraConfig, LoraHook, RoutedAdapter, Routing, TargetModules, TrainableAdapter,
};
pub use recipe::Recipe;
pub use train::{TrainEvent, TrainObserver, TrainSummary, Trainer};

use std::path::Path;

/// Errors of fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A recipe or adapter setting is missing or out of range.
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
    /// An adapter folder is incomplete or not LoRA.
    #[error("adapter {path}: {reason}")]
    Adapter {
        /// The adapter folder or file.
        path: String,
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
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
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
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes `v` as pretty JSON to `path` atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("serialisable value");
    atomic_write(path, text.as_bytes())
}

/// Moves the finished folder `tmp` to `dst`, replacing an older `dst`.
pub(crate) fn replace_dir(tmp: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        std::fs::remove_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    }
    std::fs::rename(tmp, dst).map_err(|e| Error::io(dst, e))
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}
