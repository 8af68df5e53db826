//! Training data: JSONL files in four formats, auto-detected per file, turned into token ids and
//! a per-token loss mask.
//!
//! | format | a line | loss on |
//! |---|---|---|
//! | chat (OpenAI fine-tuning) | `{"messages":[{"role":"user","content":…},…]}` | assistant turns |
//! | prompt/completion | `{"prompt":…,"completion":…}` | the completion |
//! | alpaca | `{"instruction":…,"input":…,"output":…}` | the output |
//! | text | `{"text":…}` | every token |
//!
//! Prompt/completion and alpaca records are rendered with the model's chat template (a user turn
//! and an assistant turn, after an optional system prompt) unless `chat = false`, in which case
//! the prompt and completion are concatenated and the EOS token ends the completion. Each
//! segment is tokenized on its own, exactly as generation sees it: the rendered prompt, then the
//! reply's tokens. Errors name the file and line.

use flywheel_api::ChatMessage;
use flywheel_runtime::TextModel;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use crate::{Error, Result};

/// The record layout of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"messages": [...]}`.
    Chat,
    /// `{"prompt", "completion"}`.
    PromptCompletion,
    /// `{"instruction", "input", "output"}`.
    Alpaca,
    /// `{"text"}`.
    Text,
}

impl Format {
    /// Detects the format from a record's keys.
    pub fn detect(v: &Value) -> Option<Self> {
        let o = v.as_object()?;
        if o.contains_key("messages") {
            Some(Format::Chat)
        } else if o.contains_key("prompt") && o.contains_key("completion") {
            Some(Format::PromptCompletion)
        } else if o.contains_key("instruction") && o.contains_key("output") {
            Some(Format::Alpaca)
        } else if o.contains_key("text") {
            Some(Format::Text)
        } else {
            None
        }
    }

    /// The format's name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Format::Chat => "chat (messages)",
            Format::PromptCompletion => "prompt/completion",
            Format::Alpaca => "alpaca (instruction/input/output)",
            Format::Text => "text",
        }
    }
}

/// What to do with an example longer than the maximum sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Leave it out (counted in the summary).
    #[default]
    Drop,
    /// Keep the first `max_seq_len` tokens (dropped if no answer token remains).
    Truncate,
}

/// How records become training sequences.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Render prompt/completion and alpaca records with the chat template.
    pub chat: bool,
    /// System prompt put before prompt/completion and alpaca records when rendering as chat.
    pub system: Option<String>,
    /// Compute loss on prompt tokens too.
    pub train_on_inputs: bool,
    /// Longest sequence in tokens.
    pub max_seq_len: usize,
    /// Policy for longer examples.
    pub overlong: Overlong,
}

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `loss[i]`: token `i` is a prediction target (its logit comes from position `i - 1`).
    pub loss: Vec<bool>,
}

impl Example {
    /// Tokens that carry loss.
    pub fn target_count(&self) -> usize {
        self.loss.iter().skip(1).filter(|&&b| b).count()
    }
}

/// Counts from loading a file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DataStats {
    /// Records read.
    pub records: usize,
    /// Examples kept.
    pub kept: usize,
    /// Examples dropped for length.
    pub dropped_overlong: usize,
    /// Examples cut to the maximum length.
    pub truncated: usize,
    /// Tokens in kept examples.
    pub tokens: usize,
    /// Tokens carrying loss.
    pub target_tokens: usize,
}

/// Reads one JSONL file into examples for `model`.
pub fn load_file(
    path: &Path,
    model: &TextModel,
    opts: &DataOptions,
) -> Result<(Vec<Example>, DataStats, Format)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = path.display().to_string();
    let text = String::from_utf8(bytes).map_err(|e| {
        // Name the line and the column of the first bad byte, as for any other bad record.
        let at = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..at];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        Error::Data {
            path: file.clone(),
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            reason: format!(
                "not UTF-8 text (invalid byte 0x{:02x} at column {})",
                e.as_bytes()[at],
                at - line_start + 1
            ),
        }
    })?;
    let mut format: Option<(Format, usize)> = None;
    let mut examples = Vec::new();
    let mut stats = DataStats::default();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| Error::Data {
            path: file.clone(),
            line: lineno,
            reason,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let f = Format::detect(&v).ok_or_else(|| {
            err(format!(
                "unrecognised record (keys {:?}); expected `messages`, `prompt`+`completion`, `instruction`+`output` or `text`",
                v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()
            ))
        })?;
        match format {
            None => format = Some((f, lineno)),
            Some((first, at)) if first != f => {
                return Err(err(format!(
                    "a {} record, but line {at} made this a {} file",
                    f.name(),
                    first.name()
                )))
            }
            _ => {}
        }
        stats.records += 1;
        let segments = segments_of(&v, f, model, opts).map_err(|e| match e {
            Error::Data { reason, .. } => err(reason),
            other => err(other.to_string()),
        })?;
        let mut ex = tokenize_segments(&segments, model)?;
        if opts.train_on_inputs {
            ex.loss.iter_mut().for_each(|b| *b = true);
        }
        if ex.ids.len() > opts.max_seq_len {
            match opts.overlong {
                Overlong::Drop => {
                    stats.dropped_overlong += 1;
                    continue;
                }
                Overlong::Truncate => {
                    ex.ids.truncate(opts.max_seq_len);
                    ex.loss.truncate(opts.max_seq_len);
                    if ex.target_count() == 0 {
                        stats.dropped_overlong += 1;
                        continue;
                    }
                    stats.truncated += 1;
                }
            }
        }
        if ex.target_count() == 0 {
            return Err(err(
                "the record has no tokens to learn from (empty answer)".into()
            ));
        }
        stats.kept += 1;
        stats.tokens += ex.ids.len();
        stats.target_tokens += ex.target_count();
        examples.push(ex);
    }
    let Some((format, _)) = format else {
        return Err(Error::Data {
            path: file,
            line: 0,
            reason: "the file holds no records".into(),
        });
    };
    Ok((examples, stats, format))
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::Data {
            path: String::new(),
            line: 0,
            reason: format!("field `{key}` must be a string, got {other}"),
        }),
        None => Err(Error::Data {
            path: String::new(),
            line: 0,
            reason: format!("missing field `{key}`"),
        }),
    }
}

