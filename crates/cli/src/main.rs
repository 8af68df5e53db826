//! `flywheel`: the command line. It parses arguments, resolves them into library options and
//! calls one library function per subcommand; errors print once and exit non-zero.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use flywheel_runtime::{EmbeddingModel, LoadOptions, ModelFormat, TextModel};
use std::io::{BufRead, IsTerminal, Write};

mod args;
mod bench;
mod eval;
mod generate;
mod progress;
mod rag;
mod serve;
mod sql;
mod train;

use args::ModelArgs;

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
    Generate(generate::GenerateArgs),
    /// Chat interactively (/reset clears the history, /system TEXT sets the system prompt, /quit exits).
    Chat(generate::ChatArgs),
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
    Serve(serve::ServeArgs),
    /// Retrieval: index documents, search, answer with citations, evaluate.
    #[command(subcommand)]
    Rag(rag::RagCmd),
    /// Evaluate configurations of a task (the optimization ladder) and compare runs.
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// Text-to-SQL on your own SQLite database: `flywheel sql ask --db FILE "question"`.
    #[command(subcommand)]
    Sql(sql::SqlCmd),
    /// Measure prefill and decode speed (used by scripts/bench-generate.sh); prints one JSON line.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // Errors may quote model files and user data: control characters are escaped and the
        // message bounded, so a hostile file cannot drive the terminal or flood it.
        eprintln!(
            "error: {}",
            flywheel_api::text::escape_lines(&format!("{e:#}"), 4000)
        );
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info { model, json } => info(&model, json),
        Cmd::Generate(a) => generate::generate(a),
        Cmd::Chat(a) => generate::chat(a),
        Cmd::Embed { model, batch_size } => embed(&model, batch_size),
        Cmd::Tokenize { model, text, json } => tokenize(&model, &text, json),
        Cmd::LoraTrain {
            recipe,
            resume,
            dry_run,
            threads,
        } => train::lora_train(&recipe, resume, dry_run, threads),
        Cmd::Merge {
            model,
            adapter,
            out,
            dtype,
        } => train::merge(&model, &adapter, &out, &dtype),
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Rag(c) => rag::run(c),
        Cmd::Eval(c) => eval::run(c),
        Cmd::Sql(c) => sql::run(c),
        Cmd::Bench(a) => bench::run(a),
    }
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
        // Names and templates come from the file: shown escaped.
        print!(
            "{}",
            flywheel_api::text::escape_lines(&info.to_string(), 200_000)
        );
    }
    Ok(())
}

fn embed(m: &ModelArgs, batch_size: usize) -> Result<()> {
    if m.adapter.is_some() {
        bail!("--adapter applies to decoder models, not embedders");
    }
    let em = EmbeddingModel::load(&m.model, &m.device.load_options()?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_device_flag_group_parses_alike() {
        for cmd in ["generate", "chat", "embed", "tokenize", "bench", "serve"] {
            let mut args = vec!["flywheel", cmd, "-m", "m", "--device", "cuda:1"];
            args.extend(["--dtype", "bf16", "--threads", "3"]);
            if cmd == "generate" {
                args.extend(["-p", "x"]);
            }
            if cmd == "tokenize" {
                args.push("text");
            }
            let d = match Cli::try_parse_from(&args).unwrap().cmd {
                Cmd::Generate(a) => a.model.device,
                Cmd::Chat(a) => a.model.device,
                Cmd::Embed { model, .. } | Cmd::Tokenize { model, .. } => model.device,
                Cmd::Bench(a) => a.model.device,
                Cmd::Serve(a) => a.device,
                _ => unreachable!(),
            };
            assert_eq!(d.device, "cuda:1", "{cmd}");
            assert_eq!(d.dtype.as_deref(), Some("bf16"), "{cmd}");
            assert_eq!(d.threads, Some(3), "{cmd}");
        }
    }
}
