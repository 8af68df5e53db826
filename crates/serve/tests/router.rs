//! Router tests without sockets, on a tiny random model (seconds): every endpoint, every
//! error the server promises, continuous batching with mixed adapters against the same
//! requests run alone, adapter hot swap under load, panics and disconnects.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use candle_core::{DType, Device, Tensor};
use flywheel_models::{Architecture, GgmlDType};
use flywheel_peft::{LoraConfig, LoraHook, TargetModules};
use flywheel_runtime::testing::{tiny_config, tiny_weights, write_gguf, write_hf_folder};
use flywheel_runtime::{LoadOptions, ModelFormat, TextModel};
use flywheel_serve::{build_state, router, AppState, ServeConfig};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

// The tests are grouped in files under tests/router/, compiled into this one test binary.
#[path = "router/defaults.rs"]
mod defaults;
#[path = "router/engine.rs"]
mod engine;
#[path = "router/hardening.rs"]
mod hardening;
#[path = "router/retrieval.rs"]
mod retrieval;
#[path = "router/structured.rs"]
mod structured;
#[path = "router/tokens.rs"]
mod tokens;
#[path = "router/tools.rs"]
mod tools;

/// The special token whose presence in a prompt makes the engine panic (test hook).
const BOOM: &str = "<|endoftext|>";

fn lora_cfg(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        target_modules: TargetModules::One("all-linear".into()),
        ..Default::default()
    }
}

/// Writes a random rank-`r` adapter for the model at `model` into `out`.
fn make_adapter(model: &Path, out: &Path, r: usize, seed: u64) -> anyhow::Result<()> {
    let hook = LoraHook::all_linear();
    let _m = TextModel::load_with_hook(
        &ModelFormat::resolve(model.to_str().unwrap())?,
        &LoadOptions {
            device: Device::Cpu,
            dtype: Some(DType::F32),
        },
        &hook,
    )?;
    let adapter = hook.init_trainable(&lora_cfg(r), seed, DType::F32, &Device::Cpu)?;
    // Seeded values in [-0.5, 0.5) (reproducible runs).
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (_, (_, b)) in adapter.params.iter() {
        let vals: Vec<f32> = (0..b.elem_count())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        b.set(&Tensor::from_vec(vals, b.dims(), &Device::Cpu)?)?;
    }
    adapter.snapshot("test")?.save(out, "tiny")?;
    Ok(())
}

struct Fixture {
    _dir: tempfile::TempDir,
    adapters: PathBuf,
    state: Arc<AppState>,
    app: Router,
}

/// A tiny Q8_0 GGUF model served with adapters `a`, `b`, `c` (and spare versions `a2`,
/// `other-shape` in the adapters folder).
fn fixture(tweak: impl FnOnce(&mut ServeConfig)) -> anyhow::Result<Fixture> {
    fixture_with(false, tweak)
}

