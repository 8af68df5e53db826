//! Careless or hostile requests: unknown roles and empty messages are 400s naming the message;
//! a wrong method is a 405 and an unknown path a 404, both with an OpenAI error body.

use super::*;
use rand::{Rng, SeedableRng};

/// Replaces one random value inside `v` (any depth) with an odd one.
fn poke(v: &mut Value, rng: &mut rand::rngs::StdRng) {
    fn paths(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m
                .iter()
                .for_each(|(k, x)| paths(x, format!("{at}/{k}"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| paths(x, format!("{at}/{i}"), out)),
            _ => {}
        }
        out.push(at);
    }
    let mut all = vec![];
    paths(v, String::new(), &mut all);
    let odd = [
        Value::Null,
        json!(-1),
        json!(0),
        json!(1e308),
        json!(u64::MAX),
        json!(""),
        json!("x".repeat(5000)),
        json!([]),
        json!({}),
        json!(true),
        json!("\u{1b}[2J"),
        json!([1, "a", null]),
    ];
    let at = &all[rng.random_range(0..all.len())];
    if let Some(slot) = v.pointer_mut(at) {
        *slot = odd[rng.random_range(0..odd.len())].clone();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_methods_and_paths_get_clear_errors() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let chat = |messages: Value| json!({"model": "tiny", "max_tokens": 2, "messages": messages});
    for (messages, param) in [
        (
            json!([{"role": "wizard", "content": "hi"}]),
            "messages[0].role",
        ),
        (
            json!([{"role": "user", "content": "hi"}, {"role": "user", "content": "  "}]),
            "messages[1].content",
        ),
        (
            json!([{"role": "user", "content": null}]),
            "messages[0].content",
        ),
        (
            json!([{"role": "assistant", "content": null}]),
            "messages[0].content",
        ),
    ] {
        let (s, v) = post(&f.app, "/v1/chat/completions", chat(messages.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{messages}: {v}");
        assert_eq!(v["error"]["param"], param, "{messages}: {v}");
    }
    // A field of the wrong type says what it should be (not serde's "untagged enum").
    let mut req = chat(json!([{"role": "user", "content": "hi"}]));
    req["stop"] = json!(5);
    let (s, v) = post(&f.app, "/v1/chat/completions", req).await;
    assert_eq!(
        (s, v["error"]["param"].clone()),
        (StatusCode::BAD_REQUEST, json!("stop")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("a string or a list of strings") && !msg.contains("untagged"),
        "{msg}"
    );
    // `developer` is OpenAI's newer name for `system`.
    let (s, v) = post(&f.app, "/v1/chat/completions",
        chat(json!([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, b) = call(&f.app, "GET", "/v1/chat/completions", None, &[]).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = serde_json::from_slice(&b)?;
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
    let (s, _, b) = call(&f.app, "POST", "/v1/nothing", Some(json!({})), &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let v: Value = serde_json::from_slice(&b)?;
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    Ok(())
}

/// Seeded mutation fuzzing of the chat endpoint: valid bodies with random edits get an answer
/// or a 4xx, never a 500 (a panic inside a handler is a 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_chat_bodies_never_fail_inside_the_server() -> anyhow::Result<()> {
    let f = fixture_with(true, |_| {})?;
    let seeds = [
        json!({"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}],
               "stop": ["x"], "n": 2, "temperature": 0.5}),
        json!({"model": "a", "max_tokens": 3, "logprobs": true, "top_logprobs": 2,
               "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                   "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}),
        json!({"model": "tiny", "max_tokens": 3, "tool_choice": "required",
               "tools": [{"type": "function", "function": {"name": "f",
                   "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
               "messages": [{"role": "user", "content": "hi"}]}),
    ];
    let (mut ok, mut refused) = (0, 0);
    for (s, seed) in seeds.iter().enumerate() {
        let (status, v) = post(&f.app, "/v1/chat/completions", seed.clone()).await;
        assert_eq!(status, StatusCode::OK, "seed {s} as is: {v}");
        // Byte edits (mostly broken JSON), then value edits (valid JSON, odd values).
        let bytes = seed.to_string().into_bytes();
        let mut cases = flywheel_runtime::testing::mutations(&bytes, 120, 0, s as u64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(s as u64);
        for _ in 0..120 {
            let mut v = seed.clone();
            for _ in 0..rng.random_range(1..=2) {
                poke(&mut v, &mut rng);
            }
            cases.push(v.to_string().into_bytes());
        }
        for (i, m) in cases.into_iter().enumerate() {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from(m.clone()))
                .unwrap();
            let status = f.app.clone().oneshot(req).await.unwrap().status();
            assert!(
                !status.is_server_error(),
                "seed {s} case {i}: {status} for {:?}",
                String::from_utf8_lossy(&m)
            );
            ok += status.is_success() as usize;
            refused += status.is_client_error() as usize;
        }
    }
    // Both kinds occur: the edits reach past the JSON syntax into the fields.
    assert!(ok > 10 && refused > 10, "{ok} answered, {refused} refused");
    Ok(())
}
