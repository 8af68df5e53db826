//! Tool calls and log-probabilities through the router: a required or named call is a valid
//! call of a declared tool (whatever the random weights want), whole or streamed as deltas
//! that assemble into the same call; a tool result in the history is accepted; logprobs come
//! back in OpenAI's chat and completions shapes, streamed or not, and bad values are 400s.

use super::*;

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
         "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "ping",
         "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}}
    ])
}

/// A call of `get_weather` with arguments that follow its schema, or of `ping` with none.
fn assert_valid_call(call: &Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|i| i.starts_with("call_")),
        "{call}"
    );
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON: {call}: {e}"));
    match call["function"]["name"].as_str().unwrap() {
        "get_weather" => {
            assert!(
                ["Paris", "Oslo", "Lima"].contains(&args["city"].as_str().unwrap()),
                "{args}"
            );
            assert!((1..=7).contains(&args["days"].as_u64().unwrap()), "{args}");
            assert_eq!(args.as_object().unwrap().len(), 2, "{args}");
        }
        "ping" => assert_eq!(args, json!({})),
        other => panic!("undeclared tool {other}"),
    }
}

/// The assistant message, finish reason and tool calls of a streamed chat reply, assembled as
/// the OpenAI client does (calls by index, argument fragments concatenated).
fn assemble(sse: &str) -> (String, String, Vec<Value>) {
    let (mut content, mut finish, mut calls) = (String::new(), String::new(), Vec::<Value>::new());
    for e in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push(json!({"id": d["id"], "type": d["type"],
                                  "function": {"name": d["function"]["name"], "arguments": ""}}));
            }
            let args = format!(
                "{}{}",
                calls[i]["function"]["arguments"].as_str().unwrap(),
                d["function"]["arguments"].as_str().unwrap_or_default()
            );
            calls[i]["function"]["arguments"] = json!(args);
        }
    }
    (content, finish, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_are_valid_whole_or_streamed() -> anyhow::Result<()> {
    let f = fixture_with(true, |_| {})?;
    let chat = |choice: Value, extra: Value| {
        let mut v = json!({"model": "tiny", "max_tokens": 400, "seed": 5, "tools": tools(),
            "tool_choice": choice,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let (s, v) = post(
            &f.app,
            "/v1/chat/completions",
            chat(choice.clone(), json!({"n": 2})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "tool_calls", "{c}");
            let calls = c["message"]["tool_calls"].as_array().expect("tool calls");
            assert!(!calls.is_empty(), "{c}");
            calls.iter().for_each(assert_valid_call);
            if choice.is_object() {
                assert_eq!(calls.len(), 1, "a named tool is called once: {c}");
                assert_eq!(calls[0]["function"]["name"], "get_weather");
            }
        }
        // Streamed with the same seed: the deltas assemble into the same calls.
        let whole = &v["choices"][0]["message"]["tool_calls"];
        let (s, _, b) = call(
            &f.app,
            "POST",
            "/v1/chat/completions",
            Some(chat(choice, json!({"stream": true}))),
            &[],
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (content, finish, calls) = assemble(&String::from_utf8(b)?);
        assert_eq!(finish, "tool_calls");
        assert!(content.trim().is_empty(), "{content:?}");
        assert_eq!(calls.len(), whole.as_array().unwrap().len());
        for (a, b) in calls.iter().zip(whole.as_array().unwrap()) {
            assert_eq!(a["function"], b["function"]);
        }
    }
    // The tool's result goes back in the history, after the assistant's call.
    let (_, v) = post(
        &f.app,
        "/v1/chat/completions",
        chat(json!("required"), json!({})),
    )
    .await;
    let call0 = v["choices"][0]["message"]["tool_calls"][0].clone();
    let req = json!({"model": "tiny", "max_tokens": 8, "temperature": 0, "tools": tools(),
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call0.clone()]},
        {"role": "tool", "tool_call_id": call0["id"], "content": "{\"temp_c\": 18}"}
    ]});
    let (s, v) = post(&f.app, "/v1/chat/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(["stop", "length", "tool_calls"].contains(&finish), "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_requests_are_400s_naming_the_field() -> anyhow::Result<()> {
    let f = fixture(|_| {})?;
    let chat = |extra: Value| {
        let mut v = json!({"model": "tiny", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "x"}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases = [
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": tools(), "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": tools(), "tool_choice": "required",
                "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 2}), "top_logprobs"),
    ];
    for (extra, param) in cases {
        let (s, v) = post(&f.app, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    let mut req = completion("tiny", "abc", 4);
    req["logprobs"] = json!(25);
    let (s, v) = post(&f.app, "/v1/completions", req).await;
    assert_eq!(
        (s, v["error"]["param"].clone()),
        (StatusCode::BAD_REQUEST, json!("logprobs")),
        "{v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_back_in_openai_shapes_streamed_or_not() -> anyhow::Result<()> {
    let f = fixture_with(true, |_| {})?;
    let req = json!({"model": "tiny", "max_tokens": 12, "temperature": 0, "logprobs": true,
                     "top_logprobs": 3, "messages": [{"role": "user", "content": "hi"}]});
    let (s, v) = post(&f.app, "/v1/chat/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content logprobs");
    assert_eq!(
        content.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    let mut bytes = vec![];
    for e in content {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{e}");
        bytes.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let tl: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(tl.windows(2).all(|w| w[0] >= w[1]), "sorted: {e}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"], "{e}");
        assert_eq!(top[0]["logprob"], e["logprob"], "{e}");
    }
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        text_of(&v),
        "the bytes spell the text"
    );
    // Streamed: the same entries, spread over the chunks.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (_, _, b) = call(&f.app, "POST", "/v1/chat/completions", Some(sreq), &[]).await;
    let mut streamed = vec![];
    for e in String::from_utf8(b)?
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
    {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(e)?;
        if let Some(c) = v["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(c.iter().cloned());
        }
    }
    assert_eq!(&streamed, content);
    // Without the fields: null.
    let (_, v) = post(
        &f.app,
        "/v1/chat/completions",
        json!({"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    // Completions: the legacy parallel lists.
    let mut req = completion("tiny", "abc", 6);
    req["logprobs"] = json!(2);
    let (s, v) = post(&f.app, "/v1/completions", req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), lp["token_logprobs"].as_array().unwrap().len());
    assert_eq!(tokens.len(), lp["top_logprobs"].as_array().unwrap().len());
    assert_eq!(lp["text_offset"][0], 0);
    assert!(
        lp["top_logprobs"][0].as_object().unwrap().len() <= 2,
        "{lp}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{lp}");
    assert!(
        *offsets.last().unwrap() as usize <= text_of(&v).len(),
        "{lp}"
    );
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    if !joined.contains('\u{fffd}') {
        // Token texts are lossy only where a token holds part of a character.
        assert_eq!(joined, text_of(&v));
    }
    Ok(())
}