/// [`fixture`]; `long`: a 4096-token context and no reachable end-of-sequence token, so a
/// request runs for as long as its `max_tokens`.
fn fixture_with(long: bool, tweak: impl FnOnce(&mut ServeConfig)) -> anyhow::Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let mut cfg = tiny_config(Architecture::Llama);
    if long {
        cfg.max_position_embeddings = 4096;
        cfg.eos_token_ids = vec![300];
    }
    let w = tiny_weights(&cfg, 5)?;
    let model = dir.path().join("tiny.gguf");
    write_gguf(&model, &cfg, &w, GgmlDType::Q8_0)?;
    let adapters = dir.path().join("adapters");
    for (name, seed) in [("a", 1), ("b", 2), ("c", 3), ("a2", 4)] {
        make_adapter(&model, &adapters.join(name), 4, seed)?;
    }
    // An adapter for a model of another shape.
    let mut other = cfg.clone();
    other.intermediate_size = 96;
    let ow = tiny_weights(&other, 6)?;
    let other_dir = dir.path().join("other-model");
    write_hf_folder(&other_dir, &other, &ow, 1)?;
    make_adapter(&other_dir, &adapters.join("other-shape"), 4, 7)?;
    let mut sc = ServeConfig::new(model.to_str().unwrap());
    sc.name = Some("tiny".into());
    sc.adapters = ["a", "b", "c"]
        .iter()
        .map(|n| (n.to_string(), adapters.join(n)))
        .collect();
    sc.adapters_dir = Some(adapters.clone());
    sc.load.dtype = Some(DType::F32);
    sc.engine.panic_on_token = Some(260);
    tweak(&mut sc);
    let state = build_state(&sc)?;
    let app = router(state.clone());
    Ok(Fixture {
        _dir: dir,
        adapters,
        state,
        app,
    })
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string()))
            .unwrap(),
        None => req.body(Body::empty()).unwrap(),
    };
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, bytes)
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (s, _, b) = call(app, "POST", uri, Some(body), &[]).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .or(v["choices"][0]["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

/// Asserts an OpenAI error body with this status and a message containing `needle`.
fn assert_error(status: StatusCode, body: &Value, want: StatusCode, needle: &str) {
    assert_eq!(status, want, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "`{msg}` should mention `{needle}`");
    assert!(body["error"]["type"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_chat_completions_and_metrics() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let (s, _, b) = call(&f.app, "GET", "/v1/models", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b)?;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "a", "b", "c"]);
    assert_eq!(v["data"][1]["parent"], "tiny");
    assert_eq!(v["data"][1]["adapter"]["r"], 4);
    // No server paths: the adapter's folder relative to --adapters-dir.
    assert_eq!(v["data"][1]["adapter"]["path"], "a", "{v}");
    assert!(v["data"][1]["adapter"]["parameters"].as_u64().unwrap() > 0);

    let (s, _, b) = call(&f.app, "GET", "/health", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&b)?["status"], "ok");

    let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                     "max_tokens": 8, "temperature": 0});
    let (s, chat) = post(&f.app, "/v1/chat/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let fin = chat["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(fin == "stop" || fin == "length", "{fin}");
    let usage = &chat["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 3);
    let done = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&done), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + done
    );

    // Structured content parts are the same text.
    let mut parts = req.clone();
    parts["messages"][0]["content"] =
        json!([{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]);
    let (s, chat2) = post(&f.app, "/v1/chat/completions", parts).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(text_of(&chat2), text_of(&chat));

    // Streaming gives the same text, a finish reason, usage, and [DONE].
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (s, h, b) = call(&f.app, "POST", "/v1/chat/completions", Some(sreq), &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"].to_str()?.starts_with("text/event-stream"));
    let text = String::from_utf8(b)?;
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e)?;
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(c);
        }
        if let Some(fr) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(fr.to_string());
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(streamed, text_of(&chat));
    assert_eq!(finish.as_deref(), Some(fin));
    assert_eq!(usage.unwrap()["completion_tokens"], done);

    // Completions; n = 2 gives two choices; sampled choices with a seed are reproducible.
    let (s, c) = post(&f.app, "/v1/completions", completion("a", "hello", 6)).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["object"], "text_completion");
    let sampled = json!({"model": "tiny", "prompt": "hi", "max_tokens": 6, "n": 2, "seed": 3, "temperature": 1.0});
    let (s, c1) = post(&f.app, "/v1/completions", sampled.clone()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c1["choices"].as_array().unwrap().len(), 2);
    assert_eq!(c1["choices"][1]["index"], 1);
    let (_, c2) = post(&f.app, "/v1/completions", sampled).await;
    assert_eq!(c1["choices"], c2["choices"]);

    // Metrics count what happened, per model.
    let (s, h, b) = call(&f.app, "GET", "/metrics", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"].to_str()?.starts_with("text/plain"));
    let m = String::from_utf8(b)?;
    assert!(
        m.contains("flywheel_requests_total{endpoint=\"chat\",model=\"tiny\",status=\"200\"} 3"),
        "{m}"
    );
    assert!(m.contains("flywheel_completion_tokens_total{model=\"a\"}"));
    assert!(m.contains("flywheel_time_to_first_token_seconds_count{model=\"tiny\"}"));
    assert!(m.contains("flywheel_queue_depth 0"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_naming_the_problem() -> anyhow::Result<()> {
    let f = fixture(|c| c.max_body_bytes = 2048)?;
    let app = &f.app;
    let (s, v) = post(app, "/v1/completions", completion("gpt-4", "x", 4)).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "available: tiny, a, b, c");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (s, v) = post(app, "/v1/completions", completion("tiny:zzz", "x", 4)).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "available");

    // Malformed JSON, wrong types and missing fields name the field.
    let (s, _, b) = call(app, "POST", "/v1/completions", None, &[]).await;
    let v: Value = serde_json::from_slice(&b)?;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "not valid JSON");
    let (s, v) = post(
        app,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "max_tokens": "ten"}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "max_tokens");
    assert_eq!(v["error"]["param"], "max_tokens");
    let (s, v) = post(
        app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": 5}]}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "messages[0].content");
    let (s, v) = post(app, "/v1/chat/completions", json!({"messages": []})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "model");
    assert_eq!(v["error"]["param"], "model");
    let (s, v) = post(
        app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": []}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "at least one message");
    let (s, v) = post(
        app,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "temperature": -1}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "temperature");
    for n in [0, 17] {
        let (s, v) = post(
            app,
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "n": n}),
        )
        .await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "between 1 and 16");
        assert_eq!(v["error"]["param"], "n");
    }

    // Prompt + max_tokens beyond the context (64 tokens) names the limit.
    let (s, v) = post(app, "/v1/completions", completion("tiny", "hello", 62)).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "context of 64 tokens");
    assert_eq!(v["error"]["param"], "max_tokens");
    let long = "x ".repeat(40);
    let (s, v) = post(app, "/v1/completions", completion("tiny", &long, 1)).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "context is 64 tokens");

    // Body over the limit.
    let big = "y".repeat(4000);
    let (s, v) = post(app, "/v1/completions", completion("tiny", &big, 1)).await;
    assert_error(s, &v, StatusCode::PAYLOAD_TOO_LARGE, "2048 bytes");

    // Embeddings without an embedding model; unknown routes.
    let (s, v) = post(app, "/v1/embeddings", json!({"model": "m", "input": "x"})).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "no embedding model");
    let (s, _, b) = call(app, "GET", "/v1/nothing", None, &[]).await;
    assert_error(
        s,
        &serde_json::from_slice(&b)?,
        StatusCode::NOT_FOUND,
        "no endpoint",
    );

    // The server still works after all of that.
    let (s, _) = post(app, "/v1/completions", completion("b", "hello", 4)).await;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() -> anyhow::Result<()> {
    let f = fixture(|c| c.api_key = Some("sekret".into()))?;
    let body = completion("tiny", "hi", 2);
    let (s, _, b) = call(&f.app, "POST", "/v1/completions", Some(body.clone()), &[]).await;
    assert_error(
        s,
        &serde_json::from_slice(&b)?,
        StatusCode::UNAUTHORIZED,
        "Bearer",
    );
    let (s, _, _) = call(
        &f.app,
        "GET",
        "/v1/models",
        None,
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = call(
        &f.app,
        "POST",
        "/v1/completions",
        Some(body),
        &[("authorization", "Bearer sekret")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = call(&f.app, "GET", "/health", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}
