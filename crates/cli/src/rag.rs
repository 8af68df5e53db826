//! `flywheel rag …`: index a folder, search it, answer from it with citations, evaluate
//! retrieval, and measure query latency on synthetic stores (`flywheel_rag::bench`).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use flywheel_api::text::escape;
use flywheel_rag::bench::LatencyBench;
use flywheel_rag::{
    eval, index_folder, ChunkConfig, DenseIndex, Filter, IndexOptions, Llm, Mode, SearchOptions,
    Searcher, Store,
};
use flywheel_runtime::{EmbeddingModel, LoadOptions, TextModel};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use crate::args::load_options;

/// The embedding model used when neither the command line nor the store names one.
const DEFAULT_EMBEDDER: &str = "models/all-minilm-l6-v2";

#[derive(Subcommand)]
pub enum RagCmd {
    /// Index a folder of txt/md/html files into a store (re-runs touch changed files only).
    Index(IndexArgs),
    /// Search a store.
    Search(SearchArgs),
    /// Answer a question from a store, with numbered citations and a source list.
    Ask(AskArgs),
    /// Evaluate retrieval on questions with gold sections: recall@1/5/10, MRR, nDCG@10 per mode.
    Eval(EvalArgs),
    /// Measure query latency on synthetic stores of the given sizes (benchmarks).
    #[command(hide = true)]
    BenchLatency(BenchLatencyArgs),
}

#[derive(Args)]
pub struct Common {
    /// The store file (SQLite).
    #[arg(long)]
    store: PathBuf,
    /// The embedding model (default: the one the store was built with).
    #[arg(long)]
    embedder: Option<String>,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
pub struct IndexArgs {
    #[command(flatten)]
    common: Common,
    /// The folder to index.
    folder: PathBuf,
    /// Only files matching this glob (relative path; repeatable).
    #[arg(long)]
    include: Vec<String>,
    /// Leave out files matching this glob (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Most tokens per chunk (tokens of the embedding model).
    #[arg(long, default_value_t = ChunkConfig::default().max_tokens)]
    chunk_tokens: usize,
    /// Tokens shared by consecutive chunks.
    #[arg(long, default_value_t = ChunkConfig::default().overlap_tokens)]
    overlap_tokens: usize,
    /// Skip files larger than this.
    #[arg(long, default_value_t = IndexOptions::default().max_file_bytes)]
    max_file_bytes: u64,
    /// Build an HNSW graph when the store holds at least this many chunks.
    #[arg(long, default_value_t = IndexOptions::default().ann_threshold)]
    ann_threshold: usize,
    /// Drop the store's contents and index from scratch.
    #[arg(long)]
    rebuild: bool,
}

#[derive(Args, Clone)]
pub struct SearchFlags {
    /// dense, bm25 or hybrid.
    #[arg(long, default_value = "hybrid")]
    mode: String,
    /// Results to return.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Search with a hypothetical answer written by --model (HyDE).
    #[arg(long)]
    hyde: bool,
    /// Split multi-part questions into sub-questions with --model and fuse their results.
    #[arg(long)]
    decompose: bool,
    /// Rerank the top candidates by --model's yes/no relevance judgement.
    #[arg(long)]
    rerank: bool,
    /// Candidates the reranker sees.
    #[arg(long, default_value_t = 20)]
    rerank_candidates: usize,
    /// Diversify results with maximal marginal relevance (lambda in [0, 1]; 1 = relevance only).
    #[arg(long)]
    mmr: Option<f32>,
    /// Metadata filter KEY=GLOB (path=guides/*, kind=html; repeatable, all must hold).
    #[arg(long)]
    filter: Vec<String>,
}

impl SearchFlags {
    fn options(&self) -> Result<SearchOptions> {
        Ok(SearchOptions {
            mode: self.mode.parse::<Mode>()?,
            top_k: self.top_k,
            hyde: self.hyde,
            decompose: self.decompose,
            rerank: self.rerank,
            rerank_candidates: self.rerank_candidates,
            mmr: self.mmr,
            filter: Filter::parse(&self.filter)?,
        })
    }

