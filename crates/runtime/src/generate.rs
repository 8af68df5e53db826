//! `TextModel`: a loaded decoder with its tokenizer and chat template, and the one generation
//! loop every caller uses (CLI, server, evaluation, tests). The loop prefills a left-padded
//! batch in one forward pass, decodes with the KV cache, samples per row, stops on EOS, stop
//! strings or length, and streams whole-character text into a [`TokenSink`] per row.

use candle_core::Tensor;
use flywheel_api::{
    ChatMessage, FinishReason, GenerateOutput, GenerateRequest, Grammar, Timings, TokenLogprob,
    TokenSink, Usage,
};
use flywheel_models::{
    DecoderConfig, DecoderModel, GgufWeights, LinearHook, Logits, NoHook, SafetensorsWeights,
};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use crate::chat::ChatTemplate;
use crate::constraint::{Constraint, GrammarCompiler};
use crate::load::{
    read_json_opt, read_text, safetensors_files, LoadOptions, ModelFormat, ModelInfo,
};
use crate::manifest::ModelDefaults;
use crate::sampler::token_logprob;
use crate::sampler::Sampler;
pub use crate::stop::StopScanner;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::{Error, Result};

mod samples;
pub use samples::Samples;

/// Token texts that end a turn in common chat formats; added to the stop set when they are special tokens.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// A decoder model ready to generate.
pub struct TextModel {
    model: DecoderModel,
    tokenizer: Tokenizer,
    chat: Option<ChatTemplate>,
    eos: Vec<u32>,
    info: ModelInfo,
    /// The grammar compiler over this model's token trie, built on first use (or why not).
    grammars: OnceLock<std::result::Result<GrammarCompiler, String>>,
    /// The manifest's defaults (empty when there is no manifest).
    defaults: ModelDefaults,
}

