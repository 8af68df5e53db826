//! `flywheel`: the command line. It parses arguments, resolves them into library options and
//! calls one library function per subcommand; errors print once and exit non-zero.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flywheel_api::{ChatMessage, GenerateRequest, SamplingParams, TokenSink};
use flywheel_runtime::{
    parse_device, parse_dtype, EmbeddingModel, LoadOptions, ModelFormat, TextModel,
};
use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;

mod eval;
mod progress;
mod rag;

#[derive(Parser)]
#[command(
    name = "flywheel",
    version,
    about = "Local LLM runtime: generate, chat, embed, LoRA training and merging, an OpenAI-compatible server, retrieval (RAG) and evaluation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a model's architecture, parameters, quantization, context length and chat template.
    Info {
        /// A GGUF file, a model folder, or a hub id (owner/name).
        model: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt (streams to stdout).
    Generate(GenerateArgs),
    /// Chat interactively (/reset clears the history, /system TEXT sets the system prompt, /quit exits).
    Chat(ChatArgs),
    /// Embed sentences from stdin (one per line) into JSONL vectors on stdout.
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// Sentences per batch.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
    },
    /// Show the token ids and pieces of a text.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// The text (special-token markup such as <|im_start|> is recognised).
        text: String,
        /// Print a JSON array of ids only.
        #[arg(long)]
        json: bool,
    },
    /// Train a LoRA adapter from a TOML recipe (see recipes/README.md). Ctrl-C saves a checkpoint.
    LoraTrain {
        /// The recipe file.
        recipe: String,
        /// Continue from the newest checkpoint in the run folder.
        #[arg(long)]
        resume: bool,
        /// Load the model and data, print what the run would do, and exit without training.
        #[arg(long)]
        dry_run: bool,
        /// CPU threads (default: physical cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Fold a LoRA adapter into its base model and write a Hugging Face folder.
    Merge {
        /// The base model: GGUF file, folder or hub id.
        #[arg(long, short)]
        model: String,
        /// The adapter folder.
        #[arg(long)]
        adapter: String,
        /// The output folder (must not exist).
        #[arg(long)]
        out: String,
        /// Weight dtype of the merged folder: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Serve an OpenAI-compatible endpoint; requests pick an adapter by `model` name.
    Serve(ServeArgs),
    /// Retrieval: index documents, search, answer with citations, evaluate.
    #[command(subcommand)]
    Rag(rag::RagCmd),
    /// Evaluate configurations of a task (the optimization ladder) and compare runs.
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// Measure prefill and decode speed (used by scripts/bench-generate.sh); prints one JSON line.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Treat the model as an embedder and embed the lines of this file instead.
        #[arg(long)]
        embed_file: Option<String>,
        /// Sequences per batch: generated together, each from the same prompt, with tokens/s
        /// summed over them (default 1); or sentences per batch with --embed-file (default 32).
        #[arg(long)]
        batch_size: Option<usize>,
    },
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// The base model: GGUF file, folder or hub id.
    #[arg(long, short)]
    model: String,
    /// The name requests use for the base model (default: the folder or file name).
    #[arg(long)]
    name: Option<String>,
    /// An adapter to serve, as NAME=FOLDER (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// The only folder `POST /v1/adapters` may load from (run-time loading is off without it).
    #[arg(long)]
    adapters_dir: Option<String>,
    /// A sentence-embedding model folder for /v1/embeddings.
    #[arg(long)]
    embedding_model: Option<String>,
    /// A retrieval store (`flywheel rag index`): chat requests with a `retrieval` object get
    /// its passages as context and the response lists them as `sources`.
    #[arg(long, value_name = "STORE")]
    rag: Option<std::path::PathBuf>,
    /// Address to bind (127.0.0.1 keeps the server local).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the URL printed at startup has it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (default: the FLYWHEEL_API_KEY variable, if set).
    #[arg(long)]
    api_key: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Most requests waiting for a slot; more get HTTP 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_s: u64,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// CPU threads for compute (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A GGUF file, a model folder, or a hub id (owner/name).
    #[arg(long, short)]
    model: String,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// CPU threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// A LoRA adapter folder (Hugging Face PEFT layout) applied on top of the model.
    #[arg(long)]
    adapter: Option<String>,
}

impl ModelArgs {
    fn options(&self) -> Result<LoadOptions> {
        load_options(&self.device, self.dtype.as_deref(), self.threads)
    }

