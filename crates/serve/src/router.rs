//! The HTTP endpoints. Handlers parse and check requests, tokenize, and hand generation to the
//! engine thread (embeddings to a blocking task); they never run tensor code themselves.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use flywheel_api::{ChatMessage, FinishReason, SamplingParams};
use flywheel_runtime::{EmbeddingModel, TextModel};
use futures_util::{FutureExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::openai::{self, Common, OneOrMany, UsageBody};
use crate::ServeError;
use flywheel_peft::{LoadedAdapter, Registry};
use flywheel_runtime::engine::{Busy, Engine, Event, Job};

/// Everything the handlers share.
pub struct AppState {
    /// The base model (weights exist once; adapters are applied per request).
    pub model: Arc<TextModel>,
    /// The base model's name in requests.
    pub name: String,
    /// The compute thread.
    pub engine: Engine,
    /// Loaded adapters.
    pub registry: Registry,
    /// The embedding model and its name.
    pub embedder: Option<(String, Arc<EmbeddingModel>)>,
    /// The retrieval store chat requests may use (`--rag`).
    pub rag: Option<crate::rag::RagState>,
    /// Counters and histograms.
    pub metrics: Metrics,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Unix time the server started (`created` of the models).
    pub created: u64,
}

type St = State<Arc<AppState>>;

mod completions;
mod reply;
mod tokens;
use completions::{chat, completions};
use tokens::{detokenize, tokenize};

/// A 400 naming `param`.
fn bad(param: &str, message: String) -> ServeError {
    ServeError::BadRequest {
        param: Some(param.into()),
        message,
    }
}

/// The router with every endpoint, authentication, the body limit and panic isolation.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(catch_panic))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// A panic in a handler becomes a 500; the server keeps running.
async fn catch_panic(req: Request, next: Next) -> Response {
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            ServeError::Internal("internal error while handling the request".into()).into_response()
        }
    }
}

/// `Authorization: Bearer <key>` on every endpoint but `/health`, when a key is set.
async fn auth(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if req.uri().path() != "/health" {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|v| constant_time_eq(v.trim().as_bytes(), key.as_bytes()));
            if !ok {
                return ServeError::Unauthorized.into_response();
            }
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn no_route(req: Request) -> Response {
    ServeError::NoRoute(format!(
        "no endpoint {} {}; see GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/adapters",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// 405 in the OpenAI error shape (axum's default has an empty body).
async fn wrong_method(req: Request) -> Response {
    ServeError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// The body, or a 413/400 in the OpenAI error shape.
fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ServeError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServeError::TooLarge(limit)
        } else {
            ServeError::BadRequest {
                param: None,
                message: format!("could not read the body: {e}"),
            }
        }
    })
}

async fn health(State(st): St) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": st.name,
        "adapters": st.registry.names(),
        "queue_depth": st.engine.queue_depth(),
        "batch_size": st.engine.active(),
    }))
}

