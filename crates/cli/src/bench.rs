//! `flywheel bench`: loads the model, runs `flywheel_runtime::bench` and prints its result as
//! the one JSON line scripts/bench-generate.sh collects.

use anyhow::{Context, Result};
use clap::Args;
use flywheel_runtime::{bench, EmbeddingModel};

use crate::args::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    /// Constrain every sequence to this JSON Schema (decode speed under a grammar).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match &a.embed_file {
        Some(f) => embed(&a.model, f, a.batch_size.unwrap_or(32), a.repeats),
        None => generate(&a, a.batch_size.unwrap_or(1)),
    }
}

fn generate(a: &BenchArgs, batch: usize) -> Result<()> {
    anyhow::ensure!(batch >= 1, "--batch-size must be at least 1");
    let m = &a.model;
    let grammar = match &a.json_schema {
        Some(p) => Some(flywheel_api::Grammar::JsonSchema(
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None => None,
    };
    let tm = m.load_text()?;
    let constrained = grammar.is_some();
    let r = bench::generate(
        &tm,
        a.prompt_tokens,
        a.gen_tokens,
        a.repeats,
        batch,
        grammar,
    )?;
    let v = serde_json::json!({
        "engine": "flywheel",
        "model": m.model,
        "threads": bench::pool_threads(),
        "device": m.device.device,
        "batch": r.batch,
        "constrained": constrained,
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": r.generated_tokens,
        "prefill_tok_s": r.prefill_tok_s,
        "decode_tok_s": r.decode_tok_s,
        "peak_rss_mib": r.peak_rss_mib,
    });
    println!("{v}");
    Ok(())
}

fn embed(m: &ModelArgs, file: &str, batch_size: usize, repeats: usize) -> Result<()> {
    let em = EmbeddingModel::load(&m.model, &m.device.load_options()?)?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let lines: Vec<&str> = text.lines().collect();
    let r = bench::embed(&em, &lines, batch_size, repeats)?;
    let v = serde_json::json!({
        "engine": "flywheel",
        "model": m.model,
        "sentences": r.sentences,
        "sentences_per_s": r.sentences_per_s,
        "peak_rss_mib": r.peak_rss_mib,
    });
    println!("{v}");
    Ok(())
}
