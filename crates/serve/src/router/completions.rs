//! Chat and text completions: requests checked and tokenized into engine jobs, then answered
//! whole or streamed as server-sent events.

use super::*;
use crate::tools::{Piece, Scanner, Tools};
use flywheel_api::TokenLogprob;
use reply::TokenText;

/// A checked generation request, ready for the engine.
struct Prepared {
    label: String,
    adapter: Option<Arc<LoadedAdapter>>,
    prompt: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    sampling: SamplingParams,
    n: usize,
    stream: bool,
    include_usage: bool,
    ignore_eos: bool,
    /// Retrieved passages the prompt holds (retrieval requests only).
    sources: Option<Value>,
    /// The compiled `response_format` (or forced tool call) grammar; each choice runs its own
    /// copy.
    constraint: Option<flywheel_runtime::constraint::Constraint>,
    /// Report token log-probabilities with this many alternatives.
    logprobs: Option<usize>,
    /// The tools a chat reply may call (read back out of its text).
    tools: Option<Arc<Tools>>,
}

/// Checks the shared fields and the prompt's length against the context.
fn prepare(
    st: &AppState,
    c: Common,
    adapter: Option<Arc<LoadedAdapter>>,
    prompt: Vec<u32>,
    prompt_field: &str,
    default_max: Option<usize>,
) -> Result<Prepared, ServeError> {
    let ctx = st.model.model().config().max_position_embeddings;
    let defaults = st.model.defaults();
    if prompt.is_empty() {
        return Err(bad(prompt_field, "the prompt is empty".into()));
    }
    if prompt.len() >= ctx {
        return Err(bad(
            prompt_field,
            format!(
                "the prompt has {} tokens; the model's context is {ctx} tokens",
                prompt.len()
            ),
        ));
    }
    let room = ctx - prompt.len();
    let requested = c.max_completion_tokens.or(c.max_tokens);
    let max_tokens = match requested {
        Some(0) => return Err(bad("max_tokens", "must be at least 1".into())),
        Some(m) if m > room => {
            return Err(bad(
                "max_tokens",
                format!(
                    "the prompt ({} tokens) + max_tokens ({m}) exceed the model's context of {ctx} tokens; at most {room} can be generated",
                    prompt.len()
                ),
            ))
        }
        Some(m) => m,
        None => defaults
            .max_tokens
            .or(default_max)
            .unwrap_or(room)
            .min(room),
    };
    let constraint = match c
        .response_format
        .as_ref()
        .map(|f| f.grammar())
        .transpose()?
    {
        Some(Some(g)) => Some(st.model.compile_grammar(&g).map_err(|e| {
            let param = match &g {
                flywheel_api::Grammar::JsonSchema(_) => "response_format.json_schema.schema",
                flywheel_api::Grammar::Regex(_) => "response_format.regex",
                flywheel_api::Grammar::Lark(_) => "response_format.lark",
                flywheel_api::Grammar::JsonObject => "response_format",
            };
            bad(param, e.to_string())
        })?),
        _ => None,
    };
    let n = c.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(bad("n", format!("must be between 1 and 16, got {n}")));
    }
    let stop = c
        .stop
        .map(OneOrMany::into_vec)
        .unwrap_or_else(|| defaults.stop.clone());
    if stop.len() > 16 {
        return Err(bad("stop", "at most 16 stop strings".into()));
    }
    // A field the request leaves out takes the model manifest's default, then OpenAI's.
    let base = defaults.sampling(SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 0,
    });
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(base.temperature),
        top_k: c.top_k.unwrap_or(base.top_k),
        top_p: c.top_p.unwrap_or(base.top_p),
        min_p: c.min_p.unwrap_or(base.min_p),
        repeat_penalty: c.repeat_penalty.unwrap_or(base.repeat_penalty),
        repeat_last_n: 64,
        seed: c.seed.unwrap_or_else(rand::random),
    };
    sampling.validate().map_err(|e| match e {
        flywheel_api::ApiError::InvalidField { field, reason } => {
            bad(field, format!("`{field}` {reason}"))
        }
    })?;
    let label = adapter
        .as_ref()
        .map(|a| a.name.clone())
        .unwrap_or_else(|| st.name.clone());
    Ok(Prepared {
        label,
        adapter,
        prompt,
        max_tokens,
        stop,
        sampling,
        n,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        ignore_eos: c.ignore_eos.unwrap_or(false),
        sources: None,
        constraint,
        logprobs: None,
        tools: None,
    })
}

