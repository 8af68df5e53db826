//! What a choice sends back beyond its text: token log-probabilities as OpenAI shapes them
//! (chat's `content` list, completions' parallel lists), and a chat reply's tool calls.

use flywheel_api::{TokenLogprob, ToolCall};
use flywheel_runtime::constraint::VocabBytes;
use serde_json::{json, Map, Value};

use crate::tools::{Piece, Scanner, Tools};

/// Token text and bytes for log-probability entries.
pub(super) struct TokenText<'a> {
    vocab: Option<VocabBytes<'a>>,
    tok: &'a flywheel_runtime::tokenizer::Tokenizer,
}

impl<'a> TokenText<'a> {
    /// Reads token bytes from the model's tokenizer.
    pub fn new(tok: &'a flywheel_runtime::tokenizer::Tokenizer) -> Self {
        Self {
            vocab: VocabBytes::new(tok.inner()).ok(),
            tok,
        }
    }

    /// The token's text (lossy where it holds part of a character) and its exact bytes.
    fn get(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = match &self.vocab {
            Some(v) => v.get(id).0,
            None => self
                .tok
                .decode(&[id], false)
                .unwrap_or_default()
                .into_bytes(),
        };
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    fn entry(&self, id: u32, logprob: f32) -> Map<String, Value> {
        let (token, bytes) = self.get(id);
        let mut m = Map::new();
        m.insert("token".into(), json!(token));
        m.insert("logprob".into(), json!(logprob.max(-9999.0)));
        m.insert("bytes".into(), json!(bytes));
        m
    }

    /// Chat's `logprobs` object: `{"content": [...], "refusal": null}`.
    pub fn chat(&self, lps: &[TokenLogprob]) -> Value {
        let content: Vec<Value> = lps
            .iter()
            .map(|lp| {
                let mut m = self.entry(lp.token, lp.logprob);
                let top: Vec<Value> = lp
                    .top
                    .iter()
                    .map(|&(t, l)| Value::Object(self.entry(t, l)))
                    .collect();
                m.insert("top_logprobs".into(), json!(top));
                Value::Object(m)
            })
            .collect();
        json!({"content": content, "refusal": null})
    }

    /// Completions' `logprobs` object: `tokens`, `token_logprobs`, `top_logprobs` (a map per
    /// token) and `text_offset` (byte offsets into the choice's text, from `offset`).
    /// `offset` moves past the tokens reported.
    pub fn completion(&self, lps: &[TokenLogprob], offset: &mut usize) -> Value {
        let mut tokens = vec![];
        let mut logprobs = vec![];
        let mut tops = vec![];
        let mut offsets = vec![];
        for lp in lps {
            let (text, bytes) = self.get(lp.token);
            offsets.push(*offset);
            *offset += bytes.len();
            tokens.push(text);
            logprobs.push(lp.logprob.max(-9999.0));
            let top: Map<String, Value> = lp
                .top
                .iter()
                .map(|&(t, l)| (self.get(t).0, json!(l.max(-9999.0))))
                .collect();
            tops.push(top);
        }
        json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
               "text_offset": offsets})
    }
}

/// A chat reply's content and tool calls, read from its whole text.
pub(super) fn split_calls(tools: &Tools, text: &str) -> (Option<String>, Vec<ToolCall>) {
    let mut s = Scanner::new(tools);
    let mut pieces = s.push(text);
    pieces.extend(s.finish());
    let mut content = String::new();
    let mut calls = vec![];
    for p in pieces {
        match p {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    let content = if calls.is_empty() {
        Some(text.to_string())
    } else {
        (!content.trim().is_empty()).then(|| content.trim().to_string())
    };
    (content, calls)
}

/// The stream delta of one call: its index, id and name, then its arguments.
pub(super) fn call_deltas(index: usize, call: &ToolCall) -> [Value; 2] {
    [
        json!({"tool_calls": [{"index": index, "id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": ""}}]}),
        json!({"tool_calls": [{"index": index,
            "function": {"arguments": call.function.arguments}}]}),
    ]
}
