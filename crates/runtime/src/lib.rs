//! flywheel-runtime: everything between a model on disk and text out.
//!
//! - [`load`]: find a model (GGUF file, Hugging Face folder, hub id via hf-hub) and build it.
//! - [`tokenizer`]: tokenizer.json or one built from GGUF metadata; streaming detokenisation.
//! - [`chat`]: chat templates rendered with minijinja under Hugging Face semantics.
//! - [`constraint`]: grammar-constrained decoding (JSON schema, regex, Lark) with llguidance.
//! - [`sampler`]: temperature, top-k/top-p/min-p, repeat penalty, seeded.
//! - [`generate`]: the one generation loop (batched prefill, KV-cache decode, stop strings, sinks).
//! - [`engine`]: the continuous-batching engine thread (per-row adapters, prefix cache) that
//!   the server submits to.
//! - [`embed`]: sentence embeddings with a BERT-family encoder.
//! - [`threads`]: the CPU thread count (physical cores by default).
//! - [`bench`]: prefill/decode and embedding speed and peak memory (`flywheel bench`).
#![deny(missing_docs)]

pub mod bench;
pub mod chat;
pub mod constraint;
pub mod embed;
pub mod engine;
pub mod generate;
pub mod load;
pub mod manifest;
pub mod sampler;
pub mod stop;
pub mod testing;
pub mod threads;
pub mod tokenizer;

pub use candle_core::{DType, Device};
pub use constraint::Constraint;
pub use embed::EmbeddingModel;
pub use engine::{Engine, EngineConfig, EngineError};
pub use generate::TextModel;
pub use load::{parse_device, parse_dtype, LoadOptions, ModelFormat, ModelInfo};
pub use manifest::ModelDefaults;
pub use tokenizer::Tokenizer;

/// A panic's message (`panic` when it carries none).
pub(crate) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building or running the model failed.
    #[error(transparent)]
    Model(#[from] flywheel_models::Error),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The path does not exist.
    #[error("{path}: no such file or folder")]
    NotFound {
        /// The path as given.
        path: String,
    },
    /// A folder or file is not a model flywheel can load.
    #[error("{path}: {reason}")]
    NotAModel {
        /// The path as given.
        path: String,
        /// What is missing or ambiguous.
        reason: String,
    },
    /// Reading a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A JSON side file (tokenizer_config.json, generation_config.json…) is malformed.
    #[error("{file}: {reason}")]
    BadJson {
        /// The file.
        file: String,
        /// The parse error, with line and column.
        reason: String,
    },
    /// The tokenizer could not be built or used.
    #[error("tokenizer ({file}): {reason}")]
    Tokenizer {
        /// Where it came from.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// The chat template could not be compiled or rendered.
    #[error("chat template ({origin}): {reason}")]
    ChatTemplate {
        /// Where it came from, or "render".
        origin: String,
        /// The template engine's message.
        reason: String,
    },
    /// A chat was asked of a model that ships no chat template.
    #[error("{model}: the model has no chat template (tokenizer_config.json `chat_template` / GGUF `tokenizer.chat_template`); use a plain prompt")]
    NoChatTemplate {
        /// The model.
        model: String,
    },
    /// The prompt does not fit the context window.
    #[error("the prompt has {tokens} tokens, but the model's context is {context} tokens (and at least one must be generated)")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Context length.
        context: usize,
    },
    /// The prompt encodes to no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A grammar for constrained decoding does not compile.
    #[error("invalid {kind} grammar: {reason}")]
    Grammar {
        /// Which kind: `json_schema`, `json_object`, `regex` or `lark`.
        kind: &'static str,
        /// llguidance's reason.
        reason: String,
    },
    /// The grammar matcher failed while generating (an llguidance limit or internal error).
    #[error("constrained decoding ({kind} grammar) failed: {reason}")]
    Constraint {
        /// Which kind of grammar.
        kind: &'static str,
        /// llguidance's reason.
        reason: String,
    },
    /// A request field is out of range.
    #[error(transparent)]
    Invalid(#[from] flywheel_api::ApiError),
    /// Downloading from the hub failed.
    #[error("hub model `{id}`: {reason}")]
    Hub {
        /// The repository id.
        id: String,
        /// What failed.
        reason: String,
    },
    /// A model manifest's `[defaults]` is malformed.
    #[error("{file}: {reason}")]
    Manifest {
        /// The manifest.
        file: String,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// The device is not available in this build or on this machine.
    #[error("device `{device}`: {reason}")]
    Device {
        /// The device as asked for.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
