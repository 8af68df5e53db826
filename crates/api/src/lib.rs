//! flywheel-api: the plain request/response types every flywheel crate shares, the
//! [`TokenSink`] that generated text streams into, the [`Retriever`] seam for retrieval
//! backends, and the small file helpers ([`files`]).
//!
//! Nothing here depends on candle or an async runtime. (Generation and embeddings are used
//! through the runtime's concrete `TextModel` and `EmbeddingModel`: retrieval and evaluation
//! need their tokenizers and token probabilities, which a narrow trait would hide.)
#![deny(missing_docs)]

pub mod files;
pub mod lock;
pub mod text;

use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;

/// Errors that the api-level validation can report.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApiError {
    /// A sampling or request field holds a value outside its allowed range.
    #[error("invalid value for `{field}`: {reason}")]
    InvalidField {
        /// The field's name as a user writes it (CLI flag or JSON key).
        field: &'static str,
        /// Why the value is refused.
        reason: String,
    },
}

/// How the next token is chosen from the model's logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set whose probability mass reaches p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p × the top token's probability (0 = off).
    pub min_p: f32,
    /// Penalty applied to the logits of tokens seen in the last `repeat_last_n` tokens (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the sampler's random generator; equal seeds give equal outputs.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 0,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range and names the first bad one.
    pub fn validate(&self) -> Result<(), ApiError> {
        let bad = |field, reason: &str| {
            Err(ApiError::InvalidField {
                field,
                reason: reason.to_string(),
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1]");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat_penalty", "must be a finite number > 0");
        }
        Ok(())
    }
}

/// What to generate: a prompt (already rendered through a chat template if it is a chat) and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt text, fed to the tokenizer as is (special-token markup is recognised).
    pub prompt: String,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; the matched string is not part of the output.
    pub stop: Vec<String>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Constrain the output to a grammar (structured output); `None` generates freely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<Grammar>,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (0–20); `None` reports nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
}

impl GenerateRequest {
    /// A request with default sampling and no stop strings.
    pub fn new(prompt: impl Into<String>, max_tokens: usize) -> Self {
        Self {
            prompt: prompt.into(),
            max_tokens,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            ignore_eos: false,
            grammar: None,
            logprobs: None,
        }
    }

    /// The same request, constrained to `grammar`.
    pub fn with_grammar(mut self, grammar: Grammar) -> Self {
        self.grammar = Some(grammar);
        self
    }
}

/// A grammar the generated text must follow (grammar-constrained decoding). Only tokens that
/// keep the output a valid prefix of the language are ever sampled; the output ends when the
/// grammar admits nothing more, or at an end-of-sequence token once it is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "value")]
pub enum Grammar {
    /// A JSON Schema, as JSON text. The output is compact JSON (no optional whitespace) unless
    /// the schema sets llguidance's `x-guidance` options itself.
    JsonSchema(String),
    /// Any JSON object (the schema `{"type": "object"}`).
    JsonObject,
    /// A regular expression the whole output must match.
    Regex(String),
    /// A Lark grammar (llguidance's dialect; the `start` rule is the output).
    Lark(String),
}

impl Grammar {
    /// The kind's name, as errors report it: `json_schema`, `json_object`, `regex` or `lark`.
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::JsonObject => "json_object",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "lark",
        }
    }
}

/// Most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log-probability of one generated token and of the most likely alternatives, from the
/// distribution the token was drawn from: after the repeat penalty and the grammar mask, before
/// temperature, top-k, top-p and min-p.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The generated token.
    pub token: u32,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token or a stop string matched.
    Stop,
    /// `max_tokens` was reached, or the context window is full.
    Length,
    /// The sink asked to stop (a client went away, Ctrl-C).
    Cancelled,
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (the EOS token, if any, included).
    pub completion_tokens: usize,
}

/// Timing of one generation, for progress lines and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Seconds spent on the prompt (prefill).
    pub prefill_s: f64,
    /// Seconds spent generating tokens after the prompt.
    pub decode_s: f64,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// The generated text, with any stop string removed.
    pub text: String,
    /// The generated token ids (including an EOS token if one ended generation).
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Time spent.
    pub timings: Timings,
    /// Per-token log-probabilities, when the request asked for them (EOS tokens included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Receives generated text as it is produced. One generation loop feeds every sink:
