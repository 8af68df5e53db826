//! The OpenAI wire format: request bodies (lenient about fields we do not use, strict about
//! the types of those we do, naming the bad field), response bodies and stream chunks.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ServeError;

/// A string or a list of strings (`stop`, `input`, `prompt`).
#[derive(Debug, Clone)]
pub enum OneOrMany {
    /// A single string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let kind = |v: &Value| match v {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        };
        match Value::deserialize(d)? {
            Value::String(s) => Ok(OneOrMany::One(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "expected a string or a list of strings; the list holds {}",
                        kind(&other)
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(OneOrMany::Many),
            other => Err(D::Error::custom(format!(
                "expected a string or a list of strings, got {}",
                kind(&other)
            ))),
        }
    }
}

impl OneOrMany {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Message content: plain text or a list of parts (only `text` parts are accepted).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": "..."}]`.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part's type (`text`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message of a request.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The content (null allowed for assistant messages).
    #[serde(default)]
    pub content: Option<Content>,
    /// The tools an assistant message called.
    #[serde(default)]
    pub tool_calls: Option<Vec<flywheel_api::ToolCall>>,
    /// Which call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and limit fields chat and completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// The base model, an adapter, or `BASE:ADAPTER`.
    pub model: String,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens` (chat).
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature (OpenAI's default is 1).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k (extension).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Min-p (extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Repeat penalty (extension).
    #[serde(default)]
    pub repeat_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    /// Number of choices.
    #[serde(default)]
    pub n: Option<usize>,
    /// Stream as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Keep generating past end-of-sequence tokens (extension, as llama.cpp's server; for
    /// benchmarks with fixed lengths).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Structured output: `text`, `json_object`, `json_schema`, or the extensions `regex` and
    /// `lark` (a grammar the whole output must match).
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
}

/// `response_format`, as OpenAI shapes it (plus two extensions).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFormat {
    /// `text`, `json_object`, `json_schema`, `regex` or `lark`.
    #[serde(rename = "type")]
    pub kind: String,
    /// With `json_schema`: the schema and its name.
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
    /// With `regex`: the regular expression the whole output matches.
    #[serde(default)]
    pub regex: Option<String>,
    /// With `lark`: the grammar (llguidance's Lark dialect, `start` rule first).
    #[serde(default)]
    pub lark: Option<String>,
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// The schema's name (OpenAI requires one; it does not change the output).
    pub name: String,
    /// What the schema is for (does not change the output here).
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON Schema (an object); absent means any JSON object.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode. The output always follows the schema here, strict or not.
    #[serde(default)]
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The grammar this format asks for (`None` for plain text), or a 400 naming what is wrong.
    pub fn grammar(&self) -> Result<Option<flywheel_api::Grammar>, ServeError> {
        use flywheel_api::Grammar;
        let bad = |param: &str, message: String| ServeError::BadRequest {
            param: Some(param.into()),
            message,
        };
        let need = |v: &Option<String>, field: &str| {
            v.clone().ok_or_else(|| {
                bad(
                    &format!("response_format.{field}"),
                    format!("`response_format.type` `{field}` needs `response_format.{field}`"),
                )
            })
        };
        Ok(match self.kind.as_str() {
            "text" => None,
            "json_object" => Some(Grammar::JsonObject),
            "json_schema" => {
                let Some(f) = &self.json_schema else {
                    return Err(bad(
                        "response_format.json_schema",
                        "`json_schema` needs `response_format.json_schema` with a `name` and a                          `schema`"
                            .into(),
                    ));
                };
                match &f.schema {
                    None => Some(Grammar::JsonObject),
                    Some(v) if v.is_object() => Some(Grammar::JsonSchema(v.to_string())),
                    Some(_) => {
                        return Err(bad(
                            "response_format.json_schema.schema",
                            "must be a JSON Schema object".into(),
                        ))
                    }
                }
            }
            "regex" => Some(Grammar::Regex(need(&self.regex, "regex")?)),
            "lark" => Some(Grammar::Lark(need(&self.lark, "lark")?)),
            other => {
                return Err(bad(
                    "response_format.type",
                    format!(
                        "`{other}` is not a response format: use text, json_object, json_schema,                          regex or lark"
                    ),
                ))
            }
        })
    }
}

/// The chat-only part of `POST /v1/chat/completions` (the rest is [`Common`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatBody {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Return each output token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many most likely alternatives per token (0–20).
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    /// Function tools the model may call.
    #[serde(default)]
    pub tools: Option<Value>,
    /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether one reply may hold several calls (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
}

/// The completions-only part of `POST /v1/completions` (the rest is [`Common`]).
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionBody {
    /// The prompt (one string, or a list holding one).
    pub prompt: OneOrMany,
    /// Return each output token's log-probability and this many alternatives (0–20).
    #[serde(default)]
    pub logprobs: Option<usize>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// The embedding model's name.
    pub model: String,
    /// Text(s) to embed.
    pub input: OneOrMany,
    /// Only `float` is supported.
    #[serde(default)]
    pub encoding_format: Option<String>,
}

/// `POST /v1/adapters`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadAdapterRequest {
    /// The name requests will use.
    pub name: String,
    /// The folder, relative to the adapters directory (or absolute inside it).
    pub path: String,
}

/// Parses a JSON body into `T`, naming the field on a type error.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ServeError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let missing = inner
            .to_string()
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next().map(str::to_string));
        let param = (path != ".").then(|| path.clone()).or(missing);
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("the body is not valid JSON: {inner}")
        } else if let Some(p) = &param {
            format!("field `{p}`: {inner}")
        } else {
            format!("invalid request: {inner}")
        };
        ServeError::BadRequest { param, message }
    })
}

/// Token counts in a response.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct UsageBody {
    /// Prompt tokens (counted once whatever `n`).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
}

impl UsageBody {
    /// Usage from prompt and completion counts.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// The OpenAI name of a finish reason.
pub fn finish_name(f: flywheel_api::FinishReason) -> &'static str {
    match f {
        flywheel_api::FinishReason::Stop => "stop",
        flywheel_api::FinishReason::Length => "length",
        flywheel_api::FinishReason::Cancelled => "cancelled",
    }
}

/// The finish reason a chat choice reports: `tool_calls` when its reply is calls and nothing
/// cut it short.
pub fn chat_finish_name(f: flywheel_api::FinishReason, calls: usize) -> &'static str {
    match f {
        flywheel_api::FinishReason::Stop if calls > 0 => "tool_calls",
        f => finish_name(f),
    }
}

/// An OpenAI error body.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}