    fn load_text(&self) -> Result<TextModel> {
        let opts = self.options()?;
        let Some(dir) = &self.adapter else {
            return TextModel::load(&self.model, &opts)
                .with_context(|| format!("cannot load model `{}`", self.model));
        };
        let adapter = flywheel_peft::Adapter::load(
            std::path::Path::new(dir),
            &opts.device,
            opts.resolved_dtype(),
        )?;
        let hook = flywheel_peft::LoraHook::for_config(&adapter.config);
        let tm = TextModel::load_with_hook(&ModelFormat::resolve(&self.model)?, &opts, &hook)
            .with_context(|| format!("cannot load model `{}`", self.model))?;
        hook.install(&adapter)
            .with_context(|| format!("adapter {dir} does not fit model `{}`", self.model))?;
        Ok(tm)
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Minimum probability relative to the top token.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Repeat penalty over the last 64 tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn request(&self, prompt: String) -> Result<GenerateRequest> {
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self.seed,
        };
        sampling.validate()?;
        Ok(GenerateRequest {
            prompt,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            sampling,
            ignore_eos: false,
            grammar: None,
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt ("-" reads stdin).
    #[arg(long, short)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print a JSON summary (text, tokens, finish reason, usage, speed) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Print speed figures to stderr after the text.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Streams text to stdout as it arrives.
struct Printer;

impl TokenSink for Printer {
    fn on_text(&mut self, piece: &str, _token: u32) -> ControlFlow<()> {
        let mut out = std::io::stdout().lock();
        if out
            .write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return ControlFlow::Break(()); // stdout closed (e.g. piped into head)
        }
        ControlFlow::Continue(())
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info { model, json } => info(&model, json),
        Cmd::Generate(a) => generate(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Embed { model, batch_size } => embed(&model, batch_size),
        Cmd::Tokenize { model, text, json } => tokenize(&model, &text, json),
        Cmd::LoraTrain {
            recipe,
            resume,
            dry_run,
            threads,
        } => {
            if threads == Some(0) {
                bail!("--threads must be at least 1");
            }
            flywheel_runtime::threads::single_malloc_arena();
            flywheel_runtime::threads::configure(threads);
            lora_train(&recipe, resume, dry_run)
        }
        Cmd::Merge {
            model,
            adapter,
            out,
            dtype,
        } => {
            let s = flywheel_train::merge::merge(
                &model,
                std::path::Path::new(&adapter),
                std::path::Path::new(&out),
                parse_dtype(&dtype)?,
            )?;
            eprintln!(
                "merged {} projections; wrote {} tensors to {}",
                s.merged_modules,
                s.tensors,
                s.out.display()
            );
            Ok(())
        }
        Cmd::Serve(a) => serve(a),
        Cmd::Rag(c) => rag::run(c),
        Cmd::Eval(c) => eval::run(c),
        Cmd::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            repeats,
            embed_file,
            batch_size,
        } => match embed_file {
            Some(f) => bench_embed(&model, &f, batch_size.unwrap_or(32), repeats),
            None => bench_generate(
                &model,
                prompt_tokens,
                gen_tokens,
                repeats,
                batch_size.unwrap_or(1),
            ),
        },
    }
}

/// The compute pool's size as configured (for bench output).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(flywheel_runtime::threads::default_threads)
}

/// Device, dtype and CPU threads from the command line.
fn load_options(device: &str, dtype: Option<&str>, threads: Option<usize>) -> Result<LoadOptions> {
    if threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    // Physical cores unless told otherwise; candle reads the same variable as rayon.
    flywheel_runtime::threads::configure(threads);
    Ok(LoadOptions {
        device: parse_device(device)?,
        dtype: dtype.map(parse_dtype).transpose()?,
    })
}

fn serve(a: ServeArgs) -> Result<()> {
    let load = load_options(&a.device, a.dtype.as_deref(), a.threads)?;
    let mut cfg = flywheel_serve::ServeConfig::new(&a.model);
    cfg.name = a.name;
    for spec in &a.adapters {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--adapter {spec}: expected NAME=FOLDER");
        };
        cfg.adapters.push((name.to_string(), dir.into()));
    }
    cfg.adapters_dir = a.adapters_dir.map(Into::into);
    cfg.embedding_model = a.embedding_model;
    cfg.rag = a.rag;
    cfg.load = load;
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    cfg.engine.max_batch = a.max_batch;
    cfg.engine.max_queue = a.max_queue;
    cfg.api_key = a
        .api_key
        .or_else(|| std::env::var("FLYWHEEL_API_KEY").ok())
        .filter(|k| !k.is_empty());
    cfg.max_body_bytes = a.max_body_bytes;
    cfg.shutdown_grace = std::time::Duration::from_secs(a.shutdown_grace_s);
    eprintln!("loading {} ...", a.model);
    let state = flywheel_serve::build_state(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        let adapters = state.registry.names();
        eprintln!(
            "model `{}`; adapters: {}{}",
            state.name,
            if adapters.is_empty() {
                "none".to_string()
            } else {
                adapters.join(", ")
            },
            match state.registry.dir() {
                Some(d) => format!("; run-time loads from {}", d.display()),
                None => String::new(),
            }
        );
        if let Some((name, _)) = &state.embedder {
            eprintln!("embedding model `{name}`");
        }
        println!("flywheel serve: listening on http://{addr}");
        std::io::stdout().flush()?;
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
            eprintln!("shutting down: finishing running requests ...");
        };
        flywheel_serve::serve(listener, state, shutdown, cfg.shutdown_grace).await?;
        eprintln!("stopped");
        Ok::<_, anyhow::Error>(())
    })
}

