//! flywheel-eval: measure every optimization step on the same task, locally.
//!
//! - [`spec`]: the eval spec (TOML): dataset, model, and the configurations (rungs) compared.
//! - [`data`]: the dataset and the few-shot example store.
//! - [`metrics`]: exact match, token F1, ROUGE-L, JSON validity, SQL execution accuracy,
//!   retrieval recall/MRR, context precision, verdict parsing, bootstrap intervals.
//! - [`judge`]: local-judge RAG metrics (faithfulness, answer relevancy, context precision and
//!   recall) with verdicts constrained to yes/no.
//! - [`runner`]: runs every rung over the dataset, appending to a results file it resumes from.
//! - [`records`]: what a run folder holds (results and timings records, file names, state,
//!   hashes), shared by the runner and the reports.
//! - [`report`]: markdown and HTML reports, the ladder chart, and run comparison.
//! - [`sql`]: text-to-SQL pieces: the schema read from a database for `{{ schema }}`.
#![deny(missing_docs)]

pub mod chart;
pub mod data;
pub mod judge;
pub mod metrics;
pub mod records;
pub mod report;
pub mod runner;
pub mod spec;
pub mod sql;

pub use records::ResultRecord;
pub use report::{compare, write_reports, RungSummary};
pub use runner::{run, Observer, RunOptions, RunOutcome};
pub use spec::{EvalSpec, Task};

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process is writing the same run folder or store.
    #[error(transparent)]
    Lock(#[from] flywheel_api::lock::LockError),
    /// A file or folder could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The spec file could not be parsed (the message names the key and line).
    #[error("{path}: {reason}")]
    Spec {
        /// The spec file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// A spec value is out of range.
    #[error("spec `{field}`: {reason}")]
    Config {
        /// The key, as `section.key` or `rungs[i].key`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A line of a data or results file is malformed.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The file.
        path: String,
        /// 1-based line (0: the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// An earlier run in the output folder cannot be resumed.
    #[error("{0}")]
    Resume(String),
    /// A prompt template failed to render.
    #[error("template of rung `{rung}`: {reason}")]
    Template {
        /// The rung.
        rung: String,
        /// The template engine's message.
        reason: String,
    },
    /// The model runtime failed.
    #[error(transparent)]
    Runtime(#[from] flywheel_runtime::Error),
    /// Retrieval failed.
    #[error(transparent)]
    Rag(#[from] flywheel_rag::Error),
    /// An adapter could not be loaded or applied.
    #[error(transparent)]
    Peft(#[from] flywheel_peft::Error),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn atomic_write(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    flywheel_peft::atomic_write(path, bytes).map_err(|e| Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn io_err(path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}