/// Submits `p.n` jobs (seeds `seed`, `seed+1`, …), all or none: a full queue refuses them all
/// (429), and an `n` larger than the whole queue, which could never be admitted, is a 400.
fn submit(
    engine: &Engine,
    p: &Prepared,
) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ServeError> {
    if p.n > engine.max_queue() {
        return Err(bad(
            "n",
            format!(
                "{} choices can never be admitted: this server queues at most {} requests \
                 (--max-queue); ask for at most {}",
                p.n,
                engine.max_queue(),
                engine.max_queue()
            ),
        ));
    }
    let mut rxs = Vec::with_capacity(p.n);
    let mut jobs = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sampling = p.sampling.clone();
        sampling.seed = sampling.seed.wrapping_add(i as u64);
        jobs.push(Job {
            prompt: p.prompt.clone(),
            max_tokens: p.max_tokens,
            stop: p.stop.clone(),
            sampling,
            adapter: p.adapter.as_ref().map(|a| a.routed.clone()),
            ignore_eos: p.ignore_eos,
            constraint: p.constraint.clone(),
            logprobs: p.logprobs,
            events: tx,
        });
        rxs.push(rx);
    }
    if let Err(Busy) = engine.submit_all(jobs) {
        return Err(ServeError::Busy(engine.queue_depth()));
    }
    Ok(rxs)
}

/// One finished choice.
struct Choice {
    text: String,
    finish: FinishReason,
    completion_tokens: usize,
    ttft: Option<f64>,
    /// Log-probabilities of the output's tokens (end-of-sequence tokens left out).
    logprobs: Vec<TokenLogprob>,
}

/// Gathers one choice's events. A chat reply with tools is scanned as it comes: a call that
/// repeats an earlier one ends it (the receiver is dropped, which stops the job).
async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    t0: Instant,
    eos: Vec<u32>,
    tools: Option<Arc<Tools>>,
) -> Result<Choice, ServeError> {
    let mut text = String::new();
    let mut ttft = None;
    let mut logprobs = vec![];
    let mut scanner = tools.as_deref().map(Scanner::new);
    let mut tokens = 0;
    loop {
        match rx.recv().await {
            Some(Event::Token {
                text: piece,
                token,
                logprob,
            }) => {
                ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                text.push_str(&piece);
                tokens += 1;
                if let Some(lp) = logprob.filter(|_| !eos.contains(&token)) {
                    logprobs.push(lp);
                }
                if let Some(s) = scanner.as_mut() {
                    s.push(&piece);
                    if s.repeated() {
                        return Ok(Choice {
                            text,
                            finish: FinishReason::Stop,
                            completion_tokens: tokens,
                            ttft,
                            logprobs,
                        });
                    }
                }
            }
            Some(Event::Done { finish, usage }) => {
                return Ok(Choice {
                    text,
                    finish,
                    completion_tokens: usage.completion_tokens,
                    ttft,
                    logprobs,
                })
            }
            Some(Event::Failed(e)) => return Err(e.into()),
            None => return Err(ServeError::Internal("the engine stopped".into())),
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Completion => "completions",
        }
    }
}

pub(super) async fn chat(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    respond(st, body, Kind::Chat, chat_request).await
}

pub(super) async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    respond(st, body, Kind::Completion, completion_request).await
}

