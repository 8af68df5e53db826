//! The continuous-batching engine: one thread owns all tensor work behind a channel, and runs
//! continuous batching. New requests are prefilled and join the running batch at token boundaries;
//! finished or abandoned ones leave it. Each row of a decode step applies its own adapter
//! (rows grouped by adapter); rows without one use the base weights alone.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::Tensor;
use flywheel_api::{FinishReason, GenerateRequest, SamplingParams, TokenLogprob, Usage};
use flywheel_models::{Cache, Logits};
use flywheel_peft::{with_routing, RoutedAdapter, Routing};
use tokio::sync::mpsc::UnboundedSender;

use crate::constraint::Constraint;
use crate::generate::RowState;
use crate::{panic_text, TextModel};

/// Why the engine failed a request (it keeps serving the others).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The prompt is empty or does not fit the context.
    #[error("the prompt has {tokens} tokens; the context is {context}")]
    PromptLength {
        /// Prompt tokens.
        tokens: usize,
        /// The model's context.
        context: usize,
    },
    /// A model or tensor operation failed.
    #[error("{0}")]
    Model(String),
    /// Code inside the engine panicked while it ran this request.
    #[error("internal error while {stage}: {message}")]
    Panic {
        /// What the engine was doing: `reading the prompt` or `generating`.
        stage: &'static str,
        /// The panic's message.
        message: String,
    },
}

impl EngineError {
    fn model(e: impl std::fmt::Display) -> Self {
        EngineError::Model(e.to_string())
    }
}

/// What a running request hears from the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text it completes (possibly empty).
    Token {
        /// Text safe to show (whole characters, stop strings held back).
        text: String,
        /// The token id.
        token: u32,
        /// Its log-probability and the top alternatives, when the job asked for them.
        logprob: Option<TokenLogprob>,
    },
    /// Generation ended.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed inside the engine (the engine itself keeps running).
    Failed(EngineError),
}

/// One generation job, as the engine runs it.
pub struct Job {
    /// The tokenized prompt (not empty).
    pub prompt: Vec<u32>,
    /// The most tokens to generate (already within the context).
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// The adapter version this request uses, fixed when it was admitted.
    pub adapter: Option<Arc<RoutedAdapter>>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// The grammar the output must follow: compiled by the submitter with this engine's model
    /// ([`TextModel::compile_grammar`]), so a bad grammar is refused before it is queued.
    pub constraint: Option<Constraint>,
    /// Report each token's log-probability and this many alternatives (at most
    /// [`flywheel_api::MAX_TOP_LOGPROBS`]); `None` reports nothing.
    pub logprobs: Option<usize>,
    /// Where events go; a dropped receiver cancels the job and frees its slot.
    pub events: UnboundedSender<Event>,
}

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a slot; more are refused ([`Busy`]).
    pub max_queue: usize,
    /// Test hook (feature `test-hooks` only): a prompt containing this token id makes the
    /// engine panic while running it (proves that one failing request never takes it down).
    #[cfg(feature = "test-hooks")]
    pub panic_on_token: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_queue: 256,
            #[cfg(feature = "test-hooks")]
            panic_on_token: None,
        }
    }
}

enum Msg {
    Job(Box<Job>),
    CancelAll,
    Shutdown,
}

/// The queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// Handle to the engine thread.
pub struct Engine {
    tx: Mutex<mpsc::Sender<Msg>>,
    queued: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    reused: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
    max_queue: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread over `model`.
    pub fn start(model: Arc<TextModel>, cfg: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let max_queue = cfg.max_queue;
        let reused = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model,
            cfg,
            queued: queued.clone(),
            active: active.clone(),
            reused: reused.clone(),
            prefixes: Default::default(),
            scratch: Default::default(),
        };
        let thread = std::thread::Builder::new()
            .name("flywheel-engine".into())
            .spawn(move || worker.run(rx))
            .expect("spawning the engine thread");
        Self {
            tx: Mutex::new(tx),
            queued,
            active,
            reused,
            stopped,
            max_queue,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Queues a job, or refuses it when the queue is full or the engine stopped.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        self.submit_all(vec![job])
    }