fn is_embedder(spec: &str) -> bool {
    match ModelFormat::resolve(spec) {
        Ok(ModelFormat::HfFolder(dir)) => std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("model_type")
                    .and_then(|m| m.as_str())
                    .map(|m| m.contains("bert"))
            })
            .unwrap_or(false),
        _ => false,
    }
}

fn info(model: &str, json: bool) -> Result<()> {
    let opts = LoadOptions::default();
    let info = if is_embedder(model) {
        EmbeddingModel::load(model, &opts)?.info().clone()
    } else {
        TextModel::load(model, &opts)
            .with_context(|| format!("cannot load model `{model}`"))?
            .info()
            .clone()
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{info}");
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let prompt = if a.prompt == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the prompt from stdin")?
    } else {
        a.prompt.clone()
    };
    let req_check = a.sampling.request(String::new())?; // validate flags before loading the model
    let tm = a.model.load_text()?;
    let prompt = if a.chat {
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", prompt));
        tm.render_chat(&msgs)?
    } else {
        prompt
    };
    let req = GenerateRequest {
        prompt,
        ..req_check
    };
    let out = if a.json {
        tm.generate(&req, &mut flywheel_api::NullSink)?
    } else {
        let out = tm.generate(&req, &mut Printer)?;
        println!();
        out
    };
    let speed = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    if a.json {
        let v = serde_json::json!({
            "text": out.text,
            "tokens": out.tokens,
            "finish_reason": out.finish_reason,
            "usage": out.usage,
            "prefill_tok_s": speed(out.usage.prompt_tokens, out.timings.prefill_s),
            "decode_tok_s": speed(out.usage.completion_tokens.saturating_sub(1), out.timings.decode_s),
        });
        println!("{v}");
    } else if a.stats {
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} generated, {:.1} tok/s; finish: {:?}]",
            out.usage.prompt_tokens,
            speed(out.usage.prompt_tokens, out.timings.prefill_s),
            out.usage.completion_tokens,
            speed(
                out.usage.completion_tokens.saturating_sub(1),
                out.timings.decode_s
            ),
            out.finish_reason
        );
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    a.sampling.request(String::new())?;
    let tm = a.model.load_text()?;
    let interactive = std::io::stdin().is_terminal();
    let mut system = a.system.clone();
    let mut history: Vec<ChatMessage> = vec![];
    if interactive {
        eprintln!(
            "flywheel chat — {} ({}). /reset, /system TEXT, /quit",
            tm.info().path,
            tm.info().architecture
        );
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                eprintln!("[history cleared]");
                continue;
            }
            s if s.starts_with("/system") => {
                let text = s["/system".len()..].trim();
                system = (!text.is_empty()).then(|| text.to_string());
                history.clear();
                eprintln!(
                    "[system prompt {}; history cleared]",
                    if system.is_some() { "set" } else { "removed" }
                );
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let mut msgs = vec![];
        if let Some(s) = &system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.extend(history.iter().cloned());
        let req = a.sampling.request(tm.render_chat(&msgs)?)?;
        match tm.generate(&req, &mut Printer) {
            Ok(out) => {
                println!();
                history.push(ChatMessage::new("assistant", out.text));
            }
            Err(e) => {
                // Keep the session: drop the turn that failed (e.g. the context is full).
                history.pop();
                eprintln!("error: {e}");
                if !interactive {
                    return Err(e.into());
                }
            }
        }
    }
    Ok(())
}

