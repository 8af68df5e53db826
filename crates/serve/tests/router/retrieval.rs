//! Chat requests with retrieval: context and sources from a store, and the errors without one.

use super::*;

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
