//! Tool calling: a request's `tools`, `tool_choice` and `parallel_tool_calls` checked (400s
//! name the field), the tools put in the prompt (by the model's chat template, or by a fallback
//! system message for a template without a tools section), the grammar that forces a valid
//! call, and the calls read back out of the generated text, whole or as it streams.
//!
//! Calls are written as Qwen2.5 and Hermes models write them:
//! `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`. A template that renders
//! tools without that tag (Llama 3.1) gets a bare JSON object, `{"name": ..., "parameters": ...}`,
//! which is also read back when it is the whole output.

use flywheel_api::{ChatMessage, FunctionCall, Grammar, ToolCall};
use flywheel_runtime::constraint::Constraint;
use serde_json::{json, Map, Value};

use crate::ServeError;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// How calls are written in the generated text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<tool_call>` blocks holding `{"name", "arguments"}` (Qwen2.5, Hermes, and the fallback).
    Tagged,
    /// One bare JSON object `{"name", "parameters"}` (Llama 3.1's template).
    Bare,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The model answers in text; the tools are not shown to it.
    None,
    /// The model decides: text, calls, or both.
    Auto,
    /// At least one call (grammar-constrained).
    Required,
    /// Exactly one call of this tool (grammar-constrained).
    Named(String),
}

/// The tools of one request.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The `tools` entries as sent (what the chat template renders).
    pub defs: Vec<Value>,
    names: Vec<String>,
    params: Vec<Value>,
    /// `function.strict` per tool: the grammar its calls must match (compiled once, over bytes).
    strict: Vec<Option<Constraint>>,
    /// `tool_choice`.
    pub choice: Choice,
    parallel: bool,
    /// How the model writes calls.
    pub format: Format,
    /// The template does not render tools: the fallback system message describes them.
    pub fallback: bool,
}

