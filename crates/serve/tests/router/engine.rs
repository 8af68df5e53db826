//! Adapters loaded and refused at run time, continuous batching against the same requests run
//! alone, hot swaps under load, panics, a full queue, disconnects and the prefix cache.

use super::*;

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
    // A broken adapter's error names its folder as the client gave it, never the server's
    // absolute path.
    let broken = f.adapters.join("broken");
    std::fs::create_dir_all(&broken)?;
    std::fs::write(broken.join("adapter_config.json"), "{not json")?;
    let (s, v) = post(app, "/v1/adapters", json!({"name": "x", "path": "broken"})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "broken");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    let root = f.adapters.canonicalize()?;
    assert!(
        !message.contains(root.to_str().unwrap())
            && !message.contains(f.adapters.to_str().unwrap()),
        "{message}"
    );
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
    // Mixed rows (adapters, grammars, logprobs) give each the output it gets alone.
    let f = fixture_with(true, |c| c.engine.max_batch = 32)?;
    let models = ["tiny", "a", "b", "c"];
    // Every third row is held to a grammar, every fifth asks for logprobs: constrained,
    // unconstrained and adapter rows share the batch.
    let reqs: Vec<Value> = (0..32)
        .map(|i| {
            let mut r = completion(
                models[i % 4],
                &format!("request {i}: {}", "the quick brown fox ".repeat(i % 3)),
                6 + i % 11,
            );
            if i % 3 == 0 {
                r["response_format"] = json!({"type": "regex", "regex": "[a-z ]{3,40}"});
            }
            if i % 5 == 0 {
                r["logprobs"] = json!(2);
            }
            r
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
        let text = t["text"].as_str().unwrap();
        if i % 3 == 0 && t["finish_reason"] == "stop" {
            assert!(
                (3..=40).contains(&text.len())
                    && text.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
                "request {i} breaks its grammar: {text:?}"
            );
        }
        assert_eq!(t["logprobs"].is_null(), i % 5 != 0, "request {i}: {t}");
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
async fn a_requests_choices_are_admitted_all_or_none() -> anyhow::Result<()> {
    let f = fixture_with(true, |c| {
        c.engine.max_batch = 1;
        c.engine.max_queue = 4;
    })?;
    // More choices than the whole queue: a retry could never succeed, so it is a 400, not 429.
    let mut req = completion("tiny", "a", 2);
    req["n"] = json!(16);
    let (s, v) = post(&f.app, "/v1/completions", req.clone()).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "--max-queue");
    assert_eq!(v["error"]["param"], "n");
    assert_eq!(f.state.engine.queue_depth(), 0, "nothing was half-queued");
    // As many choices as the queue holds are admitted together on an idle server.
    req["n"] = json!(4);
    let (s, v) = post(&f.app, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
    // With one long request running and its queue slot freed, a 4-choice request that does
    // not fit beside others is refused whole, and leaves the queue as it found it.
    let long = json!({"model": "tiny", "prompt": "a", "max_tokens": 1000, "temperature": 0.0,
                      "ignore_eos": true, "n": 3});
    let app = f.app.clone();
    let running = tokio::spawn(async move { post(&app, "/v1/completions", long).await });
    // One choice runs (max_batch 1) and two wait: wait until the engine says so.
    let t0 = std::time::Instant::now();
    while (f.state.engine.active(), f.state.engine.queue_depth()) != (1, 2) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the long request never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut four = completion("tiny", "b", 2);
    four["n"] = json!(4);
    let (s, v) = post(&f.app, "/v1/completions", four).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(
        f.state.engine.queue_depth(),
        2,
        "no choice of the refused request stayed queued"
    );
    f.state.engine.cancel_all();
    let _ = running.await?;
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