    /// Queues every job of one request, or none of them: all-or-nothing admission, so a
    /// request's choices never sit half-queued (taking room other requests could use) when the
    /// rest are refused.
    pub fn submit_all(&self, jobs: Vec<Job>) -> Result<(), Busy> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(Busy);
        }
        let k = jobs.len();
        let before = self.queued.fetch_add(k, Ordering::SeqCst);
        if before + k > self.max_queue {
            self.queued.fetch_sub(k, Ordering::SeqCst);
            return Err(Busy);
        }
        let tx = self.tx.lock().expect("engine channel poisoned");
        for (i, job) in jobs.into_iter().enumerate() {
            if tx.send(Msg::Job(Box::new(job))).is_err() {
                // The engine thread is gone: none of the rest will run.
                self.queued.fetch_sub(k - i, Ordering::SeqCst);
                return Err(Busy);
            }
        }
        Ok(())
    }

    /// The most requests that may wait for a slot.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    /// Requests waiting for a slot.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Sequences in the running batch.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Prompt tokens taken from the prefix cache instead of being computed, so far.
    pub fn reused_prompt_tokens(&self) -> usize {
        self.reused.load(Ordering::SeqCst)
    }

    /// Ends every running and queued request now (finish reason `cancelled`); the engine keeps
    /// serving new ones.
    pub fn cancel_all(&self) {
        let _ = self.tx.lock().expect("poisoned").send(Msg::CancelAll);
    }

    /// Cancels what is left, stops the thread and waits for it.
    pub fn shutdown(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.tx.lock().expect("poisoned").send(Msg::Shutdown);
        if let Some(t) = self.thread.lock().expect("poisoned").take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One sequence in the running batch.
struct Seq<'a> {
    row: RowState<'a>,
    cache: Cache,
    adapter: Option<Arc<RoutedAdapter>>,
    events: UnboundedSender<Event>,
    next: u32,
}

impl Seq<'_> {
    /// Sends the final event (if the client is still there).
    fn finish(self) {
        let finish = self.row.finish.unwrap_or(FinishReason::Cancelled);
        let usage = Usage {
            prompt_tokens: self.row.prompt_len,
            completion_tokens: self.row.tokens.len(),
        };
        let _ = self.events.send(Event::Done { finish, usage });
    }

    /// Accepts a sampled token and streams it.
    fn accept(&mut self, tok: u32, eos: &[u32]) -> crate::Result<()> {
        let events = self.events.clone();
        // A token may reach the sink more than once (its text, then a flushed tail); its
        // log-probability travels with the first.
        let mut logprob = self.row.pending_logprob().cloned();
        let mut sink = |text: &str, token: u32| {
            if events
                .send(Event::Token {
                    text: text.to_string(),
                    token,
                    logprob: logprob.take(),
                })
                .is_err()
            {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        };
        self.next = tok;
        self.row.step(tok, eos, &mut sink)
    }
}

struct Worker {
    model: Arc<TextModel>,
    cfg: EngineConfig,
    queued: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    reused: Arc<AtomicUsize>,
    prefixes: std::cell::RefCell<PrefixCache>,
    /// Buffers of the host decode step, reused from step to step.
    scratch: std::cell::RefCell<flywheel_models::DecodeScratch>,
}

/// Prompts are fed in chunks at fixed positions (multiples of this), so a prompt whose first
/// chunks are cached computes exactly what it computes from scratch. 64 positions take the
/// prefill GEMM (the models crate's `GEMM_MIN_ROWS`), about twice as fast per token as the
/// 16-position chunks this started with.
pub const PREFILL_CHUNK: usize = 64;
/// Prompt prefixes kept (most recently used first out last).
const PREFIX_ENTRIES: usize = 32;

/// The KV caches of recent prompts, cut at chunk boundaries, by adapter version: a new prompt
/// that starts the same way (a chat template's system prompt, few-shot examples) skips those
/// chunks. The entry holds its adapter's `Arc`, so a version is never confused with another.
#[derive(Default)]
struct PrefixCache {
    entries: std::collections::VecDeque<(Option<Arc<RoutedAdapter>>, Vec<u32>, Cache)>,
}

fn same_adapter(a: &Option<Arc<RoutedAdapter>>, b: &Option<Arc<RoutedAdapter>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

impl PrefixCache {
    /// The longest cached prefix of `prompt` (whole chunks, leaving at least one token to feed).
    fn lookup(
        &self,
        adapter: &Option<Arc<RoutedAdapter>>,
        prompt: &[u32],
    ) -> Option<(Cache, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (i, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, (a, _, _))| same_adapter(a, adapter))
            .map(|(i, (_, toks, _))| {
                let common = toks.iter().zip(prompt).take_while(|(x, y)| x == y).count();
                (i, common.min(limit) / PREFILL_CHUNK * PREFILL_CHUNK)
            })
            .max_by_key(|&(_, len)| len)?;
        if len == 0 {
            return None;
        }
        let mut cache = self.entries[i].2.clone();
        cache.truncate(len).ok()?;
        Some((cache, len))
    }

    fn store(&mut self, adapter: Option<Arc<RoutedAdapter>>, tokens: Vec<u32>, cache: Cache) {
        self.entries
            .retain(|(a, t, _)| !(same_adapter(a, &adapter) && *t == tokens));
        self.entries.push_back((adapter, tokens, cache));
        while self.entries.len() > PREFIX_ENTRIES {
            self.entries.pop_front();
        }
    }
}

