//! Structured output: `response_format` (json_object, json_schema, and the regex and lark
//! extensions) constrains every choice, streamed or not; grammars that do not compile are a
//! 400 naming the field.

use super::*;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 999},
            "ok": {"type": "boolean"}
        },
        "required": ["n", "ok"],
        "additionalProperties": false
    })
}

/// The content follows `schema()`: both keys, an integer in range, a boolean, nothing else.
fn assert_follows_schema(content: &str) {
    let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {content}"));
    assert_eq!(o.len(), 2, "{content}");
    let n = o["n"].as_u64().unwrap_or_else(|| panic!("n: {content}"));
    assert!(n <= 999, "{content}");
    assert!(o["ok"].is_boolean(), "{content}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_format_constrains_every_choice_streamed_or_not() -> anyhow::Result<()> {
    // A 4096-token context (the default tiny one is 64) with no reachable end-of-sequence
    // token: only the grammar can end an answer.
    let f = fixture_with(true, |_| {})?;
    let fmt = json!({"type": "json_schema",
                     "json_schema": {"name": "thing", "schema": schema(), "strict": true}});
    // Random weights: without the grammar this would be noise. Sampled choices and an adapter.
    for model in ["tiny", "a"] {
        let req = json!({"model": model, "messages": [{"role": "user", "content": "json please"}],
                         "max_tokens": 200, "n": 3, "seed": 7, "response_format": fmt});
        let (s, v) = post(&f.app, "/v1/chat/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "stop", "{c}");
            assert_follows_schema(c["message"]["content"].as_str().unwrap());
        }
    }
    // Streamed: the deltas assemble into a valid object.
    let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "go"}],
                     "max_tokens": 200, "seed": 3, "stream": true, "response_format": fmt});
    let (s, _, b) = call(&f.app, "POST", "/v1/chat/completions", Some(req), &[]).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b)?;
    let mut streamed = String::new();
    for e in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(e)?;
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(c);
        }
    }
    assert_follows_schema(&streamed);
    // Any JSON object.
    let req = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                     "max_tokens": 300, "temperature": 0,
                     "response_format": {"type": "json_object"}});
    let (s, v) = post(&f.app, "/v1/chat/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    if v["choices"][0]["finish_reason"] == "stop" {
        // A JSON object (random weights may write numbers like 1e999, valid JSON that serde's
        // f64 refuses, so only the shape is checked here).
        let out = text_of(&v);
        assert!(out.starts_with('{') && out.ends_with('}'), "{out}");
    } else {
        // Cut by max_tokens: reported as such, never as a complete answer.
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    }
    // Completions with the regex extension, and a length cut.
    let mut req = completion("tiny", "abc", 50);
    req["response_format"] = json!({"type": "regex", "regex": "[ab]{3}c"});
    let (s, v) = post(&f.app, "/v1/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let out = text_of(&v);
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(
        out[..3].chars().all(|c| c == 'a' || c == 'b') && out.ends_with('c'),
        "{out:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    req["max_tokens"] = json!(2);
    let (_, v) = post(&f.app, "/v1/completions", req).await;
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_response_formats_are_400s_naming_the_field() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let chat = |fmt: Value| {
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
               "response_format": fmt})
    };
    let cases = [
        (
            json!({"type": "regex", "regex": "a(b"}),
            "response_format.regex",
            "regex",
        ),
        (
            json!({"type": "lark", "lark": "start: foo"}),
            "response_format.lark",
            "lark",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}),
            "response_format.json_schema.schema",
            "json_schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
            "response_format.json_schema.schema",
            "object",
        ),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
            "json_schema",
        ),
        (json!({"type": "regex"}), "response_format.regex", "regex"),
        (json!({"type": "yaml"}), "response_format.type", "yaml"),
    ];
    for (fmt, param, needle) in cases {
        let (s, v) = post(&f.app, "/v1/chat/completions", chat(fmt.clone())).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, needle);
        assert_eq!(v["error"]["param"], param, "{fmt}: {v}");
    }
    // A key the format does not have is named too.
    let (s, v) = post(
        &f.app,
        "/v1/chat/completions",
        chat(json!({"type": "text", "bogus": 1})),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "bogus");
    // `text` is plain text.
    let (s, v) = post(
        &f.app,
        "/v1/chat/completions",
        chat(json!({"type": "text"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    Ok(())
}