/// the CLI printer, a server stream, an evaluation harness and tests.
pub trait TokenSink {
    /// Called with each new piece of text (always whole UTF-8 characters; may be empty when a
    /// token completes no character yet). Return `ControlFlow::Break(())` to cancel.
    fn on_text(&mut self, piece: &str, token: u32) -> ControlFlow<()>;
}

/// A sink that ignores everything.
pub struct NullSink;

impl TokenSink for NullSink {
    fn on_text(&mut self, _piece: &str, _token: u32) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

impl<F: FnMut(&str, u32) -> ControlFlow<()>> TokenSink for F {
    fn on_text(&mut self, piece: &str, token: u32) -> ControlFlow<()> {
        self(piece, token)
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` (or another role the template knows).
    pub role: String,
    /// The message text.
    pub content: String,
    /// The tools an assistant message called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Which call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: vec![],
            tool_call_id: None,
        }
    }
}

/// A call of a function tool, as OpenAI shapes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id (a `tool` message names it in `tool_call_id`).
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// The function a [`ToolCall`] calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The tool's name.
    pub name: String,
    /// The arguments, as JSON text (an object).
    pub arguments: String,
}

/// One passage a retriever returned, with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievedChunk {
    /// The chunk's id in its store.
    pub chunk_id: i64,
    /// The source document's path, relative to the indexed folder.
    pub path: String,
    /// The heading trail above the chunk (`Page › Section › Subsection`), empty when none.
    pub heading: String,
    /// The chunk's text, exactly as it appears in the extracted document text.
    pub text: String,
    /// Byte span of the chunk in the extracted document text.
    pub span: (usize, usize),
    /// 1-based first and last line of the chunk in the extracted document text.
    pub lines: (usize, usize),
    /// The score that ranked it (higher is better; its scale depends on the search mode).
    pub score: f32,
}

/// Something that finds the passages most relevant to a query. Implemented by the retrieval
/// layer's embedded store; a networked vector database can implement it too.
pub trait Retriever {
    /// The error type of this retriever.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Returns up to `top_k` passages for `query`, best first.
    fn retrieve(&mut self, query: &str, top_k: usize) -> Result<Vec<RetrievedChunk>, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammars_serialize_tagged_and_requests_without_one_are_unchanged() {
        let g = Grammar::Regex("[ab]+".into());
        let text = serde_json::to_string(&g).unwrap();
        assert_eq!(text, r#"{"type":"regex","value":"[ab]+"}"#);
        assert_eq!(serde_json::from_str::<Grammar>(&text).unwrap(), g);
        let text = serde_json::to_string(&Grammar::JsonObject).unwrap();
        assert_eq!(text, r#"{"type":"json_object"}"#);
        assert_eq!(Grammar::JsonSchema("{}".into()).kind(), "json_schema");
        let req = GenerateRequest::new("hi", 4);
        let text = serde_json::to_string(&req).unwrap();
        assert!(!text.contains("grammar"), "{text}");
        assert_eq!(serde_json::from_str::<GenerateRequest>(&text).unwrap(), req);
        let req = req.with_grammar(Grammar::Lark("start: \"x\"".into()));
        let back: GenerateRequest =
            serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut p = SamplingParams::default();
        assert!(p.validate().is_ok());
        p.top_p = 0.0;
        assert_eq!(
            p.validate().unwrap_err(),
            ApiError::InvalidField {
                field: "top_p",
                reason: "must be in (0, 1]".into()
            }
        );
        let p = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let p = SamplingParams {
            repeat_penalty: f32::NAN,
            ..SamplingParams::default()
        };
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("repeat_penalty"));
    }

    #[test]
    fn sampling_params_reject_unknown_keys() {
        let err = serde_json::from_str::<SamplingParams>(r#"{"temprature": 0.5}"#).unwrap_err();
        assert!(err.to_string().contains("temprature"), "{err}");
        let ok: SamplingParams = serde_json::from_str(r#"{"temperature": 0.5}"#).unwrap();
        assert_eq!(ok.temperature, 0.5);
        assert_eq!(ok.top_p, SamplingParams::default().top_p);
    }
}