/// Reads, checks and runs a chat or completion request; errors are counted and answered.
async fn respond(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
    build: fn(&AppState, &[u8]) -> Result<Prepared, ServeError>,
) -> Response {
    let t0 = Instant::now();
    match body_bytes(body, st.max_body_bytes).and_then(|b| build(&st, &b)) {
        Ok(p) => generate(st, p, kind, t0).await,
        Err(e) => {
            st.metrics
                .request(kind.endpoint(), "-", e.status().as_u16());
            e.into_response()
        }
    }
}

/// The messages of a request as the chat template takes them (text content only).
pub(super) fn chat_messages(
    messages: Vec<openai::Message>,
) -> Result<Vec<ChatMessage>, ServeError> {
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(openai::Content::Text(t)) => t,
            Some(openai::Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (k, _) => {
                            return Err(bad(
                                &format!("messages[{i}].content"),
                                format!(
                                    "content parts of type `{k}` are not supported (text only)"
                                ),
                            ))
                        }
                    }
                }
                s
            }
        };
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" | "tool" => m.role,
            "developer" => "system".to_string(), // OpenAI's newer name for system
            other => {
                return Err(bad(
                    &format!("messages[{i}].role"),
                    format!(
                        "`{}` is not a role: use system, developer, user, assistant or tool",
                        flywheel_api::text::escape(other, 40)
                    ),
                ))
            }
        };
        let calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
        if content.trim().is_empty() && !(role == "assistant" && calls) {
            return Err(bad(
                &format!("messages[{i}].content"),
                "must not be empty".into(),
            ));
        }
        let mut msg = ChatMessage::new(role, content);
        msg.tool_calls = m.tool_calls.unwrap_or_default();
        msg.tool_call_id = m.tool_call_id;
        msgs.push(msg);
    }
    Ok(msgs)
}

