//! flywheel-serve: an OpenAI-compatible HTTP server over the flywheel runtime.
//!
//! - [`router`]: the HTTP endpoints (chat, completions, embeddings, models, adapters, health,
//!   metrics), authentication and limits; handlers never run tensor code.
//! - [`openai`]: the wire format; [`fields`]: which request fields are implemented, accepted or
//!   refused.
//!
//! Generation runs on `flywheel_runtime::engine` (continuous batching, per-row adapters); the
//! adapters come from `flywheel_peft::Registry`.
//! - [`metrics`]: Prometheus text metrics.
//! - [`rag`]: retrieval from a `flywheel rag` store for chat requests (`--rag`).
#![deny(missing_docs)]

pub mod fields;
pub mod metrics;
pub mod openai;
pub mod rag;
pub mod router;
pub mod tools;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flywheel_peft::{LoraHook, Registry, RegistryError};
use flywheel_runtime::{EmbeddingModel, LoadOptions, ModelFormat, TextModel};

pub use flywheel_runtime::engine::{Engine, EngineConfig};
pub use router::{router, AppState};

/// Errors of the server, each with its HTTP status and OpenAI error body.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is malformed or out of range (400), naming the field when there is one.
    #[error("{message}")]
    BadRequest {
        /// The offending field.
        param: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The model or adapter does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// No endpoint has this path (404).
    #[error("{0}")]
    NoRoute(String),
    /// The endpoint exists but not for this method (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// An adapter could not be loaded (400 at run time; a startup error on the command line).
    #[error("adapter `{name}` refused: {reason}")]
    AdapterRefused {
        /// The name it was to be served under.
        name: String,
        /// Why.
        reason: String,
    },
    /// Not allowed (403), e.g. a path outside the adapters directory.
    #[error("{0}")]
    Forbidden(String),
    /// Missing or wrong API key (401).
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The queue is full (429, with `Retry-After`).
    #[error("the server is busy ({0} requests waiting); retry shortly")]
    Busy(usize),
    /// The body is larger than the limit (413).
    #[error("the request body exceeds the limit of {0} bytes")]
    TooLarge(usize),
    /// Something failed inside the server (500); the server keeps running.
    #[error("{0}")]
    Internal(String),
    /// The server could not start.
    #[error("{0}")]
    Startup(String),
}

impl ServeError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest { .. } | ServeError::AdapterRefused { .. } => {
                StatusCode::BAD_REQUEST
            }
            ServeError::NotFound(_) | ServeError::NoRoute(_) => StatusCode::NOT_FOUND,
            ServeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServeError::Unauthorized => StatusCode::UNAUTHORIZED,
            ServeError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ServeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::Internal(_) | ServeError::Startup(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ServeError::BadRequest { .. } => ("invalid_request_error", None),
            ServeError::AdapterRefused { .. } => ("invalid_request_error", Some("adapter_refused")),
            ServeError::NotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ServeError::NoRoute(_) => ("invalid_request_error", Some("not_found")),
            ServeError::MethodNotAllowed(_) => {
                ("invalid_request_error", Some("method_not_allowed"))
            }
            ServeError::Forbidden(_) => ("permission_error", None),
            ServeError::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ServeError::Busy(_) => ("rate_limit_error", Some("queue_full")),
            ServeError::TooLarge(_) => ("invalid_request_error", Some("body_too_large")),
            ServeError::Internal(_) | ServeError::Startup(_) => ("server_error", None),
        }
    }
}

impl From<RegistryError> for ServeError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        let bad = |param: &str| ServeError::BadRequest {
            param: Some(param.into()),
            message: message.clone(),
        };
        match e {
            RegistryError::AdaptersDir { .. } => ServeError::Startup(message),
            RegistryError::RuntimeLoadsOff | RegistryError::OutsideDir { .. } => {
                ServeError::Forbidden(message)
            }
            RegistryError::NoSuchFolder { .. } | RegistryError::NotAFolder { .. } => bad("path"),
            RegistryError::BadName { .. } => bad("name"),
            RegistryError::Refused { name, reason } => ServeError::AdapterRefused { name, reason },
        }
    }
}