fn bad(param: &str, message: String) -> ServeError {
    ServeError::BadRequest {
        param: Some(param.into()),
        message,
    }
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Tools {
    /// Checks the request's tool fields. `None` when there are no tools (or `tool_choice` is
    /// `none`, which shows the model no tools). `template` is the chat template's source.
    pub fn from_request(
        tools: Option<Value>,
        choice: Option<Value>,
        parallel: Option<bool>,
        template: &str,
    ) -> Result<Option<Tools>, ServeError> {
        let defs = match tools {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a,
            Some(_) => return Err(bad("tools", "must be an array of tools".into())),
        };
        let mut names = Vec::with_capacity(defs.len());
        let mut params = Vec::with_capacity(defs.len());
        let mut stricts = Vec::with_capacity(defs.len());
        for (i, d) in defs.iter().enumerate() {
            let at = |f: &str| format!("tools[{i}]{f}");
            if d.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(
                    &at(".type"),
                    "only `function` tools are supported".into(),
                ));
            }
            let Some(f) = d.get("function").and_then(Value::as_object) else {
                return Err(bad(&at(".function"), "must be an object".into()));
            };
            for k in f.keys() {
                if !matches!(k.as_str(), "name" | "description" | "parameters" | "strict") {
                    return Err(bad(
                        &at(&format!(".function.{k}")),
                        format!("Unrecognized argument: {k}"),
                    ));
                }
            }
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            if !valid_name(name) {
                return Err(bad(
                    &at(".function.name"),
                    "must be 1 to 64 letters, digits, `_` or `-`".into(),
                ));
            }
            if names.iter().any(|n| n == name) {
                return Err(bad(
                    &at(".function.name"),
                    format!("the tool `{name}` is declared twice"),
                ));
            }
            let p = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(bad(
                        &at(".function.parameters"),
                        "must be a JSON Schema object".into(),
                    ))
                }
            };
            let strict = match f.get("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad(&at(".function.strict"), "must be a boolean".into())),
            };
            names.push(name.to_string());
            params.push(p);
            stricts.push(strict);
        }
        let choice = match choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        "tool_choice",
                        format!("`{other}` is not a tool choice: use none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                    ))
                }
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(n) if v.get("type").and_then(Value::as_str) == Some("function") => {
                    Choice::Named(n.to_string())
                }
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                    ))
                }
            },
        };
        match &choice {
            Choice::Required | Choice::Named(_) if defs.is_empty() => {
                return Err(bad(
                    "tool_choice",
                    "a call is required but `tools` declares none".into(),
                ))
            }
            Choice::Named(n) if !names.contains(n) => {
                return Err(bad(
                    "tool_choice",
                    format!("`{n}` is not one of the declared tools"),
                ))
            }
            _ => {}
        }
        if defs.is_empty() || choice == Choice::None {
            return Ok(None);
        }
        let renders = template.contains("tools");
        let format = if renders && !template.contains(OPEN) {
            Format::Bare
        } else {
            Format::Tagged
        };
        // A strict tool's calls are checked against a grammar of the whole call, compiled now:
        // a schema the grammar engine cannot take is refused here, not at every call.
        let args_key = args_key(format);
        let mut strict = Vec::with_capacity(names.len());
        for (i, ((name, p), on)) in names.iter().zip(&params).zip(stricts).enumerate() {
            if !on {
                strict.push(None);
                continue;
            }
            let schema = call_schema(name, args_key, p);
            let compiled = flywheel_runtime::constraint::byte_compiler("json_schema")
                .and_then(|c| c.compile(&Grammar::JsonSchema(schema.to_string())));
            match compiled {
                Ok(c) => strict.push(Some(c)),
                Err(e) => {
                    return Err(bad(
                        &format!("tools[{i}].function.parameters"),
                        format!("a strict tool's schema must compile to a grammar: {e}"),
                    ))
                }
            }
        }
        Ok(Some(Tools {
            defs,
            names,
            params,
            strict,
            choice,
            parallel: parallel.unwrap_or(true),
            format,
            fallback: !renders,
        }))
    }

    /// The grammar a forced call follows (`required` or a named tool); `None` under `auto`.
    pub fn grammar(&self) -> Option<Grammar> {
        let only = match &self.choice {
            Choice::Required => None,
            Choice::Named(n) => Some(n.as_str()),
            _ => return None,
        };
        let args_key = args_key(self.format);
        let calls: Vec<Value> = self
            .names
            .iter()
            .zip(&self.params)
            .filter(|(n, _)| only.is_none_or(|o| o == n.as_str()))
            .map(|(n, p)| {
                let mut props = Map::new();
                props.insert("name".into(), json!({"const": n}));
                props.insert(args_key.into(), p.clone());
                json!({"type": "object", "properties": props,
                       "required": ["name", args_key], "additionalProperties": false})
            })
            .collect();
        let schema = json!({"anyOf": calls, "x-guidance": {"whitespace_flexible": false}});
        let lark = match self.format {
            Format::Tagged => {
                let many = self.parallel && only.is_none();
                format!(
                    "start: call{}\ncall: \"{OPEN}\\n\" body \"\\n{CLOSE}\"\nbody: %json {schema}\n",
                    if many { " (\"\\n\" call)*" } else { "" }
                )
            }
            Format::Bare => format!("start: %json {schema}\n"),
        };
        Some(Grammar::Lark(lark))
    }

    /// The system text that describes the tools to a model whose template cannot.
    pub fn system_text(&self) -> String {
        let list: Vec<String> = self
            .defs
            .iter()
            .map(|d| d["function"].to_string())
            .collect();
        format!(
            "You may call functions to help answer the user. The functions, as JSON Schemas:\n{}\n\n\
             To call a function, reply with one block per call, and nothing else:\n\
             {OPEN}\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n{CLOSE}\n\
             A function's result comes back in a <tool_response> block.",
            list.join("\n")
        )
    }

    /// The messages as a template without a tools section can render them: the tools in a
    /// system message, earlier calls as `<tool_call>` text, results as user messages.
    pub fn fallback_messages(&self, msgs: Vec<ChatMessage>) -> Vec<ChatMessage> {
        let mut out = Vec::with_capacity(msgs.len() + 1);
        let text = self.system_text();
        let mut msgs = msgs.into_iter().peekable();
        match msgs.peek() {
            Some(m) if m.role == "system" => {
                let m = msgs.next().expect("peeked");
                out.push(ChatMessage::new(
                    "system",
                    format!("{}\n\n{text}", m.content),
                ));
            }
            _ => out.push(ChatMessage::new("system", text)),
        }
        for m in msgs {
            out.push(match m.role.as_str() {
                "assistant" if !m.tool_calls.is_empty() => {
                    let mut content = m.content.clone();
                    for c in &m.tool_calls {
                        if !content.is_empty() {
                            content.push('\n');
                        }
                        let args: Value = serde_json::from_str(&c.function.arguments)
                            .unwrap_or_else(|_| json!(c.function.arguments));
                        content.push_str(&format!(
                            "{OPEN}\n{}\n{CLOSE}",
                            json!({"name": c.function.name, "arguments": args})
                        ));
                    }
                    ChatMessage::new("assistant", content)
                }
                "tool" => ChatMessage::new(
                    "user",
                    format!("<tool_response>\n{}\n</tool_response>", m.content),
                ),
                _ => m,
            });
        }
        out
    }

    /// Reads one call: a JSON object naming a declared tool, with an object of arguments
    /// (`arguments` or `parameters`; a JSON string holding the object is accepted too).
    fn read_call(&self, text: &str, n: usize) -> Option<ToolCall> {
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        let name = v.get("name")?.as_str()?;
        let i = self.names.iter().position(|n| n == name)?;
        // A strict tool's call is one only when it matches the tool's schema as written (the
        // grammar `required` would hold it to, with free whitespace); otherwise it stays text.
        if self.strict[i]
            .as_ref()
            .is_some_and(|c| !c.accepts_text(text.trim()))
        {
            return None;
        }
        let args = match v.get("arguments").or_else(|| v.get("parameters")) {
            None => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(a) => a.clone(),
        };
        if !args.is_object() {
            return None;
        }
        Some(ToolCall {
            id: format!("call_{:016x}{n:02}", rand::random::<u64>()),
            kind: "function".into(),
            function: FunctionCall {
                name: name.to_string(),
                arguments: args.to_string(),
            },
        })
    }
}