    fn needs_model(&self) -> bool {
        self.hyde || self.decompose || self.rerank
    }
}

#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    flags: SearchFlags,
    /// The generator for --hyde, --decompose and --rerank.
    #[arg(long, short)]
    model: Option<String>,
    /// Print one JSON object per result.
    #[arg(long)]
    json: bool,
    /// The query.
    query: String,
}

#[derive(Args)]
pub struct AskArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    flags: SearchFlags,
    /// The generator that answers.
    #[arg(long, short)]
    model: String,
    /// Most tokens of context passages.
    #[arg(long, default_value_t = 1200)]
    context_tokens: usize,
    /// Most tokens in the answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Answer "I don't know" unless a retrieved passage reaches this cosine similarity (0 = off).
    #[arg(long, default_value_t = 0.25)]
    min_similarity: f32,
    /// Check every answer sentence against the passages it cites and flag unsupported ones.
    #[arg(long)]
    fact_check: bool,
    /// Print the answer as JSON (text, passages, citations, checks).
    #[arg(long)]
    json: bool,
    /// The question.
    question: String,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// Questions (JSONL with id, question, path, heading).
    #[arg(long)]
    questions: PathBuf,
    /// Modes to evaluate, comma-separated: dense, bm25, hybrid, hybrid+hyde, hybrid+rerank,
    /// dense+hyde, hybrid+hyde+rerank.
    #[arg(long, default_value = "dense,bm25,hybrid")]
    modes: String,
    /// The generator for +hyde and +rerank modes.
    #[arg(long, short)]
    model: Option<String>,
    /// Evaluate only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Candidates the reranker sees.
    #[arg(long, default_value_t = 20)]
    rerank_candidates: usize,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchLatencyArgs {
    /// The embedding model (queries are embedded for real).
    #[arg(long, default_value = DEFAULT_EMBEDDER)]
    embedder: String,
    /// Store sizes in chunks, comma-separated.
    #[arg(long, default_value = "10000,100000")]
    chunks: String,
    /// Queries per mode.
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Where the synthetic stores go.
    #[arg(long, default_value = ".bench/rag")]
    dir: PathBuf,
    /// HNSW threshold (as for `rag index`).
    #[arg(long, default_value_t = IndexOptions::default().ann_threshold)]
    ann_threshold: usize,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(cmd: RagCmd) -> Result<()> {
    match cmd {
        RagCmd::Index(a) => index(a),
        RagCmd::Search(a) => search(a),
        RagCmd::Ask(a) => ask(a),
        RagCmd::Eval(a) => eval_cmd(a),
        RagCmd::BenchLatency(a) => bench_latency(a),
    }
}

fn load_embedder(c: &Common, store: Option<&Store>) -> Result<(EmbeddingModel, LoadOptions)> {
    let load = load_options(&c.device, None, c.threads)?;
    let spec = match (&c.embedder, store) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => s
            .meta("embedder_path")?
            .unwrap_or_else(|| DEFAULT_EMBEDDER.to_string()),
        (None, None) => DEFAULT_EMBEDDER.to_string(),
    };
    let e = EmbeddingModel::load(&spec, &load)
        .with_context(|| format!("loading the embedding model {spec}"))?;
    Ok((e, load))
}