fn json_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextModel {
    /// Resolves `spec` (file, folder or hub id) and loads it.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        Self::load_with_hook(&ModelFormat::resolve(spec)?, opts, &NoHook)
    }

    /// Loads a located model; `hook` wraps each projection (LoRA).
    pub fn load_with_hook(
        fmt: &ModelFormat,
        opts: &LoadOptions,
        hook: &dyn LinearHook,
    ) -> Result<Self> {
        let (mut tm, path) = match fmt {
            ModelFormat::Gguf(p) => (Self::load_gguf(p, opts, hook)?, p),
            ModelFormat::HfFolder(p) => (Self::load_hf(p, opts, hook)?, p),
        };
        tm.defaults = ModelDefaults::for_weights(path)?;
        Ok(tm)
    }

    fn load_gguf(path: &Path, opts: &LoadOptions, hook: &dyn LinearHook) -> Result<Self> {
        let file = path.display().to_string();
        let dtype = opts.resolved_dtype();
        let mut w = GgufWeights::open(path, &opts.device, dtype)?;
        let cfg = DecoderConfig::from_gguf(w.metadata(), &file)?;
        if cfg.arch == flywheel_models::Architecture::Llama {
            w.set_unpermute_qk(cfg.num_heads, cfg.num_kv_heads);
        }
        let tokenizer = Tokenizer::from_gguf(w.metadata(), &file)?;
        let md = w.metadata();
        let tok_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let bos = tok_text(cfg.bos_token_id);
        let mut eos = cfg.eos_token_ids.clone();
        if let Some(e) = md
            .get("tokenizer.ggml.eot_token_id")
            .and_then(|v| v.to_u32().ok())
        {
            eos.push(e);
        }
        let eos_text = tok_text(eos.first().copied());
        let chat = match md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            Some(src) => Some(ChatTemplate::new(
                src,
                &bos,
                &eos_text,
                &format!("{file}: tokenizer.chat_template"),
            )?),
            None => None,
        };
        let mut model = DecoderModel::load(&w, &cfg, hook)?;
        if w.content().tensor_infos.contains_key("rope_freqs.weight") {
            let q = w.content().tensor(
                &mut std::fs::File::open(path).map_err(|e| Error::Io {
                    path: file.clone(),
                    error: e,
                })?,
                "rope_freqs.weight",
                &candle_core::Device::Cpu,
            )?;
            let div = q.dequantize(&candle_core::Device::Cpu)?.to_vec1::<f32>()?;
            model.set_rope_freq_divisors(&div)?;
        }
        let info = ModelInfo {
            path: file,
            format: "gguf".into(),
            parameters: w.parameter_count(),
            tensor_types: w.quant_types(),
            ..Default::default()
        };
        Ok(Self::finish(model, tokenizer, chat, eos, info))
    }

    fn load_hf(dir: &Path, opts: &LoadOptions, hook: &dyn LinearHook) -> Result<Self> {
        let config_path = dir.join("config.json");
        let cfg = DecoderConfig::from_hf_json(
            &read_text(&config_path)?,
            &config_path.display().to_string(),
        )?;
        let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or_default();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::NotAModel {
                path: dir.display().to_string(),
                reason: "no tokenizer.json".into(),
            });
        }
        let bos = json_token(tok_cfg.get("bos_token"));
        let add_bos = tok_cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let tokenizer = Tokenizer::from_hf_file(&tok_path, bos.as_deref(), add_bos)?;
        let eos_text = json_token(tok_cfg.get("eos_token"));
        let mut eos = cfg.eos_token_ids.clone();
        eos.extend(flywheel_models::decoder::json_token_ids(
            gen_cfg.get("eos_token_id"),
        ));
        if let Some(id) = eos_text.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos.push(id);
        }
        let template_src = match tok_cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| {
                    t.get("template")
                        .and_then(|s| s.as_str())
                        .map(str::to_string)
                }),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let chat = match template_src {
            Some(src) => Some(ChatTemplate::new(
                &src,
                bos.as_deref().unwrap_or(""),
                eos_text.as_deref().unwrap_or(""),
                &dir.join("tokenizer_config.json").display().to_string(),
            )?),
            None => None,
        };
        let files = safetensors_files(dir)?;
        let w = SafetensorsWeights::open(&files, &opts.device, opts.resolved_dtype())?;
        let model = DecoderModel::load(&w, &cfg, hook)?;
        let info = ModelInfo {
            path: dir.display().to_string(),
            format: "hf-folder".into(),
            parameters: w.parameter_count(),
            tensor_types: w.dtypes(),
            ..Default::default()
        };
        Ok(Self::finish(model, tokenizer, chat, eos, info))
    }

    fn finish(
        model: DecoderModel,
        tokenizer: Tokenizer,
        chat: Option<ChatTemplate>,
        mut eos: Vec<u32>,
        mut info: ModelInfo,
    ) -> Self {
        for t in END_OF_TURN {
            if let Some(&id) = tokenizer.special_tokens().get(*t) {
                eos.push(id);
            }
        }
        eos.sort_unstable();
        eos.dedup();
        let cfg = model.config();
        info.architecture = cfg.arch.name().into();
        info.context_length = cfg.max_position_embeddings;
        info.hidden_size = cfg.hidden_size;
        info.layers = cfg.num_layers;
        info.heads = (cfg.num_heads, cfg.num_kv_heads);
        info.vocab_size = cfg.vocab_size;
        info.tokenizer = tokenizer.kind().to_string();
        info.eos_tokens = eos
            .iter()
            .map(|&i| tokenizer.id_to_token(i).unwrap_or_else(|| i.to_string()))
            .collect();
        info.chat_template = chat.as_ref().map(|c| c.source().to_string());
        info.warnings = tokenizer.warnings().to_vec();
        Self {
            model,
            tokenizer,
            chat,
            eos,
            info,
            grammars: OnceLock::new(),
            defaults: ModelDefaults::default(),
        }
    }

    /// The defaults of the model's manifest (system prompt, sampling, stop strings).
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// What the model is.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The decoder.
    pub fn model(&self) -> &DecoderModel {
        &self.model
    }

    /// The end-of-generation token ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The grammar compiler over this model's tokenizer (built on the first call, about 0.4 s
    /// for a 152k vocabulary in a release build, then kept).
    pub fn grammar_compiler(&self) -> Result<&GrammarCompiler> {
        self.grammars
            .get_or_init(|| {
                let width = self.model.config().vocab_size;
                GrammarCompiler::new(&self.tokenizer, width, &self.eos).map_err(|e| match e {
                    Error::Tokenizer { reason, .. } => reason,
                    e => e.to_string(),
                })
            })
            .as_ref()
            .map_err(|reason| Error::Tokenizer {
                file: "(constrained decoding)".into(),
                reason: reason.clone(),
            })
    }

    /// Compiles a grammar into a matcher for one row ([`RowState::constrain`], or an engine
    /// `Job`'s `constraint`). A grammar that does not compile is [`Error::Grammar`], naming its
    /// kind and llguidance's reason.
    pub fn compile_grammar(&self, grammar: &Grammar) -> Result<Constraint> {
        self.grammar_compiler()?.compile(grammar)
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders chat messages with the model's template, ready for the assistant's reply.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let chat = self.chat.as_ref().ok_or_else(|| Error::NoChatTemplate {
            model: self.info.path.clone(),
        })?;
        chat.render(messages, true)
    }

    /// Tokenizes a prompt: raw prompts get the model's BOS; a rendered chat already carries it.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        // A prompt that already starts with the BOS text (a rendered chat template) gets no second BOS.
        self.tokenizer.encode(prompt, !self.starts_with_bos(prompt))
    }

    fn starts_with_bos(&self, prompt: &str) -> bool {
        self.tokenizer
            .bos_id()
            .and_then(|b| self.tokenizer.id_to_token(b))
            .is_some_and(|b| !b.is_empty() && prompt.starts_with(&b))
    }

    /// Generates for one request, streaming into `sink`.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        sink: &mut dyn TokenSink,
    ) -> Result<GenerateOutput> {
        let ids = self.encode_prompt(&req.prompt)?;
        let mut out = self.generate_ids(&[(ids, req)], &mut [sink])?;
        Ok(out.remove(0))
    }

    /// Generates for several requests at once (one left-padded batch), without streaming.
    pub fn generate_batch(&self, reqs: &[GenerateRequest]) -> Result<Vec<GenerateOutput>> {
        let items: Vec<(Vec<u32>, &GenerateRequest)> = reqs
            .iter()
            .map(|r| Ok((self.encode_prompt(&r.prompt)?, r)))
            .collect::<Result<_>>()?;
        let mut sinks: Vec<flywheel_api::NullSink> =
            reqs.iter().map(|_| flywheel_api::NullSink).collect();
        let mut refs: Vec<&mut dyn TokenSink> =
            sinks.iter_mut().map(|s| s as &mut dyn TokenSink).collect();
        self.generate_ids(&items, &mut refs)
    }

    /// A prompt must be non-empty and leave room in the context window.
    fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        let ctx = self.model.config().max_position_embeddings;
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if ids.len() >= ctx {
            return Err(Error::PromptTooLong {
                tokens: ids.len(),
                context: ctx,
            });
        }
        Ok(())
    }

    /// The model's next-token logits after each prompt (prompts run in left-padded batches of
    /// `batch_size`). Used to score answers such as "yes"/"no" without generating.
    pub fn next_token_logits(
        &self,
        prompts: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(prompts.len());
        for group in prompts.chunks(batch_size.max(1)) {
            for ids in group {
                self.check_prompt(ids)?;
            }
            let longest = group.iter().map(Vec::len).max().unwrap_or(0);
            let pads: Vec<usize> = group.iter().map(|ids| longest - ids.len()).collect();
            let mut flat = Vec::with_capacity(group.len() * longest);
            for (ids, &pad) in group.iter().zip(&pads) {
                flat.extend(std::iter::repeat_n(0u32, pad));
                flat.extend_from_slice(ids);
            }
            let mut cache = self.model.new_cache(pads);
            let input = Tensor::from_vec(flat, (group.len(), longest), self.model.device())?;
            let logits = flywheel_models::on_pool(self.model.device(), || {
                self.model.forward(&input, &mut cache, Logits::Last)
            })?;
            out.extend(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// The generation loop over pre-tokenized prompts: one batched prefill, then one decode
    /// step per token for every unfinished row.
    pub fn generate_ids(
        &self,
        items: &[(Vec<u32>, &GenerateRequest)],
        sinks: &mut [&mut dyn TokenSink],
    ) -> Result<Vec<GenerateOutput>> {
        let ctx = self.model.config().max_position_embeddings;
        let mut constraints = Vec::with_capacity(items.len());
        for (ids, req) in items {
            check_request(req)?;
            self.check_prompt(ids)?;
            constraints.push(
                req.grammar
                    .as_ref()
                    .map(|g| self.compile_grammar(g))
                    .transpose()?,
            );
        }
        let longest = items.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let pads: Vec<usize> = items.iter().map(|(ids, _)| longest - ids.len()).collect();
        let mut flat = Vec::with_capacity(items.len() * longest);
        for ((ids, _), &pad) in items.iter().zip(&pads) {
            flat.extend(std::iter::repeat_n(0u32, pad));
            flat.extend_from_slice(ids);
        }
        let device = self.model.device();
        let mut rows: Vec<RowState> = items
            .iter()
            .zip(constraints)
            .map(|((ids, req), constraint)| {
                let mut row = RowState::new(
                    &self.tokenizer,
                    ids.clone(),
                    req,
                    req.max_tokens.min(ctx - longest),
                );
                if let Some(c) = constraint {
                    row.constrain(c);
                }
                row
            })
            .collect();
        let mut cache = self.model.new_cache(pads);
        let t0 = Instant::now();
        let input = Tensor::from_vec(flat, (items.len(), longest), device)?;
        // Each forward pass runs on a pool thread (see `flywheel_models::on_pool`).
        let forward = |input: &Tensor, cache: &mut flywheel_models::Cache| {
            flywheel_models::on_pool(device, || self.model.forward(input, cache, Logits::Last))
        };
        let logits = forward(&input, &mut cache)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        // Decode: the host step (no tensors, nothing allocated per token) where the model and
        // cache allow it, the tensor path otherwise. Room for every token is reserved up front.
        let budget = rows.iter().map(|r| r.budget()).max().unwrap_or(0);
        cache.reserve(budget);
        let vocab = logits.dim(1)?;
        let mut tensor_logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let mut scratch = flywheel_models::DecodeScratch::default();
        let mut on_host = false;
        let mut next = Vec::with_capacity(rows.len());
        loop {
            let all: &mut [f32] = if on_host {
                scratch.logits()
            } else {
                &mut tensor_logits
            };
            next.clear();
            for (i, (row, l)) in rows.iter_mut().zip(all.chunks_exact_mut(vocab)).enumerate() {
                if row.finish.is_some() {
                    next.push(*row.history.last().expect("prompt is not empty"));
                    continue;
                }
                let tok = row.sample(l)?;
                next.push(tok);
                row.step(tok, &self.eos, &mut *sinks[i])?;
            }
            if rows.iter().all(|r| r.finish.is_some()) {
                break;
            }
            let (model, c, sc, ids) = (&self.model, &mut cache, &mut scratch, &next);
            on_host =
                flywheel_models::on_pool(device, move || model.decode_into(ids, &mut [c], sc))?;
            if !on_host {
                let input = Tensor::from_slice(&next, (rows.len(), 1), device)?;
                tensor_logits = forward(&input, &mut cache)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
            }
        }
        let decode_s = t1.elapsed().as_secs_f64();
        let timings = Timings {
            prefill_s,
            decode_s,
        };
        Ok(rows.into_iter().map(|r| r.output(timings)).collect())
    }
}

/// A request's sampling settings and log-probability count are in range.
fn check_request(req: &GenerateRequest) -> Result<()> {
    req.sampling.validate()?;
    if req
        .logprobs
        .is_some_and(|n| n > flywheel_api::MAX_TOP_LOGPROBS)
    {
        return Err(flywheel_api::ApiError::InvalidField {
            field: "logprobs",
            reason: format!("at most {} alternatives", flywheel_api::MAX_TOP_LOGPROBS),
        }
        .into());
    }
    Ok(())
}

/// One sequence being generated: its sampler, detokenizer, stop strings and token budget.
/// The generation loop here and the server's continuous-batching engine both drive it.
pub struct RowState<'a> {
    /// Prompt and generated tokens (the repeat penalty looks at them).
    pub history: Vec<u32>,
    /// Tokens in the prompt.
    pub prompt_len: usize,
    budget: usize,
    sampler: Sampler,
    /// The grammar the output must follow, if any.
    constraint: Option<Constraint>,
    detok: IncrementalDecoder<'a>,
    stop: StopScanner,
    /// Generated tokens so far.
    pub tokens: Vec<u32>,
    /// Why generation ended, once it has.
    pub finish: Option<FinishReason>,
    ignore_eos: bool,
    /// Alternatives per token to report, when log-probabilities are asked for.
    top_logprobs: Option<usize>,
    /// The log-probability of the token just sampled, until `step` records it.
    pending: Option<TokenLogprob>,
    logprobs: Vec<TokenLogprob>,
    /// A constrained row's output has looped (see [`RowState::sample`]).
    looped: bool,
}

impl<'a> RowState<'a> {
    /// A sequence for `prompt` under `req`'s sampling, stop strings and EOS policy, generating
    /// at most `budget` tokens (`req.max_tokens` already capped by the context).
    pub fn new(tok: &'a Tokenizer, prompt: Vec<u32>, req: &GenerateRequest, budget: usize) -> Self {
        let finish = (budget == 0).then_some(FinishReason::Length);
        Self {
            prompt_len: prompt.len(),
            history: prompt,
            budget,
            sampler: Sampler::new(req.sampling.clone()),
            constraint: None,
            detok: IncrementalDecoder::new(tok),
            stop: StopScanner::new(&req.stop),
            tokens: vec![],
            finish,
            ignore_eos: req.ignore_eos,
            top_logprobs: req.logprobs,
            pending: None,
            logprobs: vec![],
            looped: false,
        }
    }

    /// Constrains the rest of this row's output to a grammar (compiled by the model that
    /// generates it: [`TextModel::compile_grammar`]).
    pub fn constrain(&mut self, constraint: Constraint) {
        if constraint.is_finished() {
            // The grammar admits only the empty output (or its matcher failed to start).
            self.finish.get_or_insert(FinishReason::Stop);
        }
        self.constraint = Some(constraint);
    }

    /// The row's grammar matcher, if it is constrained.
    pub fn constraint(&self) -> Option<&Constraint> {
        self.constraint.as_ref()
    }

    /// Picks the next token from this row's logits (which it may change).
    ///
    /// A constrained row samples as usual and keeps the token when the grammar allows it;
    /// only when it does not is the mask computed, every refused logit set to -inf, and the
    /// token drawn again. That draws from the masked distribution exactly (greedy gives the
    /// unconstrained token whenever it is allowed). Top-k, top-p and min-p rank tokens
    /// against each other, so with them the mask is applied before the draw instead, and so it
    /// is when log-probabilities are asked for: they are read from the masked distribution.
    ///
    /// A constrained row does not continue a verbatim loop (see
    /// [`loop_continuation`](crate::constraint::loop_continuation)) when the grammar allows
    /// another token: small models otherwise fill a JSON string or number with one phrase
    /// until `max_tokens`, where no end-of-sequence token can rescue them.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32> {
        let tok = self.choose(logits)?;
        if let Some(n) = self.top_logprobs {
            self.pending = Some(token_logprob(logits, tok, n));
        }
        Ok(tok)
    }

    /// The log-probability of the token [`sample`](Self::sample) just chose, if asked for.
    pub fn pending_logprob(&self) -> Option<&TokenLogprob> {
        self.pending.as_ref()
    }

    fn choose(&mut self, logits: &mut [f32]) -> Result<u32> {
        let Some(c) = self.constraint.as_mut() else {
            return Ok(self.sampler.sample(logits, &self.history));
        };
        self.sampler.penalize(logits, &self.history);
        // A verbatim loop is not continued while the grammar allows anything else, and once
        // one was seen, the tokens of the recent output are penalised for the rest of the row.
        let generated = &self.history[self.prompt_len..];
        let cont = crate::constraint::loop_continuation(generated);
        self.looped |= cont.is_some();
        if self.looped {
            // A repeat penalty of 1.5 over the row's last 32 tokens.
            crate::sampler::repeat_penalty(logits, generated, 32, 1.5);
        }
        let looping = cont.filter(|&t| (t as usize) < logits.len()).map(|t| {
            (
                t,
                std::mem::replace(&mut logits[t as usize], f32::NEG_INFINITY),
            )
        });
        if !self.sampler.truncates() && self.top_logprobs.is_none() {
            let tok = self.sampler.pick(logits);
            if logits[tok as usize].is_finite() && c.allows(tok)? {
                return Ok(tok);
            }
        }
        c.mask_logits(logits)?;
        if let Some((t, l)) = looping.filter(|_| logits.iter().all(|l| !l.is_finite())) {
            logits[t as usize] = l;
            return Ok(t); // the grammar allows nothing but the loop
        }
        Ok(self.sampler.pick(logits))
    }

    /// The most tokens this row may still generate in all.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The accepted output text so far (stop strings removed).
    pub fn text(&self) -> &str {
        &self.stop.text
    }

    /// The result of a finished row.
    pub fn output(self, timings: Timings) -> GenerateOutput {
        GenerateOutput {
            text: self.stop.text,
            usage: Usage {
                prompt_tokens: self.prompt_len,
                completion_tokens: self.tokens.len(),
            },
            tokens: self.tokens,
            finish_reason: self.finish.unwrap_or(FinishReason::Cancelled),
            timings,
            logprobs: self.top_logprobs.map(|_| self.logprobs),
        }
    }

    /// Accepts token `tok`: streams its text into `sink` and decides whether the row is done
    /// (EOS, a stop string, the budget, or the sink cancelling).
    ///
    /// A constrained row also feeds the token to its matcher, and ends (`stop`) once the
    /// grammar admits nothing more; the budget running out first still ends it with `length`.
    pub fn step(&mut self, tok: u32, eos: &[u32], sink: &mut dyn TokenSink) -> Result<()> {
        if self.top_logprobs.is_some() {
            let lp = self.pending.take();
            self.logprobs.push(lp.unwrap_or_else(|| TokenLogprob {
                token: tok,
                logprob: f32::NAN,
                top: vec![],
            }));
        }
        self.tokens.push(tok);
        self.history.push(tok);
        let grammar_done = match self.constraint.as_mut() {
            Some(c) => {
                c.consume(tok)?;
                c.is_finished()
            }
            None => false,
        };
        if !self.ignore_eos && eos.contains(&tok) {
            let tail = self.detok.flush()?;
            let emit = self.stop.finish(&tail);
            self.emit(&emit, tok, sink);
            self.finish.get_or_insert(FinishReason::Stop);
            return Ok(());
        }
        let piece = self.detok.push(tok)?;
        let (emit, stopped) = self.stop.push(&piece);
        self.emit(&emit, tok, sink);
        if stopped {
            self.finish.get_or_insert(FinishReason::Stop);
        } else if grammar_done || self.tokens.len() >= self.budget {
            let tail = self.detok.flush()?;
            let emit = self.stop.finish(&tail);
            self.emit(&emit, tok, sink);
            let why = if grammar_done {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            self.finish.get_or_insert(why);
        }
        Ok(())
    }

    fn emit(&mut self, text: &str, tok: u32, sink: &mut dyn TokenSink) {
        if self.finish.is_none() && sink.on_text(text, tok) == ControlFlow::Break(()) {
            self.finish = Some(FinishReason::Cancelled);
        }
    }
}
