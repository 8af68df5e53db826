//! Which top-level request fields the server knows: implemented ones, ones that change nothing
//! here (accepted), ones that would change the output but are not implemented (refused with a
//! 400 naming the field unless their value is the neutral one), and unknown ones (refused, as
//! OpenAI answers). No field is accepted and then silently ignored.

use serde_json::Value;

use crate::ServeError;

/// The endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

/// Fields both endpoints implement (OpenAI's and flywheel's extensions).
const IMPLEMENTED: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "response_format",
    // Extensions.
    "top_k",
    "min_p",
    "repeat_penalty",
    "ignore_eos",
];

/// Fields only chat implements.
const CHAT_IMPLEMENTED: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "retrieval",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// Fields only completions implements.
const COMPLETIONS_IMPLEMENTED: &[&str] = &["prompt", "logprobs"];

/// Fields that change nothing a local server returns: bookkeeping for hosted APIs.
const NO_EFFECT: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// Fields OpenAI knows that would change the output and are not implemented here.
const CHAT_UNSUPPORTED: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
];

/// The same for completions.
const COMPLETIONS_UNSUPPORTED: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "best_of",
    "echo",
    "suffix",
];

/// Whether `v` is the value that leaves the output as it is without the field.
fn neutral(field: &str, v: &Value) -> bool {
    match (field, v) {
        (_, Value::Null) => true,
        ("frequency_penalty" | "presence_penalty", Value::Number(n)) => n.as_f64() == Some(0.0),
        ("logit_bias" | "metadata", Value::Object(m)) => m.is_empty(),
        ("echo", Value::Bool(b)) => !b,
        ("best_of", Value::Number(n)) => n.as_u64() == Some(1),
        ("suffix", Value::String(s)) => s.is_empty(),
        ("functions", Value::Array(a)) => a.is_empty(),
        ("function_call", Value::String(s)) => s == "none" || s == "auto",
        ("modalities", Value::Array(a)) => a.iter().all(|m| m.as_str() == Some("text")),
        _ => false,
    }
}

/// Checks every top-level field of a request body; the first one refused is named in the 400.
/// A body that is not a JSON object is left to the typed parser, which reports it.
pub fn check(body: &[u8], endpoint: Endpoint) -> Result<(), ServeError> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Ok(());
    };
    let (own, unsupported) = match endpoint {
        Endpoint::Chat => (CHAT_IMPLEMENTED, CHAT_UNSUPPORTED),
        Endpoint::Completions => (COMPLETIONS_IMPLEMENTED, COMPLETIONS_UNSUPPORTED),
    };
    for (k, v) in &fields {
        let k = k.as_str();
        if IMPLEMENTED.contains(&k) || own.contains(&k) || NO_EFFECT.contains(&k) {
            continue;
        }
        if unsupported.contains(&k) {
            if neutral(k, v) {
                continue;
            }
            return Err(ServeError::BadRequest {
                param: Some(k.to_string()),
                message: format!(
                    "`{k}` is not supported by this server yet; leave it out (it would change \
                     the output, and ignoring it would answer a different question)"
                ),
            });
        }
        return Err(ServeError::BadRequest {
            param: Some(k.to_string()),
            message: format!("Unrecognized request argument supplied: {k}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verdict(body: Value, e: Endpoint) -> Result<(), (Option<String>, String)> {
        check(body.to_string().as_bytes(), e).map_err(|err| match err {
            ServeError::BadRequest { param, message } => (param, message),
            other => (None, other.to_string()),
        })
    }

    #[test]
    fn every_field_is_implemented_harmless_or_refused_by_name() {
        use Endpoint::*;
        let base = |e: Endpoint, extra: Value| {
            let mut b = match e {
                Chat => json!({"model": "m", "messages": []}),
                Completions => json!({"model": "m", "prompt": "p"}),
            };
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        // (endpoint, extra fields, the field refused or None)
        let cases: Vec<(Endpoint, Value, Option<&str>)> = vec![
            (
                Chat,
                json!({"temperature": 0.5, "top_k": 3, "stream": true}),
                None,
            ),
            (
                Chat,
                json!({"user": "u", "metadata": {"a": "b"}, "store": false}),
                None,
            ),
            (
                Chat,
                json!({"frequency_penalty": 0, "presence_penalty": 0.0}),
                None,
            ),
            (
                Chat,
                json!({"logprobs": false, "logit_bias": {}, "tools": []}),
                None,
            ),
            (Chat, json!({"response_format": {"type": "text"}}), None),
            (
                Chat,
                json!({"tool_choice": "none", "modalities": ["text"]}),
                None,
            ),
            (Chat, json!({"retrieval": {"top_k": 2}}), None),
            (
                Chat,
                json!({"frequency_penalty": 0.5}),
                Some("frequency_penalty"),
            ),
            (Chat, json!({"logit_bias": {"42": 5}}), Some("logit_bias")),
            (Chat, json!({"logprobs": true, "top_logprobs": 3}), None),
            (
                Chat,
                json!({"functions": [{"name": "f"}]}),
                Some("functions"),
            ),
            (
                Chat,
                json!({"response_format": {"type": "json_object"}}),
                None,
            ),
            (
                Completions,
                json!({"response_format": {"type": "regex", "regex": "a+"}}),
                None,
            ),
            (
                Chat,
                json!({"tools": [{"type": "function"}], "tool_choice": "required",
                       "parallel_tool_calls": false}),
                None,
            ),
            (Chat, json!({"audio": {"voice": "x"}}), Some("audio")),
            (Chat, json!({"temprature": 0.5}), Some("temprature")),
            (Chat, json!({"suffix": "x"}), Some("suffix")),
            (
                Completions,
                json!({"echo": false, "best_of": 1, "suffix": ""}),
                None,
            ),
            (Completions, json!({"echo": true}), Some("echo")),
            (Completions, json!({"best_of": 3}), Some("best_of")),
            (Completions, json!({"logprobs": 2}), None),
            (Completions, json!({"tools": []}), Some("tools")),
            (
                Completions,
                json!({"max_completion_tokens": 5}),
                Some("max_completion_tokens"),
            ),
            (Completions, json!({"retrieval": {}}), Some("retrieval")),
        ];
        for (e, extra, want) in cases {
            let got = verdict(base(e, extra.clone()), e);
            match (want, got) {
                (None, Ok(())) => {}
                (Some(f), Err((Some(p), msg))) => {
                    assert_eq!(p, f, "{e:?} {extra}: {msg}");
                    assert!(msg.contains(f), "{msg}");
                }
                (want, got) => panic!("{e:?} {extra}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_get_openais_words_and_unsupported_ones_say_why() {
        let (_, msg) = verdict(json!({"model": "m", "bogus": 1}), Endpoint::Chat).unwrap_err();
        assert_eq!(msg, "Unrecognized request argument supplied: bogus");
        let (_, msg) =
            verdict(json!({"model": "m", "presence_penalty": 1}), Endpoint::Chat).unwrap_err();
        assert!(msg.contains("not supported"), "{msg}");
        // Not an object: left to the typed parser.
        assert!(check(b"[1, 2]", Endpoint::Chat).is_ok());
    }
}