/// A chat request: the messages rendered through the model's chat template.
fn chat_request(st: &AppState, body: &[u8]) -> Result<Prepared, ServeError> {
    crate::fields::check(body, crate::fields::Endpoint::Chat)?;
    // Parsed twice on purpose: `Common` and the messages each name their own bad fields.
    let common: Common = openai::parse(body)?;
    let adapter = st.resolve(&common.model)?;
    let chat: openai::ChatBody = openai::parse(body)?;
    if chat.messages.is_empty() {
        return Err(bad("messages", "must hold at least one message".into()));
    }
    let mut msgs = chat_messages(chat.messages)?;
    // A chat without a system message gets the model manifest's, as the CLI does.
    if let Some(system) = &st.model.defaults().system {
        if !msgs.iter().any(|m| m.role == "system") {
            msgs.insert(0, ChatMessage::new("system", system.clone()));
        }
    }
    let rag_body: crate::rag::RagBody = openai::parse(body)?;
    let sources = match (rag_body.retrieval, &st.rag) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(bad(
                "retrieval",
                "this server has no retrieval store (start it with --rag STORE)".into(),
            ))
        }
        (Some(r), Some(rag)) => Some(rag.augment(&mut msgs, &r)?),
    };
    let template = st.model.chat_template().map(|t| t.source()).unwrap_or("");
    let tools = Tools::from_request(
        chat.tools,
        chat.tool_choice,
        chat.parallel_tool_calls,
        template,
    )?;
    let forced = tools.as_ref().and_then(|t| t.grammar());
    if forced.is_some() && common.response_format.is_some() {
        return Err(bad(
            "response_format",
            "a required tool call and `response_format` cannot both shape the output".into(),
        ));
    }
    let rendered = match &tools {
        Some(t) if t.fallback => st.model.render_chat(&t.fallback_messages(msgs)),
        Some(t) => match st.model.chat_template() {
            Some(c) => c.render_with_tools(&msgs, &t.defs, true),
            None => st.model.render_chat(&msgs),
        },
        None => st.model.render_chat(&msgs),
    };
    let prompt = rendered
        .and_then(|p| st.model.encode_prompt(&p))
        .map_err(|e| bad("messages", e.to_string()))?;
    let mut p = prepare(st, common, adapter, prompt, "messages", None)?;
    if let Some(g) = forced {
        p.constraint = Some(
            st.model
                .compile_grammar(&g)
                .map_err(|e| bad("tools", e.to_string()))?,
        );
    }
    p.logprobs = match (chat.logprobs, chat.top_logprobs) {
        (_, Some(n)) if n > flywheel_api::MAX_TOP_LOGPROBS => {
            return Err(bad(
                "top_logprobs",
                format!("must be between 0 and {}", flywheel_api::MAX_TOP_LOGPROBS),
            ))
        }
        (Some(true), n) => Some(n.unwrap_or(0)),
        (_, Some(n)) if n > 0 => {
            return Err(bad(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`".into(),
            ))
        }
        _ => None,
    };
    p.sources = sources;
    p.tools = tools.map(Arc::new);
    Ok(p)
}

/// A completion request: one plain prompt.
fn completion_request(st: &AppState, body: &[u8]) -> Result<Prepared, ServeError> {
    crate::fields::check(body, crate::fields::Endpoint::Completions)?;
    let common: Common = openai::parse(body)?;
    let adapter = st.resolve(&common.model)?;
    let b: openai::CompletionBody = openai::parse(body)?;
    let prompts = b.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(bad(
            "prompt",
            format!(
                "give one prompt per request (got {}); use `n` for several choices",
                prompts.len()
            ),
        ));
    }
    let prompt = st
        .model
        .encode_prompt(&prompts[0])
        .map_err(|e| bad("prompt", e.to_string()))?;
    let mut p = prepare(st, common, adapter, prompt, "prompt", Some(16))?;
    p.logprobs = match b.logprobs {
        Some(n) if n > flywheel_api::MAX_TOP_LOGPROBS => {
            return Err(bad(
                "logprobs",
                format!("must be between 0 and {}", flywheel_api::MAX_TOP_LOGPROBS),
            ))
        }
        n => n,
    };
    Ok(p)
}

/// Runs a prepared request: a JSON response, or a server-sent-event stream.
async fn generate(st: Arc<AppState>, p: Prepared, kind: Kind, t0: Instant) -> Response {
    let rxs = match submit(&st.engine, &p) {
        Ok(r) => r,
        Err(e) => {
            st.metrics
                .request(kind.endpoint(), &p.label, e.status().as_u16());
            return e.into_response();
        }
    };
    if p.stream {
        return stream(st, p, kind, rxs, t0);
    }
    let eos = st.model.eos_ids().to_vec();
    let results = futures_util::future::join_all(
        rxs.into_iter()
            .map(|rx| collect(rx, t0, eos.clone(), p.tools.clone())),
    )
    .await;
    let mut choices = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(c) => choices.push(c),
            Err(e) => {
                st.metrics
                    .request(kind.endpoint(), &p.label, e.status().as_u16());
                return e.into_response();
            }
        }
    }
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let ttft = choices.iter().filter_map(|c| c.ttft).reduce(f64::min);
    st.metrics.generation(
        &p.label,
        p.prompt.len(),
        completion,
        t0.elapsed().as_secs_f64(),
        ttft,
    );
    st.metrics.request(kind.endpoint(), &p.label, 200);
    let usage = UsageBody::new(p.prompt.len(), completion);
    let (id, object) = match kind {
        Kind::Chat => ("chatcmpl", "chat.completion"),
        Kind::Completion => ("cmpl", "text_completion"),
    };
    let token_text = TokenText::new(st.model.tokenizer());
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"index": i, "logprobs": null});
            if p.logprobs.is_some() {
                v["logprobs"] = match kind {
                    Kind::Chat => token_text.chat(&c.logprobs),
                    Kind::Completion => token_text.completion(&c.logprobs, &mut 0),
                };
            }
            match (kind, &p.tools) {
                (Kind::Chat, Some(tools)) => {
                    let (content, calls) = reply::split_calls(tools, &c.text);
                    v["finish_reason"] = json!(openai::chat_finish_name(c.finish, calls.len()));
                    v["message"] = json!({"role": "assistant", "content": content});
                    if !calls.is_empty() {
                        v["message"]["tool_calls"] = json!(calls);
                    }
                }
                (Kind::Chat, None) => {
                    v["finish_reason"] = json!(openai::finish_name(c.finish));
                    v["message"] = json!({"role": "assistant", "content": c.text});
                }
                (Kind::Completion, _) => {
                    v["finish_reason"] = json!(openai::finish_name(c.finish));
                    v["text"] = json!(c.text);
                }
            }
            v
        })
        .collect();
    let mut body = json!({
        "id": new_id(id),
        "object": object,
        "created": now_secs(),
        "model": p.label,
        "choices": choices,
        "usage": usage,
    });
    if let Some(s) = &p.sources {
        body["sources"] = s.clone();
    }
    Json(body).into_response()
}

/// What a streamed choice carries from event to event.
struct StreamChoice<'a> {
    /// Reads tool calls out of the text (chat with tools).
    scanner: Option<Scanner<'a>>,
    /// Log-probabilities not sent yet.
    logprobs: Vec<TokenLogprob>,
    /// Byte offset of the next token in the choice's text (completions' `text_offset`).
    offset: usize,
    /// Tokens received.
    tokens: usize,
}

/// Streams the choices as server-sent events. A client that goes away drops the stream, which
/// drops the engine's receivers, which frees the slots at the next token boundary.
fn stream(
    st: Arc<AppState>,
    p: Prepared,
    kind: Kind,
    rxs: Vec<mpsc::UnboundedReceiver<Event>>,
    t0: Instant,
) -> Response {
    let (out, out_rx) = mpsc::channel::<SseEvent>(64);
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = now_secs();
    let label = p.label.clone();
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk_value = move |choices: Value, usage: Option<UsageBody>| {
        let mut v = json!({"id": id, "object": object, "created": created, "model": label, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        v
    };
    let cv = chunk_value.clone();
    let chunk = move |choices: Value, usage: Option<UsageBody>| {
        SseEvent::default().data(cv(choices, usage).to_string())
    };
    let sources = p.sources.clone();
    tokio::spawn(async move {
        let n = rxs.len();
        if kind == Kind::Chat {
            for i in 0..n {
                let mut v = chunk_value(
                    json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                    None,
                );
                // The retrieved sources travel with the first chunk.
                if let (0, Some(s)) = (i, &sources) {
                    v["sources"] = s.clone();
                }
                let c = SseEvent::default().data(v.to_string());
                if out.send(c).await.is_err() {
                    return;
                }
            }
        }
        // A choice whose reply repeated a tool call is stopped: its flag ends its stream,
        // which drops its receiver, which frees its slot in the engine.
        let stopped: Vec<Arc<std::sync::atomic::AtomicBool>> =
            (0..n).map(|_| Default::default()).collect();
        let streams = rxs.into_iter().enumerate().map(|(i, rx)| {
            let stop = stopped[i].clone();
            futures_util::stream::unfold(rx, move |mut rx| {
                let stop = stop.clone();
                async move {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return None;
                    }
                    rx.recv().await.map(|e| ((i, e), rx))
                }
            })
            .boxed()
        });
        let mut merged = futures_util::stream::select_all(streams);
        let mut completion = 0;
        let mut ttft: Option<f64> = None;
        let mut status = 200;
        let tools = p.tools.clone();
        let token_text = TokenText::new(st.model.tokenizer());
        let eos = st.model.eos_ids().to_vec();
        let mut choices: Vec<StreamChoice> = (0..n)
            .map(|_| StreamChoice {
                scanner: tools.as_deref().map(Scanner::new),
                logprobs: vec![],
                offset: 0,
                tokens: 0,
            })
            .collect();
        'events: while let Some((i, ev)) = merged.next().await {
            let c = &mut choices[i];
            let (pieces, finish) = match ev {
                Event::Token {
                    text,
                    token,
                    logprob,
                } => {
                    ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                    if let Some(lp) = logprob.filter(|_| !eos.contains(&token)) {
                        c.logprobs.push(lp);
                    }
                    let pieces = match &mut c.scanner {
                        Some(s) => s.push(&text),
                        None if text.is_empty() => vec![],
                        None => vec![Piece::Text(text)],
                    };
                    if c.scanner.as_ref().is_some_and(|s| s.repeated()) {
                        stopped[i].store(true, std::sync::atomic::Ordering::Relaxed);
                        completion += c.tokens + 1;
                        (pieces, Some(FinishReason::Stop))
                    } else {
                        c.tokens += 1;
                        (pieces, None)
                    }
                }
                Event::Done { finish, usage } => {
                    completion += usage.completion_tokens;
                    let pieces = c.scanner.as_mut().map(|s| s.finish()).unwrap_or_default();
                    (pieces, Some(finish))
                }
                Event::Failed(m) => {
                    status = 500;
                    let e = openai::error_body(&m.to_string(), "server_error", None, None);
                    let _ = out.send(SseEvent::default().data(e.to_string())).await;
                    break;
                }
            };
            // One delta per text piece, two per call (its name, then its arguments); the
            // log-probabilities gathered so far travel with the next chunk sent.
            let mut deltas: Vec<Value> = vec![];
            for piece in pieces {
                match (kind, piece) {
                    (Kind::Chat, Piece::Text(t)) => deltas.push(json!({"content": t})),
                    (Kind::Chat, Piece::Call(call)) => {
                        let k = c.scanner.as_ref().map_or(1, |s| s.calls()) - 1;
                        deltas.extend(reply::call_deltas(k, &call));
                    }
                    (Kind::Completion, Piece::Text(t)) => deltas.push(json!(t)),
                    (Kind::Completion, Piece::Call(_)) => {}
                }
            }
            if let Some(f) = finish {
                let calls = c.scanner.as_ref().map_or(0, |s| s.calls());
                let name = match kind {
                    Kind::Chat => openai::chat_finish_name(f, calls),
                    Kind::Completion => openai::finish_name(f),
                };
                deltas.push(json!({"finish_reason": name}));
            }
            for d in deltas {
                let logprobs = match (p.logprobs, kind) {
                    (None, _) => Value::Null,
                    (Some(_), _) if c.logprobs.is_empty() => Value::Null,
                    (Some(_), Kind::Chat) => token_text.chat(&std::mem::take(&mut c.logprobs)),
                    (Some(_), Kind::Completion) => {
                        token_text.completion(&std::mem::take(&mut c.logprobs), &mut c.offset)
                    }
                };
                let finish = d.get("finish_reason").cloned().unwrap_or(Value::Null);
                let body = match kind {
                    Kind::Chat => {
                        let delta = if finish.is_null() { d } else { json!({}) };
                        json!([{"index": i, "delta": delta, "finish_reason": finish,
                                "logprobs": logprobs}])
                    }
                    Kind::Completion => {
                        let text = if finish.is_null() { d } else { json!("") };
                        json!([{"index": i, "text": text, "finish_reason": finish,
                                "logprobs": logprobs}])
                    }
                };
                if out.send(chunk(body, None)).await.is_err() {
                    status = 499; // client closed the stream
                    break 'events;
                }
            }
        }
        if status == 200 {
            if p.include_usage {
                let _ = out
                    .send(chunk(
                        json!([]),
                        Some(UsageBody::new(p.prompt.len(), completion)),
                    ))
                    .await;
            }
            let _ = out.send(SseEvent::default().data("[DONE]")).await;
            st.metrics.generation(
                &p.label,
                p.prompt.len(),
                completion,
                t0.elapsed().as_secs_f64(),
                ttft,
            );
        }
        st.metrics.request(kind.endpoint(), &p.label, status);
    });
    let body = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}
