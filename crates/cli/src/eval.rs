//! `flywheel eval …`: run an eval spec (the optimization ladder) with a progress bar per rung,
//! rewrite a run's reports, and compare two runs question by question.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use flywheel_eval::spec::Rung;
use flywheel_eval::{EvalSpec, Observer, ResultRecord, RunOptions};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Run (or resume) an eval spec; writes results.jsonl, report.md, report.html, ladder.png.
    Run(RunArgs),
    /// Rewrite the reports of a finished run folder from its results.
    Report {
        /// The run folder (holds spec.toml and results.jsonl).
        dir: PathBuf,
    },
    /// Write training data whose prompts are built like a rung's (its template and retrieved
    /// examples), for a LoRA that learns to use retrieved examples.
    MakeData {
        /// The eval spec.
        spec: PathBuf,
        /// The rung whose prompts to copy.
        #[arg(long)]
        rung: String,
        /// A JSONL file with the dataset's fields (default: the spec's example store).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Where to write `{"prompt","completion"}` lines.
        #[arg(long)]
        out: PathBuf,
    },
    /// Compare two run folders question by question (markdown on stdout).
    Compare {
        /// The first run folder.
        a: PathBuf,
        /// The second run folder.
        b: PathBuf,
        /// Also write the comparison to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// The eval spec (TOML; see evals/README.md).
    spec: PathBuf,
    /// Discard earlier results in the output folder instead of resuming them.
    #[arg(long)]
    fresh: bool,
    /// Override the dataset's `limit` (first N questions).
    #[arg(long)]
    limit: Option<usize>,
    /// CPU threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
}

struct Bars {
    bar: ProgressBar,
    right: usize,
    scored: usize,
    stop: Arc<AtomicBool>,
    /// Plain progress lines when stderr is not a terminal.
    ticker: crate::progress::Ticker,
    /// The rung in progress, for the plain lines.
    prefix: String,
    started: std::time::Instant,
}

impl Observer for Bars {
    fn loaded(&mut self, what: &str) {
        eprintln!("loaded {what}");
    }

    fn note(&mut self, message: &str) {
        eprintln!("{message}");
    }

    fn rung_started(
        &mut self,
        rung: &Rung,
        index: usize,
        rungs: usize,
        questions: usize,
        done: usize,
    ) {
        self.bar.finish_and_clear();
        self.bar = ProgressBar::new(questions as u64);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed} elapsed, ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.prefix = format!("rung {}/{rungs} `{}`", index + 1, rung.name);
        self.bar.set_prefix(self.prefix.clone());
        self.bar.set_position(done as u64);
        (self.right, self.scored) = (0, 0);
        self.started = std::time::Instant::now();
        if done == questions {
            self.bar.finish_with_message("done earlier");
        }
        if self.bar.is_hidden() {
            eprintln!(
                "{}: {questions} questions{}",
                self.prefix,
                if done > 0 {
                    format!(", {done} answered earlier")
                } else {
                    String::new()
                }
            );
            self.ticker = crate::progress::Ticker::new(crate::progress::PLAIN_EVERY);
            // The rung's first line comes after PLAIN_EVERY, not at its first question.
            let _ = self.ticker.due(&self.bar, true);
        }
    }

    fn example_done(&mut self, r: &ResultRecord) -> ControlFlow<()> {
        if let Some(c) = r.correct {
            self.scored += 1;
            self.right += usize::from(c);
        }
        self.bar.inc(1);
        self.bar
            .set_message(format!("right {}/{} this session", self.right, self.scored));
        let last = self.bar.position() >= self.bar.length().unwrap_or(0);
        if self.ticker.due(&self.bar, last) {
            let answered = self.bar.position();
            eprintln!(
                "{}: {answered}/{} answered, right {}/{} this session, {} elapsed",
                self.prefix,
                self.bar.length().unwrap_or(0),
                self.right,
                self.scored,
                indicatif::HumanDuration(self.started.elapsed())
            );
        }
        if last {
            self.bar.finish();
        }
        if self.stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Run(a) => run_spec(a),
        EvalCmd::Report { dir } => {
            let spec = EvalSpec::load(&dir.join(flywheel_eval::runner::SPEC_COPY))?;
            flywheel_eval::write_reports(&dir, &spec)?;
            print_report(&dir)
        }
        EvalCmd::MakeData {
            spec,
            rung,
            input,
            out,
        } => {
            let spec = EvalSpec::load(&spec)?;
            let mut ds = spec.dataset.clone();
            ds.limit = 0;
            ds.id = None;
            match input {
                Some(p) => ds.path = p,
                None => {
                    let ex = spec
                        .examples
                        .as_ref()
                        .context("the spec has no [examples] store; pass --input")?;
                    ds.path = ex.path.clone();
                }
            }
            let n = flywheel_eval::runner::make_training_data(&spec, &rung, &ds, &out)?;
            eprintln!("wrote {n} examples to {}", out.display());
            Ok(())
        }
        EvalCmd::Compare { a, b, out } => {
            let md = flywheel_eval::compare(&a, &b)?;
            print!("{md}");
            if let Some(p) = out {
                flywheel_eval::atomic_write(&p, md.as_bytes())?;
            }
            Ok(())
        }
    }
}

fn print_report(dir: &Path) -> Result<()> {
    let md = std::fs::read_to_string(dir.join("report.md"))
        .with_context(|| format!("reading {}", dir.join("report.md").display()))?;
    println!("{md}");
    eprintln!(
        "reports in {}: report.md, report.html, ladder.png, results.jsonl",
        dir.display()
    );
    Ok(())
}

fn run_spec(a: RunArgs) -> Result<()> {
    crate::args::configure_threads(a.threads)?;
    let mut spec = EvalSpec::load(&a.spec)?;
    if let Some(n) = a.limit {
        spec.dataset.limit = n;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting; finished questions are saved");
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: stopping after this question (results so far are kept; re-run to resume)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let mut obs = Bars {
        bar: ProgressBar::hidden(),
        right: 0,
        scored: 0,
        stop,
        ticker: crate::progress::Ticker::new(crate::progress::PLAIN_EVERY),
        prefix: String::new(),
        started: std::time::Instant::now(),
    };
    let out = flywheel_eval::run(&spec, &RunOptions { fresh: a.fresh }, &mut obs)?;
    obs.bar.finish_and_clear();
    if !out.complete {
        eprintln!(
            "stopped: {} results written, {} from before; run the same command to resume",
            out.written, out.resumed
        );
        return Ok(());
    }
    if out.resumed > 0 {
        eprintln!("{} results from an earlier run were kept", out.resumed);
    }
    print_report(&out.dir)
}
