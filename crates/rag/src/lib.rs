//! flywheel-rag: give a model the knowledge it lacks, from the user's own documents, with sources.
//!
//! - [`extract`]: text, headings and paragraphs out of txt, Markdown and HTML.
//! - [`chunk`]: token windows of the embedding model that respect headings and paragraphs.
//! - [`store`]: the embedded SQLite store (documents, chunks, vectors, FTS5, HNSW graph).
//! - [`index`]: the incremental, transactional index run.
//! - [`search`]: dense / BM25 / hybrid search, filters, MMR, HyDE, decomposition, rerank.
//! - [`llm`]: the generator's retrieval jobs and the [`llm::Reranker`] trait.
//! - [`answer`]: cited answers with a relevance gate and an optional fact-check.
//! - [`eval`]: recall@k, MRR and nDCG per search mode.
//! - [`synthetic`]: synthetic stores for latency benchmarks.
//! - [`bench`]: the query-latency benchmark over them (`flywheel rag bench-latency`).
#![deny(missing_docs)]

pub mod answer;
pub mod bench;
pub mod chunk;
pub mod eval;
pub mod extract;
pub mod index;
pub mod llm;
pub mod metrics;
pub mod search;
pub mod store;
pub mod synthetic;

pub use answer::{ask, Answer, AskOptions};
pub use chunk::ChunkConfig;
pub use index::{index_folder, IndexOptions, IndexReport};
pub use llm::{Llm, Reranker};
pub use search::{DenseBackend, DenseIndex, Filter, Mode, SearchOptions, Searcher, StoreRetriever};
pub use store::Store;

/// Errors of the retrieval layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process is writing the same run folder or store.
    #[error(transparent)]
    Lock(#[from] flywheel_api::lock::LockError),
    /// The store could not be opened, read or written.
    #[error("store {path}: {reason}")]
    Store {
        /// The store file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A file or folder could not be read.
    #[error("{path}: {reason}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// A line of an input file is malformed.
    #[error("{file}, line {line}: {reason}")]
    BadInput {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An option has a value that cannot be used.
    #[error("--{option}: {reason}")]
    BadOption {
        /// The option's name.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// The embedding or generator model failed.
    #[error(transparent)]
    Runtime(#[from] flywheel_runtime::Error),
}

/// Result with this crate's error.
pub type Result<T> = std::result::Result<T, Error>;
