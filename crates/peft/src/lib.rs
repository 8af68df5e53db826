//! flywheel-peft: LoRA adapters, independent of how a model is loaded or trained.
//!
//! - [`config`]: which modules an adapter targets, its rank and scale (PEFT's `adapter_config.json`).
//! - [`lora`]: the LoRA layer, the per-row routing of a batch, and the load-time hook that wraps
//!   a model's projections.
//! - [`adapter`]: adapters on disk in the Hugging Face PEFT layout, plus a provenance record.
//! - [`merge`]: folding an adapter into the base weights.
//! - [`registry`]: named adapters loaded at run time, each version immutable once loaded.
//!
//! Training (data, recipes, the trainer) is `flywheel-train`, which builds on this crate.
#![deny(missing_docs)]

pub mod adapter;
pub mod config;
pub mod lora;
pub mod merge;
pub mod registry;

pub use adapter::{Adapter, AdapterRecord};
pub use config::{LoraConfig, TargetModules};
pub use lora::{with_routing, LoraHook, RoutedAdapter, Routing, TrainableAdapter};
pub use registry::{LoadedAdapter, Registry, RegistryError};

use std::path::Path;

/// Errors of LoRA adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An adapter setting is missing or out of range.
    #[error("config `{field}`: {reason}")]
    Config {
        /// The key, as `section.key`.
        field: String,
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
    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
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
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    flywheel_api::files::atomic_write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes `v` as pretty JSON to `path` atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("serialisable value");
    atomic_write(path, text.as_bytes())
}

/// SplitMix64 step: the seed stream of dropout masks and of the trainer's data order.
pub fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a hash, stable across runs and platforms (seeds and fingerprints derived from names).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