/// The routing for a set of rows: rows grouped by adapter version (pointer identity).
fn routing<'a>(adapters: impl Iterator<Item = Option<&'a Arc<RoutedAdapter>>>) -> Routing {
    let mut groups: Vec<(Arc<RoutedAdapter>, Vec<u32>)> = Vec::new();
    for (i, a) in adapters.enumerate() {
        let Some(a) = a else { continue };
        match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, a)) {
            Some((_, rows)) => rows.push(i as u32),
            None => groups.push((a.clone(), vec![i as u32])),
        }
    }
    Routing { groups }
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Msg>) {
        let model = self.model.clone();
        let tok = model.tokenizer();
        let eos = model.eos_ids().to_vec();
        let mut batch: Vec<Seq> = Vec::new();
        let mut shutdown = false;
        while !shutdown {
            let mut incoming: Vec<Box<Job>> = Vec::new();
            let mut cancel = false;
            if batch.is_empty() {
                match rx.recv() {
                    Ok(Msg::Job(j)) => incoming.push(j),
                    Ok(Msg::CancelAll) => {}
                    Ok(Msg::Shutdown) | Err(_) => shutdown = true,
                }
            }
            while !shutdown && batch.len() + incoming.len() < self.cfg.max_batch.max(1) {
                match rx.try_recv() {
                    Ok(Msg::Job(j)) => incoming.push(j),
                    Ok(Msg::CancelAll) => cancel = true,
                    Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => shutdown = true,
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            self.queued.fetch_sub(incoming.len(), Ordering::SeqCst);
            if shutdown || cancel {
                // Everything running or waiting ends now, cleanly, with `cancelled`.
                for s in batch.drain(..) {
                    s.finish();
                }
                let mut rest = incoming;
                if shutdown {
                    while let Ok(m) = rx.try_recv() {
                        if let Msg::Job(j) = m {
                            self.queued.fetch_sub(1, Ordering::SeqCst);
                            rest.push(j);
                        }
                    }
                }
                for j in rest {
                    let _ = j.events.send(Event::Done {
                        finish: FinishReason::Cancelled,
                        usage: Usage {
                            prompt_tokens: j.prompt.len(),
                            completion_tokens: 0,
                        },
                    });
                }
                self.active.store(0, Ordering::SeqCst);
                continue;
            }
            for job in incoming {
                if job.events.is_closed() {
                    continue; // the client left while queued
                }
                let events = job.events.clone();
                match std::panic::catch_unwind(AssertUnwindSafe(|| self.prefill(tok, &eos, *job))) {
                    Ok(Ok(seq)) if seq.row.finish.is_none() => batch.push(seq),
                    Ok(Ok(seq)) => seq.finish(),
                    Ok(Err(e)) => {
                        let _ = events.send(Event::Failed(e));
                    }
                    Err(p) => {
                        let _ = events.send(Event::Failed(EngineError::Panic {
                            stage: "reading the prompt",
                            message: panic_text(p),
                        }));
                    }
                }
            }
            self.active.store(batch.len(), Ordering::SeqCst);
            if batch.is_empty() {
                continue;
            }
            let step = std::panic::catch_unwind(AssertUnwindSafe(|| self.decode(&mut batch, &eos)));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(p) => Some(EngineError::Panic {
                    stage: "generating",
                    message: panic_text(p),
                }),
            };
            if let Some(msg) = failure {
                for s in batch.drain(..) {
                    let _ = s.events.send(Event::Failed(msg.clone()));
                }
            }
            let mut keep = Vec::with_capacity(batch.len());
            for s in batch.drain(..) {
                if s.row.finish.is_some() {
                    s.finish();
                } else if s.events.is_closed() {
                    // Client gone: the slot is freed at this token boundary.
                } else {
                    keep.push(s);
                }
            }
            batch = keep;
            self.active.store(batch.len(), Ordering::SeqCst);
        }
        self.active.store(0, Ordering::SeqCst);
    }

    /// Runs a new request's prompt and samples its first token.
    fn prefill<'a>(
        &self,
        tok: &'a crate::Tokenizer,
        eos: &[u32],
        job: Job,
    ) -> Result<Seq<'a>, EngineError> {
        #[cfg(feature = "test-hooks")]
        if let Some(bad) = self.cfg.panic_on_token {
            if job.prompt.contains(&bad) {
                panic!("test hook: prompt contains token {bad}");
            }
        }
        let model = self.model.model();
        let ctx = model.config().max_position_embeddings;
        if job.prompt.is_empty() || job.prompt.len() >= ctx {
            return Err(EngineError::PromptLength {
                tokens: job.prompt.len(),
                context: ctx,
            });
        }
        let req = GenerateRequest {
            prompt: String::new(),
            max_tokens: job.max_tokens,
            stop: job.stop,
            sampling: job.sampling,
            ignore_eos: job.ignore_eos,
            grammar: None, // compiled already: `job.constraint`
            logprobs: job.logprobs,
        };
        let budget = job.max_tokens.min(ctx - job.prompt.len());
        let prompt = &job.prompt;
        let (mut cache, start) = self
            .prefixes
            .borrow()
            .lookup(&job.adapter, prompt)
            .unwrap_or_else(|| (model.new_cache(vec![0]), 0));
        self.reused.fetch_add(start, Ordering::SeqCst);
        let t = prompt.len();
        let whole = t / PREFILL_CHUNK * PREFILL_CHUNK;
        let route = routing(std::iter::once(job.adapter.as_ref()));
        let mut snapshot = None;
        let prefill = || -> flywheel_models::Result<Tensor> {
            let mut pos = start;
            loop {
                let end = (pos + PREFILL_CHUNK).min(t);
                let ids = Tensor::from_slice(&prompt[pos..end], (1, end - pos), model.device())?;
                let out = if end == t {
                    Some(model.forward(&ids, &mut cache, Logits::Last)?)
                } else {
                    model.feed(&ids, &mut cache)?;
                    None
                };
                if end == whole && whole > start {
                    snapshot = Some(cache.clone());
                }
                if let Some(l) = out {
                    return Ok(l);
                }
                pos = end;
            }
        };
        // On a pool thread, with the routing set there (see `flywheel_models::on_pool`).
        let logits = flywheel_models::on_pool(model.device(), || with_routing(route, prefill))
            .map_err(EngineError::model)?;
        if let Some(c) = snapshot {
            self.prefixes
                .borrow_mut()
                .store(job.adapter.clone(), prompt[..whole].to_vec(), c);
        }
        let mut row = RowState::new(tok, job.prompt, &req, budget);
        if let Some(c) = job.constraint {
            row.constrain(c);
        }
        let mut seq = Seq {
            row,
            cache,
            adapter: job.adapter,
            events: job.events,
            next: 0,
        };
        if seq.row.finish.is_none() {
            let mut l = logits
                .squeeze(0)
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(EngineError::model)?;
            let t = seq.row.sample(&mut l).map_err(EngineError::model)?;
            seq.accept(t, eos).map_err(EngineError::model)?;
        }
        Ok(seq)
    }

    /// One decode step for every sequence in the batch.
    fn decode(&self, batch: &mut [Seq], eos: &[u32]) -> Result<(), EngineError> {
        let model = self.model.model();
        let ids: Vec<u32> = batch.iter().map(|s| s.next).collect();
        let route = routing(batch.iter().map(|s| s.adapter.as_ref()));
        {
            // The host step, where the model allows it (quantized layers on the CPU); each
            // row's adapter adds its update on host buffers, as the tensor path would.
            let mut scratch = self.scratch.borrow_mut();
            let stepped = {
                let mut caches: Vec<&mut Cache> = batch.iter_mut().map(|s| &mut s.cache).collect();
                let sc = &mut *scratch;
                let route = route.clone();
                flywheel_models::on_pool(model.device(), || {
                    with_routing(route, || model.decode_into(&ids, &mut caches, sc))
                })
                .map_err(EngineError::model)?
            };
            if stepped {
                let vocab = scratch.vocab();
                for (s, l) in batch
                    .iter_mut()
                    .zip(scratch.logits().chunks_exact_mut(vocab))
                {
                    let t = s.row.sample(l).map_err(EngineError::model)?;
                    s.accept(t, eos).map_err(EngineError::model)?;
                }
                return Ok(());
            }
        }
        let logits = {
            let mut caches: Vec<&mut Cache> = batch.iter_mut().map(|s| &mut s.cache).collect();
            flywheel_models::on_pool(model.device(), || {
                with_routing(route, || model.decode_step(&ids, &mut caches))
            })
            .map_err(EngineError::model)?
        };
        let rows = logits.to_vec2::<f32>().map_err(EngineError::model)?;
        for (s, mut l) in batch.iter_mut().zip(rows) {
            let t = s.row.sample(&mut l).map_err(EngineError::model)?;
            s.accept(t, eos).map_err(EngineError::model)?;
        }
        Ok(())
    }
}