async fn metrics(State(st): St) -> Response {
    let text = st.metrics.render(
        st.engine.queue_depth(),
        st.engine.active(),
        st.registry.names().len(),
        st.engine.reused_prompt_tokens(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(st): St) -> Json<Value> {
    let cfg = st.model.model().config();
    let mut data = vec![json!({
        "id": st.name,
        "object": "model",
        "created": st.created,
        "owned_by": "flywheel",
        "context_length": cfg.max_position_embeddings,
        "architecture": cfg.arch.name(),
    })];
    for a in st.registry.list() {
        data.push(json!({
            "id": a.name,
            "object": "model",
            "created": st.created,
            "owned_by": "flywheel",
            "parent": st.name,
            "adapter": a.info,
        }));
    }
    if let Some((name, _)) = &st.embedder {
        data.push(json!({
            "id": name,
            "object": "model",
            "created": st.created,
            "owned_by": "flywheel",
            "kind": "embedding",
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

impl AppState {
    /// Every name a generation request may use.
    fn generation_names(&self) -> Vec<String> {
        let mut v = vec![self.name.clone()];
        v.extend(self.registry.names());
        v
    }

    /// Resolves `model`: the base name (or `base`), an adapter's name, or `BASE:ADAPTER`
    /// (`base:ADAPTER` too). Adapters may not be named like the base or `base`.
    fn resolve(&self, model: &str) -> Result<Option<Arc<LoadedAdapter>>, ServeError> {
        if model == self.name || model == "base" {
            return Ok(None);
        }
        let adapter = match model.split_once(':') {
            Some((base, a)) if base == self.name || base == "base" => a,
            _ => model,
        };
        self.registry.get(adapter).map(Some).ok_or_else(|| {
            ServeError::NotFound(format!(
                "model `{model}` does not exist; available: {}",
                self.generation_names().join(", ")
            ))
        })
    }
}

async fn embeddings(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let res = async {
        let body = body_bytes(body, st.max_body_bytes)?;
        let req: openai::EmbeddingRequest = openai::parse(&body)?;
        let Some((name, model)) = st.embedder.clone() else {
            return Err(ServeError::NotFound(format!(
                "model `{}`: this server has no embedding model (start it with --embedding-model DIR)",
                req.model
            )));
        };
        if req.model != name {
            return Err(ServeError::NotFound(format!(
                "embedding model `{}` does not exist; available: {name}",
                req.model
            )));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(f) => {
                return Err(bad(
                    "encoding_format",
                    format!("`{f}` is not supported; use `float` or `base64`"),
                ))
            }
        };
        let texts = req.input.into_vec();
        if texts.is_empty() || texts.len() > 2048 {
            return Err(bad("input", format!("must hold 1 to 2048 texts, got {}", texts.len())));
        }
        if let Some(i) = texts.iter().position(|t| t.is_empty()) {
            return Err(bad(&format!("input[{i}]"), "must not be an empty string".into()));
        }
        let (vectors, tokens) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tokens: usize = refs.iter().map(|t| model.token_count(t).unwrap_or(0)).sum();
            model.embed_all(&refs, 32).map(|v| (v, tokens))
        })
        .await
        .map_err(|e| ServeError::Internal(format!("embedding task failed: {e}")))?
        .map_err(|e| ServeError::Internal(e.to_string()))?;
        Ok::<_, ServeError>(json!({
            "object": "list",
            "model": name,
            "data": vectors.into_iter().enumerate().map(|(i, v)| {
                let embedding = if base64 {
                    // Little-endian f32 bytes, as OpenAI sends them (its client's default).
                    use base64::Engine as _;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            }).collect::<Vec<_>>(),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    }
    .await;
    let label = st
        .embedder
        .as_ref()
        .map(|e| e.0.clone())
        .unwrap_or_default();
    match res {
        Ok(v) => {
            st.metrics.request("embeddings", &label, 200);
            Json(v).into_response()
        }
        Err(e) => {
            st.metrics
                .request("embeddings", &label, e.status().as_u16());
            e.into_response()
        }
    }
}

async fn load_adapter(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let res = async {
        let body = body_bytes(body, st.max_body_bytes)?;
        let req: openai::LoadAdapterRequest = openai::parse(&body)?;
        let reserved = st.embedder.as_ref().map(|e| e.0.as_str());
        if req.name == st.name || req.name == "base" || Some(req.name.as_str()) == reserved {
            return Err(bad(
                "name",
                format!("`{}` is the name of a model this server runs", req.name),
            ));
        }
        let path = st.registry.confine(&req.path)?;
        let st2 = st.clone();
        let name = req.name.clone();
        let t0 = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || st2.registry.read(&name, &path))
            .await
            .map_err(|e| ServeError::Internal(format!("adapter load task failed: {e}")))??;
        let replaced = st.registry.get(&req.name).is_some();
        let a = st.registry.insert(loaded);
        Ok::<_, ServeError>(json!({
            "name": a.name,
            "replaced": replaced,
            "load_ms": t0.elapsed().as_secs_f64() * 1e3,
            "adapter": a.info,
        }))
    }
    .await;
    match res {
        Ok(v) => {
            st.metrics.request("adapters", "-", 201);
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e) => {
            st.metrics.request("adapters", "-", e.status().as_u16());
            e.into_response()
        }
    }
}

async fn unload_adapter(State(st): St, Path(name): Path<String>) -> Response {
    match st.registry.remove(&name) {
        Some(a) => {
            st.metrics.request("adapters", "-", 200);
            Json(json!({"name": a.name, "deleted": true})).into_response()
        }
        None => {
            let e = ServeError::NotFound(format!(
                "adapter `{name}` is not loaded; loaded: {}",
                st.registry.names().join(", ")
            ));
            st.metrics.request("adapters", "-", 404);
            e.into_response()
        }
    }
}