fn embed(m: &ModelArgs, batch_size: usize) -> Result<()> {
    if m.adapter.is_some() {
        bail!("--adapter applies to decoder models, not embedders");
    }
    let em = EmbeddingModel::load(&m.model, &m.options()?)
        .with_context(|| format!("cannot load embedder `{}`", m.model))?;
    let lines: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .collect::<std::io::Result<_>>()
        .context("reading stdin")?;
    let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
    let bar = indicatif::ProgressBar::new(texts.len() as u64);
    if texts.len() < 256 || !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (ci, chunk) in texts.chunks(batch_size.max(1) * 8).enumerate() {
        let vecs = em.embed_all(chunk, batch_size)?;
        for (j, (t, v)) in chunk.iter().zip(vecs).enumerate() {
            let rec = serde_json::json!({"index": ci * batch_size.max(1) * 8 + j, "text": t, "embedding": v});
            writeln!(out, "{rec}")?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    out.flush()?;
    Ok(())
}

fn tokenize(m: &ModelArgs, text: &str, json: bool) -> Result<()> {
    let tm = m.load_text()?;
    let ids = tm.tokenizer().encode(text, false)?;
    if json {
        println!("{}", serde_json::to_string(&ids)?);
        return Ok(());
    }
    for id in &ids {
        let piece = tm.tokenizer().decode(&[*id], false)?;
        println!("{id:>8}  {piece:?}");
    }
    eprintln!("{} tokens", ids.len());
    Ok(())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const BENCH_TEXT: &str = "The history of computing is a story of abstraction layered upon abstraction. \
Early machines were programmed by rewiring panels; later, stored programs let the same hardware run many tasks. \
Compilers translated human-readable code into instructions, operating systems shared the processor among programs, \
and networks connected machines across the world. Each step hid complexity below and exposed new possibilities above. ";

fn bench_generate(
    m: &ModelArgs,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeats: usize,
    batch: usize,
) -> Result<()> {
    anyhow::ensure!(batch >= 1, "--batch-size must be at least 1");
    let tm = m.load_text()?;
    let mut text = String::new();
    let mut ids = vec![];
    while ids.len() < prompt_tokens {
        text.push_str(BENCH_TEXT);
        ids = tm.tokenizer().encode(&text, false)?;
    }
    ids.truncate(prompt_tokens);
    // Like llama-bench: greedy, and EOS does not end the run, so every repeat decodes gen_tokens.
    let mut req = GenerateRequest::new(String::new(), gen_tokens);
    req.sampling = SamplingParams::greedy();
    req.ignore_eos = true;
    let (mut pre, mut dec, mut produced) = (vec![], vec![], 0);
    let requests: Vec<(Vec<u32>, &GenerateRequest)> =
        (0..batch).map(|_| (ids.clone(), &req)).collect();
    for _ in 0..repeats.max(1) {
        let mut sinks: Vec<flywheel_api::NullSink> =
            (0..batch).map(|_| flywheel_api::NullSink).collect();
        let mut sinks: Vec<&mut dyn flywheel_api::TokenSink> = sinks
            .iter_mut()
            .map(|s| s as &mut dyn flywheel_api::TokenSink)
            .collect();
        let outs = tm.generate_ids(&requests, &mut sinks)?;
        // The sequences share one prefill and one decode loop: the first one's timings are the
        // batch's.
        let t = &outs[0].timings;
        pre.push((batch * ids.len()) as f64 / t.prefill_s);
        produced = outs[0].usage.completion_tokens;
        let decoded: usize = outs
            .iter()
            .map(|o| o.usage.completion_tokens.saturating_sub(1).max(1))
            .sum();
        dec.push(decoded as f64 / t.decode_s.max(1e-9));
    }
    let v = serde_json::json!({
        "engine": "flywheel",
        "model": m.model,
        "threads": rayon_threads(),
        "device": m.device,
        "batch": batch,
        "prompt_tokens": ids.len(),
        "generated_tokens": produced,
        "prefill_tok_s": median(pre),
        "decode_tok_s": median(dec),
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{v}");
    Ok(())
}

fn bench_embed(m: &ModelArgs, file: &str, batch_size: usize, repeats: usize) -> Result<()> {
    let em = EmbeddingModel::load(&m.model, &m.options()?)?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let lines: Vec<&str> = text.lines().collect();
    em.embed_all(&lines[..lines.len().min(batch_size)], batch_size)?; // warm-up
    let mut rates = vec![];
    for _ in 0..repeats.max(1) {
        let t = std::time::Instant::now();
        em.embed_all(&lines, batch_size)?;
        rates.push(lines.len() as f64 / t.elapsed().as_secs_f64());
    }
    let v = serde_json::json!({
        "engine": "flywheel",
        "model": m.model,
        "sentences": lines.len(),
        "sentences_per_s": median(rates),
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{v}");
    Ok(())
}

fn lora_train(recipe_path: &str, resume: bool, dry_run: bool) -> Result<()> {
    use flywheel_train::TrainEvent;
    use indicatif::{ProgressBar, ProgressStyle};
    let recipe = flywheel_train::Recipe::load(std::path::Path::new(recipe_path))?;
    eprintln!("loading {} and the data ...", recipe.model.path);
    let mut trainer = flywheel_train::Trainer::new(recipe, resume)?;
    if dry_run {
        let s = trainer.data_stats();
        println!(
            "{}",
            serde_json::json!({
                "train_examples": trainer.train_examples().len(),
                "train_tokens": s.tokens,
                "answer_tokens": s.target_tokens,
                "dropped_overlong": s.dropped_overlong,
                "truncated": s.truncated,
                "valid_examples": trainer.valid_count(),
                "trainable_parameters": trainer.adapter().parameter_count(),
                "adapted_modules": trainer.adapter().params.len(),
                "total_steps": trainer.total_steps(),
                "start_step": trainer.step(),
            })
        );
        return Ok(());
    }
    let stop = trainer.stop_flag();
    let presses = std::sync::atomic::AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    let bar = ProgressBar::hidden();
    let mut ticker = progress::Ticker::new(progress::PLAIN_EVERY);
    let started = std::time::Instant::now();
    let mut observer = |e: &TrainEvent| match e {
        TrainEvent::Started {
            total_steps,
            start_step,
            trainable,
            train,
            valid_examples,
        } => {
            eprintln!(
                "{} training examples ({} tokens, {} answer tokens; {} dropped, {} truncated for length), {} validation; {} trainable parameters; {} steps{}",
                train.kept,
                train.tokens,
                train.target_tokens,
                train.dropped_overlong,
                train.truncated,
                valid_examples,
                trainable,
                total_steps,
                if *start_step > 0 { format!(", resuming at step {start_step}") } else { String::new() }
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(*total_steps as u64);
            bar.set_position(*start_step as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("valid template"),
            );
        }
        TrainEvent::Step(m) => {
            let msg = format!(
                "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s",
                m.loss, m.lr, m.grad_norm, m.tokens_per_s
            );
            bar.set_position(m.step as u64);
            let last = bar.length().is_some_and(|n| m.step as u64 >= n);
            if ticker.due(&bar, last) {
                eprintln!(
                    "step {}/{} {msg} ({} elapsed)",
                    m.step,
                    bar.length().unwrap_or(0),
                    indicatif::HumanDuration(started.elapsed())
                );
            }
            bar.set_message(msg);
        }
        TrainEvent::Eval { step, loss } => {
            progress::say(&bar, format!("step {step}: eval loss {loss:.4}"));
        }
        TrainEvent::Checkpoint { step, path } => {
            progress::say(&bar, format!("step {step}: checkpoint {}", path.display()));
        }
    };
    let s = trainer.run(&mut observer, None)?;
    bar.finish_and_clear();
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    if s.interrupted {
        eprintln!(
            "stopped at step {}/{}; continue with: flywheel lora-train {recipe_path} --resume",
            s.steps, s.total_steps
        );
    } else {
        eprintln!(
            "done: {} steps, train loss {}, eval loss {}; adapter in {}; metrics and loss.svg in {}",
            s.steps,
            fmt(s.final_train_loss),
            fmt(s.final_eval_loss),
            s.adapter_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            s.run_dir.display()
        );
    }
    Ok(())
}