fn index(a: IndexArgs) -> Result<()> {
    let mut store = Store::open(&a.common.store)?;
    // Re-runs keep the store's embedder unless --embedder says otherwise.
    let (embedder, _) = load_embedder(&a.common, Some(&store))?;
    let opts = IndexOptions {
        include: a.include,
        exclude: a.exclude,
        chunk: ChunkConfig {
            max_tokens: a.chunk_tokens,
            overlap_tokens: a.overlap_tokens,
        },
        max_file_bytes: a.max_file_bytes,
        ann_threshold: a.ann_threshold,
        rebuild: a.rebuild,
        ..IndexOptions::default()
    };
    // Test hook: stop inside the run's transaction after N documents so a test can kill us.
    let pause_after: Option<usize> = std::env::var("FLYWHEEL_TEST_PAUSE_AFTER_DOCS")
        .ok()
        .and_then(|v| v.parse().ok());
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} indexing [{bar:30}] {pos}/{len} files, {msg} ({elapsed}, ETA {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let report = index_folder(&mut store, &a.folder, &embedder, &opts, &mut |p| match p {
        flywheel_rag::index::Progress::Planned { to_index } => bar.set_length(to_index as u64),
        flywheel_rag::index::Progress::Skipped { path, reason } => {
            let (path, reason) = (escape(path, 300), escape(reason, 500));
            bar.suspend(|| eprintln!("warning: skipped {path}: {reason}"));
        }
        flywheel_rag::index::Progress::Embedding { path, done, total } => {
            bar.set_message(format!(
                "embedding {}: {done}/{total} chunks",
                escape(path, 80)
            ));
        }
        flywheel_rag::index::Progress::Written { done, chunks, .. } => {
            bar.set_position(done as u64);
            bar.set_message(format!("{chunks} chunks"));
            if pause_after == Some(done) {
                bar.suspend(|| eprintln!("test: paused inside the index transaction"));
                std::thread::sleep(std::time::Duration::from_secs(600));
            }
        }
        flywheel_rag::index::Progress::BuildingAnn { vectors } => {
            bar.suspend(|| eprintln!("building the HNSW graph over {vectors} vectors…"));
        }
    })?;
    bar.finish_and_clear();
    eprintln!(
        "indexed {} files into {}: {} added, {} updated, {} unchanged, {} removed, {} skipped; {} chunks written ({} in the store){}; {:.1}s ({:.1}s embedding, {:.0} chunks/s)",
        report.files,
        a.common.store.display(),
        report.added,
        report.updated,
        report.unchanged,
        report.removed,
        report.skipped.len(),
        report.chunks_written,
        report.chunks_total,
        if report.ann { ", HNSW graph built" } else { "" },
        report.total_s,
        report.embed_s,
        report.chunks_written as f64 / report.total_s.max(1e-9),
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn load_generator(spec: &str, load: &LoadOptions) -> Result<TextModel> {
    TextModel::load(spec, load).with_context(|| format!("loading the generator {spec}"))
}

fn print_hits(hits: &[flywheel_api::RetrievedChunk], json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for (i, h) in hits.iter().enumerate() {
        if json {
            writeln!(out, "{}", serde_json::to_string(h)?)?;
        } else {
            let snippet: String = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
            let snippet: String = snippet.chars().take(240).collect();
            writeln!(
                out,
                "{}. {}:{}-{}  [{:.4}]{}\n   {snippet}",
                i + 1,
                h.path,
                h.lines.0,
                h.lines.1,
                h.score,
                if h.heading.is_empty() {
                    String::new()
                } else {
                    format!("  {}", h.heading)
                }
            )?;
        }
    }
    Ok(())
}

fn search(a: SearchArgs) -> Result<()> {
    let store = Store::open_existing(&a.common.store)?;
    let (embedder, load) = load_embedder(&a.common, Some(&store))?;
    let dense = DenseIndex::load(&store)?;
    let opts = a.flags.options()?;
    let model = match (&a.model, a.flags.needs_model()) {
        (Some(m), _) => Some(load_generator(m, &load)?),
        (None, true) => bail!("--hyde, --decompose and --rerank need a generator: add --model"),
        (None, false) => None,
    };
    let llm = model.as_ref().map(Llm::new);
    let mut searcher = Searcher::new(&store, &dense, &embedder);
    if let Some(l) = &llm {
        searcher = searcher.with_llm(l).with_reranker(l);
    }
    let found = searcher.search(&a.query, &opts)?;
    if let Some(h) = &found.hyde_text {
        eprintln!("HyDE passage: {}", h.replace('\n', " "));
    }
    if !found.sub_queries.is_empty() {
        eprintln!("sub-questions: {}", found.sub_queries.join(" | "));
    }
    if found.hits.is_empty() {
        eprintln!("no results");
    }
    print_hits(&found.hits, a.json)
}

fn ask(a: AskArgs) -> Result<()> {
    let store = Store::open_existing(&a.common.store)?;
    let (embedder, load) = load_embedder(&a.common, Some(&store))?;
    let dense = DenseIndex::load(&store)?;
    let model = load_generator(&a.model, &load)?;
    let llm = Llm::new(&model);
    let searcher = Searcher::new(&store, &dense, &embedder)
        .with_llm(&llm)
        .with_reranker(&llm);
    let opts = flywheel_rag::AskOptions {
        search: a.flags.options()?,
        context_tokens: a.context_tokens,
        max_tokens: a.max_tokens,
        min_similarity: a.min_similarity,
        fact_check: a.fact_check,
        ..Default::default()
    };
    let stream = !a.json;
    let mut printed = false;
    let mut sink = |piece: &str, _t: u32| {
        if stream {
            print!("{piece}");
            let _ = std::io::stdout().flush();
            printed = true;
        }
        ControlFlow::Continue(())
    };
    let answer = flywheel_rag::ask(&searcher, &llm, &a.question, &opts, &mut sink)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    // The answer streamed already; print what follows it (checks and sources).
    let rendered = answer.render();
    if printed {
        let tail = rendered
            .strip_prefix(answer.text.trim())
            .unwrap_or(&rendered);
        println!("{tail}");
    } else {
        println!("{rendered}");
    }
    if !answer.invalid_citations.is_empty() {
        eprintln!(
            "warning: the answer cites passages that do not exist: {:?}",
            answer.invalid_citations
        );
    }
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let store = Store::open_existing(&a.common.store)?;
    let (embedder, load) = load_embedder(&a.common, Some(&store))?;
    let dense = DenseIndex::load(&store)?;
    let mut questions = eval::read_questions(&a.questions)?;
    if let Some(n) = a.limit {
        questions.truncate(n);
    }
    let mut modes = Vec::new();
    for name in a.modes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mut parts = name.split('+');
        let base: Mode = parts.next().unwrap_or("").parse()?;
        let mut o = SearchOptions {
            mode: base,
            rerank_candidates: a.rerank_candidates,
            ..SearchOptions::default()
        };
        for p in parts {
            match p {
                "hyde" => o.hyde = true,
                "rerank" => o.rerank = true,
                "decompose" => o.decompose = true,
                other => bail!("--modes: unknown modifier `{other}` in `{name}` (known: hyde, rerank, decompose)"),
            }
        }
        modes.push((name.to_string(), o));
    }
    let needs_model = modes.iter().any(|(_, o)| o.hyde || o.rerank || o.decompose);
    let model = match (&a.model, needs_model) {
        (Some(m), true) => Some(load_generator(m, &load)?),
        (None, true) => {
            bail!("modes with +hyde, +rerank or +decompose need a generator: add --model")
        }
        _ => None,
    };
    let llm = model.as_ref().map(Llm::new);
    let mut searcher = Searcher::new(&store, &dense, &embedder);
    if let Some(l) = &llm {
        searcher = searcher.with_llm(l).with_reranker(l);
    }
    let mut rows = Vec::new();
    for (name, o) in &modes {
        let bar = indicatif::ProgressBar::new(questions.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>22} [{bar:30}] {pos}/{len} ({elapsed}, ETA {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(name.clone());
        let m = eval::evaluate(&searcher, &questions, name, o, &mut |i| {
            bar.set_position(i as u64)
        })?;
        bar.finish_and_clear();
        eprintln!("{name}: recall@5 {:.3}, MRR {:.3}", m.recall_at_5, m.mrr);
        rows.push(m);
    }
    let missing = rows.first().map_or(0, |m| m.gold_missing);
    print!("{}", eval::markdown_table(&rows));
    if missing > 0 {
        println!(
            "\n{missing} of {} questions have no chunk of their gold section in the store.",
            questions.len()
        );
    }
    if let Some(p) = a.json_out {
        flywheel_api::files::atomic_write(&p, serde_json::to_string_pretty(&rows)?.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn bench_latency(a: BenchLatencyArgs) -> Result<()> {
    let load = load_options("cpu", None, a.threads)?;
    let embedder = EmbeddingModel::load(&a.embedder, &load)?;
    std::fs::create_dir_all(&a.dir)?;
    let sizes: Vec<usize> = a
        .chunks
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("--chunks takes comma-separated numbers")
        })
        .collect::<Result<_>>()?;
    let dim = embedder.info().hidden_size;
    for n in sizes {
        let b = LatencyBench::open(&a.dir, n, dim, a.ann_threshold, a.queries)?;
        for mode in flywheel_rag::bench::MODES {
            let row = b.measure(&embedder, mode)?;
            println!("{}", serde_json::to_value(&row)?);
        }
    }
    Ok(())
}
