//! flywheel-models: transformer building blocks written once, and the architectures built on them.
//!
//! - [`linear`]: the one `Linear` every projection goes through (dense f32/bf16/f16 or GGUF-quantized),
//!   and the [`Projection`] trait that LoRA (and other wrappers) implement around it.
//! - [`weights`]: where tensors come from (safetensors files, a GGUF file), under Hugging Face names.
//! - [`layers`]: RMSNorm, rotary embeddings (incl. llama3 scaling), GQA attention with a KV cache, MLP.
//! - [`decoder`]: the Llama-family / Qwen2 decoder driven by [`DecoderConfig`].
//! - [`bert`]: BERT-family sentence encoders with pooling.
//! - [`autograd`]: training through the model: fused ops with backward passes, frozen
//!   (quantized) weights, the low-rank update as one training node, the training switches.
//! - `cpu`, `qmatmul`, [`packed`]: CPU helpers shared by the layers, quantized matrices
//!   (dequantizing, the tiled prefill GEMM), and repacking weights for the decode kernels.
#![deny(missing_docs)]

pub mod autograd;
pub mod bert;
pub mod bert_packed;
mod cpu;
pub mod decoder;
pub mod layers;
pub mod linear;
pub mod packed;
mod qmatmul;
pub mod weights;

pub use candle_core::{quantized::GgmlDType, DType, Device, Tensor};
pub use decoder::{
    Architecture, Cache, DecodeScratch, DecoderConfig, DecoderModel, Logits, RopeScaling,
};
pub use linear::{
    pinned, with_reference_kernels, Embedding, KernelChoice, Linear, LinearHook, NoHook, Projection,
};
pub use weights::{GgufWeights, MemoryWeights, SafetensorsWeights, Weights};

/// Runs `f` on a thread of the global rayon pool when `device` is the CPU (directly otherwise,
/// or when already on a pool thread), and returns its result.
///
/// Called from outside the pool, every parallel section of a forward pass (a few per layer, and
/// every parallel candle op) hands its work to the pool and puts the caller to sleep until it is
/// done: two thread switches per section, a large share of a small model's decode step. Inside,
/// the caller's worker takes part in each section, and only `f` as a whole changes threads.
///
/// Thread-local settings do not follow `f` to the pool thread, so `f` runs in place inside
/// [`pinned`] and [`with_reference_kernels`] (LoRA routing pins its thread); a caller that
/// wants both sets them inside `f`.
pub fn on_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() || linear::is_pinned() {
        return f();
    }
    rayon::scope(|_| f())
}

/// The device tests run on, from `FLYWHEEL_TEST_DEVICE`: `cpu` (the default), `cuda`, `cuda:N`
/// or `metal`.
///
/// A device this build cannot open panics instead of falling back to the CPU, so a test run
/// meant for a GPU never passes on the CPU unnoticed.
#[doc(hidden)]
pub fn test_device() -> Device {
    let name = std::env::var("FLYWHEEL_TEST_DEVICE").unwrap_or_default();
    let opened = match name.as_str() {
        "" | "cpu" => return Device::Cpu,
        "cuda" => Device::new_cuda(0),
        "metal" => Device::new_metal(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n),
            _ => panic!("FLYWHEEL_TEST_DEVICE={s}: expected cpu, cuda, cuda:N or metal"),
        },
    };
    opened.unwrap_or_else(|e| panic!("FLYWHEEL_TEST_DEVICE={name}: cannot open the device: {e}"))
}

/// Errors of model construction and execution.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor the architecture needs is not in the weight files.
    #[error("missing tensor `{name}` in {file}")]
    MissingTensor {
        /// The tensor's name in the file.
        name: String,
        /// The file (or files) searched.
        file: String,
    },
    /// A tensor exists but has the wrong shape for the config.
    #[error("tensor `{name}` in {file} has shape {got:?}, but the config needs {want:?}")]
    ShapeMismatch {
        /// The tensor's name in the file.
        name: String,
        /// The file holding it.
        file: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape the config implies.
        want: Vec<usize>,
    },
    /// A config value is missing or out of range.
    #[error("{file}: config field `{field}`: {reason}")]
    Config {
        /// The config file (config.json or the GGUF file).
        file: String,
        /// The key, as written in the file.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The architecture named in the file is not one flywheel implements.
    #[error("{file}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        /// The file naming it.
        file: String,
        /// The architecture as written.
        arch: String,
        /// The ones flywheel implements.
        supported: &'static str,
    },
    /// The weight file could not be read or is corrupt.
    #[error("{file}: {reason}")]
    BadFile {
        /// The file.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
