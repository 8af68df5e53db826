//! `/tokenize` and `/detokenize`: the ids a prompt or a chat becomes, and back.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_round_trip_and_name_bad_input() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let (s, v) = post(
        &f.app,
        "/tokenize",
        json!({"model": "tiny", "prompt": "hello world"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone())?;
    assert_eq!(v["count"], ids.len());
    assert_eq!(ids, f.state.model.encode_prompt("hello world")?);
    assert_eq!(v["max_model_len"], 64);
    let (s, v) = post(&f.app, "/detokenize", json!({"model": "a", "tokens": ids})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["prompt"], "hello world");
    // A chat is rendered with the template first: more tokens than the bare text.
    let (s, v) = post(
        &f.app,
        "/tokenize",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hello world"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["count"].as_u64().unwrap() > ids.len() as u64, "{v}");
    // Bad input is named.
    let (s, v) = post(
        &f.app,
        "/detokenize",
        json!({"model": "tiny", "tokens": [1, 99999]}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "99999");
    assert_eq!(v["error"]["param"], "tokens[1]");
    let (s, v) = post(&f.app, "/tokenize", json!({"model": "tiny"})).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "prompt");
    let (s, v) = post(&f.app, "/tokenize", json!({"model": "nope", "prompt": "x"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = post(
        &f.app,
        "/tokenize",
        json!({"model": "tiny", "prompt": "x", "x": 1}),
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "x");
    Ok(())
}
