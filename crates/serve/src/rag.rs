//! Retrieval for chat requests (`flywheel serve --rag kb.sqlite`): a request that carries a
//! `retrieval` object gets the passages most relevant to its last user message as numbered
//! context in a system message, and the response lists them as `sources`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use flywheel_api::ChatMessage;
use flywheel_rag::{DenseIndex, Filter, Mode, SearchOptions, Searcher, Store};
use flywheel_runtime::{EmbeddingModel, LoadOptions};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ServeError;

/// The `retrieval` object of a chat request (a flywheel extension; unknown keys are refused).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalRequest {
    /// Passages to retrieve (default 4).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// `dense`, `bm25` or `hybrid` (default).
    #[serde(default)]
    pub mode: Option<String>,
    /// Metadata filters such as `path=guides/*`.
    #[serde(default)]
    pub filter: Vec<String>,
    /// Passages below this cosine similarity to the question are left out (default 0.2).
    #[serde(default)]
    pub min_similarity: Option<f32>,
}

/// The chat-body part that asks for retrieval.
#[derive(Debug, Clone, Deserialize)]
pub struct RagBody {
    /// Present: retrieve context for this request.
    #[serde(default)]
    pub retrieval: Option<RetrievalRequest>,
}

/// The store a server retrieves from.
pub struct RagState {
    store: Mutex<Store>,
    dense: DenseIndex,
    embedder: Arc<EmbeddingModel>,
    path: String,
}

const INSTRUCTIONS: &str = "Answer using the numbered context passages below. Cite the passages you use with their numbers in brackets, like [1]. If they do not contain the answer, say that you don't know.";

impl RagState {
    /// Opens a store and its vectors; the embedder is the one given, or the store's own.
    pub fn open(
        path: &Path,
        embedder: Option<Arc<EmbeddingModel>>,
        load: &LoadOptions,
    ) -> Result<Self, ServeError> {
        let startup = |e: String| ServeError::Startup(format!("--rag {}: {e}", path.display()));
        let store = Store::open_existing(path).map_err(|e| startup(e.to_string()))?;
        let dense = DenseIndex::load(&store).map_err(|e| startup(e.to_string()))?;
        let embedder = match embedder {
            Some(e) => e,
            None => {
                let spec = store
                    .meta("embedder_path")
                    .map_err(|e| startup(e.to_string()))?
                    .ok_or_else(|| {
                        startup("the store names no embedding model; pass --embedding-model".into())
                    })?;
                Arc::new(
                    EmbeddingModel::load(&spec, load)
                        .map_err(|e| startup(format!("loading its embedding model {spec}: {e}")))?,
                )
            }
        };
        let probe = store.vectors().map_err(|e| startup(e.to_string()))?.dim;
        if probe != 0 && probe != embedder.info().hidden_size {
            return Err(startup(format!(
                "its vectors have {probe} dimensions but the embedding model makes {}",
                embedder.info().hidden_size
            )));
        }
        Ok(Self {
            store: Mutex::new(store),
            dense,
            embedder,
            path: path.display().to_string(),
        })
    }

    /// The store's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Retrieves passages for the last user message and puts them, numbered, into the system
    /// message; returns the `sources` list for the response.
    pub fn augment(
        &self,
        msgs: &mut Vec<ChatMessage>,
        req: &RetrievalRequest,
    ) -> Result<Value, ServeError> {
        let bad = |param: &str, message: String| ServeError::BadRequest {
            param: Some(param.into()),
            message: format!("{param}: {message}"),
        };
        let query = msgs
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .filter(|q| !q.trim().is_empty())
            .ok_or_else(|| {
                bad(
                    "messages",
                    "retrieval needs a non-empty user message".into(),
                )
            })?;
        let top_k = req.top_k.unwrap_or(4);
        if !(1..=20).contains(&top_k) {
            return Err(bad("retrieval.top_k", format!("{top_k} (must be 1 to 20)")));
        }
        let mode: Mode = req
            .mode
            .as_deref()
            .unwrap_or("hybrid")
            .parse()
            .map_err(|e: flywheel_rag::Error| bad("retrieval.mode", e.to_string()))?;
        let filter =
            Filter::parse(&req.filter).map_err(|e| bad("retrieval.filter", e.to_string()))?;
        let min_sim = req.min_similarity.unwrap_or(0.2);
        let store = self
            .store
            .lock()
            .map_err(|_| ServeError::Internal("the store lock was poisoned".into()))?;
        let searcher = Searcher::new(&store, &self.dense, &self.embedder);
        let opts = SearchOptions {
            mode,
            top_k,
            filter,
            ..SearchOptions::default()
        };
        let found = searcher
            .search(&query, &opts)
            .map_err(|e| ServeError::Internal(format!("retrieval: {e}")))?;
        let qv = if found.query_vector.is_empty() {
            searcher
                .embed_query(&query)
                .map_err(|e| ServeError::Internal(format!("retrieval: {e}")))?
        } else {
            found.query_vector.clone()
        };
        let hits: Vec<_> = found
            .hits
            .into_iter()
            .filter(|h| {
                searcher
                    .similarity(&qv, h.chunk_id)
                    .is_none_or(|s| s >= min_sim)
            })
            .collect();
        let mut context = String::new();
        let mut sources = Vec::new();
        for (i, h) in hits.iter().enumerate() {
            let head = flywheel_rag::answer::source_label(h);
            context.push_str(&format!("[{}] ({head})\n{}\n\n", i + 1, h.text.trim()));
            sources.push(json!({
                "index": i + 1, "chunk_id": h.chunk_id, "path": h.path, "heading": h.heading,
                "lines": [h.lines.0, h.lines.1], "score": h.score, "text": h.text,
            }));
        }
        let block = if hits.is_empty() {
            "No passage of the document store matches this question; say that you don't know."
                .to_string()
        } else {
            format!("{INSTRUCTIONS}\n\nContext:\n{}", context.trim_end())
        };
        match msgs.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{block}", m.content),
            _ => msgs.insert(0, ChatMessage::new("system", block)),
        }
        Ok(Value::Array(sources))
    }
}