/// The key a call's arguments go under in `format`.
fn args_key(format: Format) -> &'static str {
    match format {
        Format::Tagged => "arguments",
        Format::Bare => "parameters",
    }
}

/// The JSON Schema of one whole call of tool `name` with arguments following `params`, with
/// free whitespace (a model writes calls freely under `auto`); the arguments' `$defs` move to
/// the root, where their `#/$defs/…` references point.
fn call_schema(name: &str, args_key: &str, params: &Value) -> Value {
    let mut params = params.clone();
    let mut root = json!({
        "type": "object",
        "required": ["name", args_key],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": true},
    });
    for key in ["$defs", "definitions"] {
        if let Some(defs) = params.as_object_mut().and_then(|o| o.remove(key)) {
            root[key] = defs;
        }
    }
    root["properties"] = json!({"name": {"const": name}, args_key: params});
    root
}

/// A piece of a reply read by [`Scanner`].
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text for `content`.
    Text(String),
    /// A complete, valid call.
    Call(ToolCall),
}

/// Reads calls out of generated text as it arrives. Text outside calls passes through at once
/// (bar trailing whitespace and a possible start of `<tool_call>`, held until what follows is
/// known); a call is released when its
/// block closes and it parses as a call of a declared tool. A block that does not parse is
/// passed on as text, so a malformed call never reaches the client as a call.
pub struct Scanner<'a> {
    tools: &'a Tools,
    held: String,
    in_call: bool,
    /// Only whitespace so far: a bare JSON call may still be the whole output.
    blank: bool,
    /// The output started with `{`: held whole, read as one bare call at the end.
    bare: bool,
    calls: usize,
    /// Calls read, as (name, arguments), to spot a repeat.
    seen: Vec<(String, String)>,
    /// A call repeated an earlier one word for word: the reply ends before it.
    repeated: bool,
}

impl<'a> Scanner<'a> {
    /// A scanner for one choice.
    pub fn new(tools: &'a Tools) -> Self {
        Self {
            tools,
            held: String::new(),
            in_call: false,
            blank: true,
            bare: false,
            calls: 0,
            seen: vec![],
            repeated: false,
        }
    }

    /// Whether the reply repeated a call word for word. Small models asked for calls tend to
    /// loop on the same one; the repeat and all after it are dropped, and the caller should
    /// stop generating.
    pub fn repeated(&self) -> bool {
        self.repeated
    }

    /// Calls read so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds the next piece of text; returns what can be released.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        if self.repeated {
            return vec![];
        }
        self.held.push_str(text);
        let mut out = vec![];
        if self.blank {
            let t = self.held.trim_start();
            if t.is_empty() {
                return out;
            }
            self.blank = false;
            self.bare = t.starts_with('{');
        }
        if self.bare {
            return out;
        }
        loop {
            if self.in_call {
                let Some(end) = self.held.find(CLOSE) else {
                    return out;
                };
                let block: String = self.held.drain(..end + CLOSE.len()).collect();
                let body = &block[..end];
                let piece = self.call_or_text(body, &format!("{OPEN}{block}"));
                if self.repeated {
                    return out;
                }
                out.push(piece);
                self.in_call = false;
            } else if let Some(at) = self.held.find(OPEN) {
                let before: String = self.held.drain(..at).collect();
                self.held.drain(..OPEN.len());
                if !before.trim().is_empty() {
                    out.push(Piece::Text(before.trim_end().to_string()));
                }
                self.in_call = true;
            } else {
                // Release all but a tail that could start `<tool_call>`.
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&k| self.held.ends_with(&OPEN[..k]))
                    .unwrap_or(0);
                // Trailing whitespace waits for what follows: before a call, or at the end,
                // it is dropped.
                let cut = self.held[..self.held.len() - keep].trim_end().len();
                if cut > 0 {
                    let text: String = self.held.drain(..cut).collect();
                    out.push(Piece::Text(text));
                }
                return out;
            }
        }
    }

    /// The end of the output: an unclosed block or a bare object is read as a call if it is
    /// one, otherwise released as text.
    pub fn finish(&mut self) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        if self.repeated {
            return vec![];
        }
        if self.in_call {
            self.in_call = false;
            return vec![self.call_or_text(&held, &format!("{OPEN}{held}"))];
        }
        if held.is_empty() {
            return vec![];
        }
        if self.bare {
            return vec![self.call_or_text(&held, &held)];
        }
        if held.trim().is_empty() {
            return vec![];
        }
        vec![Piece::Text(held)]
    }

    fn call_or_text(&mut self, body: &str, raw: &str) -> Piece {
        match self.tools.read_call(body, self.calls) {
            Some(c) => {
                let key = (c.function.name.clone(), c.function.arguments.clone());
                if self.seen.contains(&key) {
                    self.repeated = true;
                } else {
                    self.seen.push(key);
                    self.calls += 1;
                }
                Piece::Call(c)
            }
            None => Piece::Text(raw.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
