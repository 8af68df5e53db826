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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_unload_and_refuse_bad_ones() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let app = &f.app;
    let base = text_of(
        &post(app, "/v1/completions", completion("tiny", "hello", 8))
            .await
            .1,
    );
    let with_a = text_of(
        &post(app, "/v1/completions", completion("a", "hello", 8))
            .await
            .1,
    );
    assert_ne!(base, with_a, "an adapter must change the output");
    for name in ["tiny:a", "base:a"] {
        let prefixed = text_of(
            &post(app, "/v1/completions", completion(name, "hello", 8))
                .await
                .1,
        );
        assert_eq!(prefixed, with_a, "{name}");
    }
    let base_alias = text_of(
        &post(app, "/v1/completions", completion("base", "hello", 8))
            .await
            .1,
    );
    assert_eq!(base_alias, base);

    // Hot load under a new name, use it, unload it.
    let (s, v) = post(app, "/v1/adapters", json!({"name": "hot", "path": "a2"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["load_ms"].as_f64().unwrap() >= 0.0);
    let hot = text_of(
        &post(app, "/v1/completions", completion("hot", "hello", 8))
            .await
            .1,
    );
    assert_ne!(hot, base);
    let (_, _, b) = call(app, "GET", "/v1/models", None, &[]).await;
    assert!(String::from_utf8(b)?.contains("\"hot\""));
    let (s, _, _) = call(app, "DELETE", "/v1/adapters/hot", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = post(app, "/v1/completions", completion("hot", "hello", 8)).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "available: tiny, a, b, c");
    let (s, _, b) = call(app, "DELETE", "/v1/adapters/hot", None, &[]).await;
    assert_error(
        s,
        &serde_json::from_slice(&b)?,
        StatusCode::NOT_FOUND,
        "not loaded",
    );

    // Replacing `a` changes what new requests get.
    let (s, v) = post(app, "/v1/adapters", json!({"name": "a", "path": "a2"})).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["replaced"], true);
    assert_eq!(
        text_of(
            &post(app, "/v1/completions", completion("a", "hello", 8))
                .await
                .1
        ),
        hot
    );

    // Refusals: outside the folder, missing, wrong shapes, another base model, bad names.
    let (s, v) = post(
        app,
        "/v1/adapters",
        json!({"name": "x", "path": "../other-model"}),
    )
    .await;
    assert_error(
        s,
        &v,
        StatusCode::FORBIDDEN,
        "outside the adapters directory",
    );
    let abs = f.adapters.parent().unwrap().join("other-model");
    let (s, v) = post(
        app,
        "/v1/adapters",
        json!({"name": "x", "path": abs.to_str().unwrap()}),
    )
    .await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "outside");
    let (s, v) = post(app, "/v1/adapters", json!({"name": "x", "path": "missing"})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "does not exist");
    let (s, v) = post(
        app,
        "/v1/adapters",
        json!({"name": "x", "path": "other-shape"}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "do not fit");
    assert_eq!(v["error"]["code"], "adapter_refused");
    let foreign = f.adapters.join("foreign");
    std::fs::create_dir_all(&foreign)?;
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(f.adapters.join("b").join(file), foreign.join(file))?;
    }
    let record = flywheel_peft::AdapterRecord {
        base_model_sha256: "0".repeat(64),
        ..Default::default()
    };
    std::fs::write(
        foreign.join("flywheel_adapter.json"),
        serde_json::to_string(&record)?,
    )?;
    let (s, v) = post(app, "/v1/adapters", json!({"name": "x", "path": "foreign"})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "different base model");
    let (s, v) = post(app, "/v1/adapters", json!({"name": "../x", "path": "b"})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "adapter name");
    for reserved in ["tiny", "base"] {
        let (s, v) = post(app, "/v1/adapters", json!({"name": reserved, "path": "b"})).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "name of a model");
    }
    assert_eq!(f.state.registry.names(), ["a", "b", "c"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_equal_the_same_requests_alone() -> anyhow::Result<()> {
    let f = fixture_with(true, |c| c.engine.max_batch = 32)?;
    let models = ["tiny", "a", "b", "c"];
    let reqs: Vec<Value> = (0..32)
        .map(|i| {
            completion(
                models[i % 4],
                &format!("request {i}: {}", "the quick brown fox ".repeat(i % 3)),
                6 + i % 11,
            )
        })
        .collect();
    let mut alone = Vec::new();
    for r in &reqs {
        let (s, v) = post(&f.app, "/v1/completions", r.clone()).await;
        assert_eq!(s, StatusCode::OK);
        alone.push(v["choices"][0].clone());
    }
    let handles: Vec<_> = reqs
        .iter()
        .map(|r| {
            let app = f.app.clone();
            let r = r.clone();
            tokio::spawn(async move { post(&app, "/v1/completions", r).await })
        })
        .collect();
    let mut together = Vec::new();
    for h in handles {
        let (s, v) = h.await?;
        assert_eq!(s, StatusCode::OK, "{v}");
        together.push(v["choices"][0].clone());
    }
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} ({}) differs when batched", models[i % 4]);
    }
    // The outputs are not all the same (the adapters matter).
    let distinct: std::collections::BTreeSet<String> =
        together.iter().map(|c| c["text"].to_string()).collect();
    assert!(distinct.len() > 8, "{distinct:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_swap_under_load_never_mixes_versions() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let req = completion("a", "swap test", 20);
    let v1 = text_of(&post(&f.app, "/v1/completions", req.clone()).await.1);
    post(&f.app, "/v1/adapters", json!({"name": "a", "path": "a2"})).await;
    let v2 = text_of(&post(&f.app, "/v1/completions", req.clone()).await.1);
    assert_ne!(v1, v2);
    let mut handles = Vec::new();
    for i in 0..24 {
        let app = f.app.clone();
        let r = req.clone();
        handles.push(tokio::spawn(async move {
            post(&app, "/v1/completions", r).await
        }));
        if i % 3 == 0 {
            let path = if i % 2 == 0 { "a" } else { "a2" };
            let (s, _) = post(&f.app, "/v1/adapters", json!({"name": "a", "path": path})).await;
            assert_eq!(s, StatusCode::CREATED);
        }
    }
    let (mut n1, mut n2) = (0, 0);
    for h in handles {
        let (s, v) = h.await?;
        assert_eq!(s, StatusCode::OK, "{v}");
        let t = text_of(&v);
        if t == v1 {
            n1 += 1;
        } else if t == v2 {
            n2 += 1;
        } else {
            panic!("a request mixed adapter versions: {t:?} is neither {v1:?} nor {v2:?}");
        }
    }
    assert_eq!(n1 + n2, 24);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_fails_alone_and_a_full_queue_says_429() -> anyhow::Result<()> {
    let f = fixture_with(true, |c| {
        c.engine.max_batch = 1;
        c.engine.max_queue = 1;
    })?;
    let (s, v) = post(
        &f.app,
        "/v1/completions",
        completion("tiny", &format!("x{BOOM}"), 4),
    )
    .await;
    assert_error(s, &v, StatusCode::INTERNAL_SERVER_ERROR, "test hook");
    let (s, _) = post(
        &f.app,
        "/v1/completions",
        completion("tiny", "still alive", 4),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // One running, one waiting: a third concurrent request is refused with Retry-After.
    let long = json!({"model": "tiny", "prompt": "a", "max_tokens": 1000, "temperature": 0.0,
                      "ignore_eos": true});
    let mut handles = Vec::new();
    for _ in 0..4 {
        let app = f.app.clone();
        let r = long.clone();
        handles.push(tokio::spawn(async move {
            call(&app, "POST", "/v1/completions", Some(r), &[]).await
        }));
    }
    let mut busy = 0;
    for h in handles {
        let (s, headers, b) = h.await?;
        if s == StatusCode::TOO_MANY_REQUESTS {
            busy += 1;
            assert_eq!(headers["retry-after"], "1");
            assert_error(
                s,
                &serde_json::from_slice(&b)?,
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
            );
        } else {
            assert_eq!(s, StatusCode::OK);
        }
    }
    assert!(
        busy >= 1,
        "four concurrent requests with room for two: some must get 429"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_frees_its_slot() -> anyhow::Result<()> {
    let f = fixture_with(true, |_| {})?;
    let req = json!({"model": "a", "prompt": "a", "max_tokens": 4000, "temperature": 0.0,
                     "stream": true, "ignore_eos": true});
    let resp = f
        .app
        .clone()
        .oneshot(
            Request::builder()
                .method("POST")
                .uri("/v1/completions")
                .header("content-type", "application/json")
                .body(Body::from(req.to_string()))?,
        )
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first event")?;
    assert!(first.is_data());
    drop(body);
    // The slot is freed, and the request was cut short (status 499), not finished.
    let cut = "flywheel_requests_total{endpoint=\"completions\",model=\"a\",status=\"499\"} 1";
    let mut freed = false;
    for _ in 0..400 {
        let (_, _, m) = call(&f.app, "GET", "/metrics", None, &[]).await;
        let m = String::from_utf8(m)?;
        if f.state.engine.active() == 0 && f.state.engine.queue_depth() == 0 && m.contains(cut) {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (_, _, m) = call(&f.app, "GET", "/metrics", None, &[]).await;
    assert!(
        freed,
        "the engine still runs the abandoned request: active {}, queued {}, metrics:\n{}",
        f.state.engine.active(),
        f.state.engine.queue_depth(),
        String::from_utf8_lossy(&m)
    );
    let (s, _) = post(&f.app, "/v1/completions", completion("tiny", "next", 3)).await;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prompt_prefix_gives_exactly_the_cold_result() -> anyhow::Result<()> {
    // Longer than two prefill chunks, so whole chunks come from the cache.
    let shared = "You are a careful assistant. Answer in one line. ".repeat(4);
    let first = completion("a", &format!("{shared}First question?"), 12);
    let second = completion("a", &format!("{shared}Second one!"), 12);
    // Cold: a fresh server answers the second prompt.
    let cold = fixture_with(true, |_| {})?;
    let (s, want) = post(&cold.app, "/v1/completions", second.clone()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(cold.state.engine.reused_prompt_tokens(), 0);
    // Warm: the first prompt leaves its prefix in the cache; the second reuses it.
    let warm = fixture_with(true, |_| {})?;
    post(&warm.app, "/v1/completions", first).await;
    let (s, got) = post(&warm.app, "/v1/completions", second.clone()).await;
    assert_eq!(s, StatusCode::OK);
    let reused = warm.state.engine.reused_prompt_tokens();
    assert!(
        reused >= flywheel_runtime::engine::PREFILL_CHUNK,
        "only {reused} prompt tokens came from the cache"
    );
    assert_eq!(got["choices"], want["choices"]);
    // Another adapter never reuses a prefix computed under `a`.
    let mut other = second;
    other["model"] = json!("b");
    post(&warm.app, "/v1/completions", other).await;
    assert_eq!(warm.state.engine.reused_prompt_tokens(), reused);
    let (_, _, m) = call(&warm.app, "GET", "/metrics", None, &[]).await;
    assert!(String::from_utf8(m)?.contains(&format!("flywheel_prefix_cache_tokens_total {reused}")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_requests_get_context_and_sources_from_the_store() -> anyhow::Result<()> {
    use flywheel_rag::{index_folder, IndexOptions, Store};
    let kb = tempfile::tempdir()?;
    let docs = kb.path().join("docs");
    std::fs::create_dir_all(docs.join("guides"))?;
    std::fs::write(
        docs.join("guides/install.md"),
        "# Installing\n\nUse pip to install packages: pip install requests.\n",
    )?;
    std::fs::write(
        docs.join("debug.txt"),
        "The pdb debugger stops at breakpoints.\n",
    )?;
    let bert = kb.path().join("bert");
    flywheel_runtime::testing::write_tiny_bert_folder(&bert, 3)?;
    let embedder =
        flywheel_runtime::EmbeddingModel::load(bert.to_str().unwrap(), &LoadOptions::default())?;
    let store_path = kb.path().join("kb.sqlite");
    {
        let mut store = Store::open(&store_path)?;
        index_folder(
            &mut store,
            &docs,
            &embedder,
            &IndexOptions::default(),
            &mut |_| {},
        )?;
    }
    let f = fixture_with(true, |c| {
        c.rag = Some(store_path.clone());
        c.embedding_model = Some(bert.to_str().unwrap().to_string());
    })?;
    let ask = |retrieval: Option<Value>, stream: bool| {
        let mut b = json!({"model": "tiny", "max_tokens": 3, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": "how do I install packages with pip?"}]});
        if let Some(r) = retrieval {
            b["retrieval"] = r;
        }
        b
    };
    let (s, plain) = post(&f.app, "/v1/chat/completions", ask(None, false)).await;
    assert_eq!(s, StatusCode::OK, "{plain}");
    assert!(plain.get("sources").is_none());
    let r = json!({"top_k": 2, "mode": "bm25", "min_similarity": -1.0});
    let (s, v) = post(&f.app, "/v1/chat/completions", ask(Some(r.clone()), false)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let sources = v["sources"].as_array().expect("sources");
    assert!(!sources.is_empty() && sources.len() <= 2, "{v}");
    assert_eq!(sources[0]["path"], "guides/install.md");
    assert_eq!(sources[0]["index"], 1);
    assert!(sources[0]["text"].as_str().unwrap().contains("pip install"));
    // The passages went into the prompt.
    assert!(
        v["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64(),
        "{v} vs {plain}"
    );
    // Filters apply.
    let (s, v) = post(
        &f.app,
        "/v1/chat/completions",
        ask(
            Some(json!({"mode": "bm25", "filter": ["path=*.txt"], "min_similarity": -1.0})),
            false,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["path"] == "debug.txt"),
        "{v}"
    );
    // Streaming: the first chunk carries the sources.
    let (s, _, bytes) = call(
        &f.app,
        "POST",
        "/v1/chat/completions",
        Some(ask(Some(r), true)),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(bytes)?;
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let first: Value = serde_json::from_str(first)?;
    assert_eq!(first["sources"][0]["path"], "guides/install.md", "{first}");
    // Bad retrieval options name the field.
    let (s, v) = post(
        &f.app,
        "/v1/chat/completions",
        ask(Some(json!({"mode": "fuzzy"})), false),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "fuzzy");
    let (s, v) = post(
        &f.app,
        "/v1/chat/completions",
        ask(Some(json!({"topk": 3})), false),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "topk");
    let (s, v) = post(
        &f.app,
        "/v1/chat/completions",
        ask(Some(json!({"top_k": 0})), false),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "top_k");
    // The server is still healthy after the bad requests.
    let (s, _, _) = call(&f.app, "GET", "/health", None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_without_a_store_is_a_clear_400() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let (s, v) = post(
        &f.app,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "retrieval": {}}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "--rag");
    Ok(())
}