impl From<flywheel_runtime::EngineError> for ServeError {
    fn from(e: flywheel_runtime::EngineError) -> Self {
        use flywheel_runtime::EngineError;
        match e {
            EngineError::PromptLength { .. }
            | EngineError::Model(_)
            | EngineError::Panic { .. } => ServeError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let (kind, code) = self.kind_and_code();
        let param = match &self {
            ServeError::BadRequest { param, .. } => param.clone(),
            ServeError::AdapterRefused { .. } => Some("path".into()),
            _ => None,
        };
        let body = openai::error_body(&self.to_string(), kind, param.as_deref(), code);
        let mut resp = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ServeError::Busy(_)) {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Everything `flywheel serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The base model (GGUF file, Hugging Face folder or hub id).
    pub model: String,
    /// The name requests use for the base model (default: the folder or file name).
    pub name: Option<String>,
    /// Adapters to load at startup, `(name, folder)`.
    pub adapters: Vec<(String, PathBuf)>,
    /// The only folder `POST /v1/adapters` may read from (none: run-time loads are off).
    pub adapters_dir: Option<PathBuf>,
    /// A sentence-embedding model for `/v1/embeddings`.
    pub embedding_model: Option<String>,
    /// A retrieval store (`flywheel rag index`) chat requests may retrieve from.
    pub rag: Option<PathBuf>,
    /// Device and dtype.
    pub load: LoadOptions,
    /// Batch and queue limits.
    pub engine: EngineConfig,
    /// When set, every endpoint but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long a graceful shutdown lets running requests finish before cancelling them.
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's head before it is disconnected.
    pub header_read_timeout: Duration,
}

impl ServeConfig {
    /// A config for `model` with defaults for everything else.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            name: None,
            adapters: Vec::new(),
            adapters_dir: None,
            embedding_model: None,
            rag: None,
            load: LoadOptions::default(),
            engine: EngineConfig::default(),
            api_key: None,
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// The default name of a model: its folder name, or its file name without extension.
fn default_name(spec: &str) -> String {
    let p = std::path::Path::new(spec);
    let name = if p.is_dir() {
        p.file_name().map(|s| s.to_string_lossy().to_string())
    } else {
        p.file_stem().map(|s| s.to_string_lossy().to_string())
    };
    name.filter(|n| !n.is_empty())
        .unwrap_or_else(|| spec.trim_end_matches('/').to_string())
}

/// Loads the model, the startup adapters and the embedding model, and starts the engine.
/// Blocking (seconds): call before serving; readiness follows its return.
pub fn build_state(cfg: &ServeConfig) -> Result<Arc<AppState>, ServeError> {
    let fmt = ModelFormat::resolve(&cfg.model).map_err(|e| ServeError::Startup(e.to_string()))?;
    let hook = Arc::new(LoraHook::all_linear());
    let model = TextModel::load_with_hook(&fmt, &cfg.load, hook.as_ref())
        .map_err(|e| ServeError::Startup(format!("loading {}: {e}", cfg.model)))?;
    let model_path = match &fmt {
        ModelFormat::Gguf(p) | ModelFormat::HfFolder(p) => p.clone(),
    };
    let name = cfg.name.clone().unwrap_or_else(|| default_name(&cfg.model));
    let base_sha: flywheel_peft::registry::BaseSha =
        Arc::new(move || flywheel_runtime::load::model_sha(&model_path).ok());
    let registry = Registry::new(
        hook,
        base_sha,
        model.model().device().clone(),
        model.model().dtype(),
        cfg.adapters_dir.clone(),
    )?;
    for (aname, dir) in &cfg.adapters {
        if aname == &name || aname == "base" {
            return Err(ServeError::Startup(format!(
                "adapter name `{aname}` names the base model; pick another"
            )));
        }
        let a = registry.read(aname, dir).map_err(|e| {
            ServeError::Startup(format!("--adapter {aname}={}: {e}", dir.display()))
        })?;
        registry.insert(a);
    }
    let embedder = match &cfg.embedding_model {
        Some(spec) => {
            let m = EmbeddingModel::load(spec, &cfg.load)
                .map_err(|e| ServeError::Startup(format!("--embedding-model {spec}: {e}")))?;
            Some((default_name(spec), Arc::new(m)))
        }
        None => None,
    };
    let rag = match &cfg.rag {
        Some(path) => Some(rag::RagState::open(
            path,
            embedder.as_ref().map(|(_, e)| e.clone()),
            &cfg.load,
        )?),
        None => None,
    };
    let model = Arc::new(model);
    // The grammar compiler (a token trie over the whole vocabulary, ~0.4 s for 152k tokens) is
    // built in the background now, so the first `response_format` request does not build it on
    // an async worker thread.
    {
        let m = model.clone();
        std::thread::spawn(move || {
            let _ = m.grammar_compiler();
        });
    }
    let engine = Engine::start(model.clone(), cfg.engine.clone());
    Ok(Arc::new(AppState {
        model,
        name,
        engine,
        registry,
        embedder,
        rag,
        metrics: metrics::Metrics::default(),
        api_key: cfg.api_key.clone(),
        max_body_bytes: cfg.max_body_bytes,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }))
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops accepting, lets running
/// requests finish for up to `grace` (after which they are cancelled), and stops the engine.
/// A client that has not sent a whole request head within `header_read` is disconnected, so
/// stalled connections cannot pile up.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    header_read: Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = router(state.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Out of file descriptors and the like: wait, then accept again.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = graceful.watch(
                    http.serve_connection(TokioIo::new(stream), svc),
                );
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let st = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        st.engine.cancel_all();
    });
    graceful.shutdown().await;
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.engine.shutdown()).await;
    Ok(())
}