fn data_err(reason: String) -> Error {
    Error::Data {
        path: String::new(),
        line: 0,
        reason,
    }
}

/// Text pieces of one record and whether each carries loss; `eos` appends the EOS token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segments {
    pub pieces: Vec<(String, bool)>,
    pub eos: bool,
}

fn segments_of(v: &Value, f: Format, model: &TextModel, opts: &DataOptions) -> Result<Segments> {
    let (prompt, completion) = match f {
        Format::Chat => {
            let list = v
                .get("messages")
                .and_then(Value::as_array)
                .ok_or_else(|| data_err("`messages` must be a list".into()))?;
            let mut msgs = Vec::with_capacity(list.len());
            for (j, m) in list.iter().enumerate() {
                let role = str_field(m, "role")
                    .map_err(|e| data_err(format!("messages[{j}]: {}", inner_reason(e))))?;
                let content = str_field(m, "content")
                    .map_err(|e| data_err(format!("messages[{j}]: {}", inner_reason(e))))?;
                if !matches!(role, "system" | "user" | "assistant" | "tool") {
                    return Err(data_err(format!("messages[{j}]: unknown role `{role}`")));
                }
                msgs.push(ChatMessage::new(role, content));
            }
            return chat_segments(&msgs, model);
        }
        Format::PromptCompletion => (
            str_field(v, "prompt")?.to_string(),
            str_field(v, "completion")?.to_string(),
        ),
        Format::Alpaca => {
            let ins = str_field(v, "instruction")?;
            let input = match v.get("input") {
                None | Some(Value::Null) => "",
                Some(_) => str_field(v, "input")?,
            };
            let prompt = if input.trim().is_empty() {
                ins.to_string()
            } else {
                format!("{ins}\n\n{input}")
            };
            (prompt, str_field(v, "output")?.to_string())
        }
        Format::Text => {
            return Ok(Segments {
                pieces: vec![(str_field(v, "text")?.to_string(), true)],
                eos: true,
            })
        }
    };
    if opts.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &opts.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", prompt));
        msgs.push(ChatMessage::new("assistant", completion));
        chat_segments(&msgs, model)
    } else {
        Ok(Segments {
            pieces: vec![(prompt, false), (completion, true)],
            eos: true,
        })
    }
}

fn inner_reason(e: Error) -> String {
    match e {
        Error::Data { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Splits a rendered conversation into prompt pieces and assistant replies by rendering each
/// prefix: the text the template adds for assistant turn `i` is what the model must produce.
pub(crate) fn chat_segments(msgs: &[ChatMessage], model: &TextModel) -> Result<Segments> {
    let tmpl = model.chat_template().ok_or_else(|| {
        data_err(
            "the model has no chat template; set `data.chat = false` or use text records".into(),
        )
    })?;
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err(data_err("no assistant message to learn from".into()));
    }
    let mut pieces = Vec::new();
    let mut cur = String::new();
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prefix = tmpl.render(&msgs[..i], true)?;
        let full = tmpl.render(&msgs[..=i], false)?;
        if !prefix.starts_with(&cur) || !full.starts_with(&prefix) {
            return Err(data_err(format!(
                "the chat template does not render message {i} as an extension of the earlier turns, so the assistant's tokens cannot be located"
            )));
        }
        pieces.push((prefix[cur.len()..].to_string(), false));
        pieces.push((full[prefix.len()..].to_string(), true));
        cur = full;
    }
    let all = tmpl.render(msgs, false)?;
    if all.len() > cur.len() && all.starts_with(&cur) {
        pieces.push((all[cur.len()..].to_string(), false));
    }
    pieces.retain(|(t, _)| !t.is_empty());
    Ok(Segments { pieces, eos: false })
}

/// Tokenizes segment by segment (the first with BOS where the model wants one).
pub(crate) fn tokenize_segments(seg: &Segments, model: &TextModel) -> Result<Example> {
    let mut ids = Vec::new();
    let mut loss = Vec::new();
    for (i, (text, on)) in seg.pieces.iter().enumerate() {
        let t = if i == 0 {
            model.encode_prompt(text)?
        } else {
            model.tokenizer().encode(text, false)?
        };
        loss.extend(std::iter::repeat_n(*on, t.len()));
        ids.extend(t);
    }
    if seg.eos {
        if let Some(&e) = model.model().config().eos_token_ids.first() {
            ids.push(e);
            loss.push(true);
        }
    }
    Ok(Example { ids, loss })
}
