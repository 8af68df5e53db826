//! `flywheel sql`: text-to-SQL on the user's own SQLite database, with no preparation step.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use flywheel_api::text::escape;
use flywheel_eval::sql::{ask, AskOptions};

use crate::args::ModelArgs;

/// `flywheel sql …`
#[derive(Subcommand)]
pub enum SqlCmd {
    /// Answer a question with one SQL query on a SQLite database; prints the query and its result.
    Ask(AskArgs),
}

/// `flywheel sql ask`.
#[derive(Args)]
pub struct AskArgs {
    /// The SQLite database (opened read-only).
    #[arg(long)]
    db: std::path::PathBuf,
    /// The question.
    question: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Sample rows per table shown to the model with the schema.
    #[arg(long, default_value_t = 3)]
    sample_rows: usize,
    /// `sql`: decode under a grammar of SQLite SELECT over this database's own tables and
    /// columns; `none`: free text.
    #[arg(long, default_value = "sql")]
    constrain: String,
    /// Sample N queries, run them and keep the result most of them agree on (0: one greedy query).
    #[arg(long, default_value_t = 0)]
    vote: usize,
    /// Retries after a query fails or returns nothing, with SQLite's error fed back.
    #[arg(long, default_value_t = 0)]
    self_correct: usize,
    /// Temperature of voted samples and retries.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Most tokens per query.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Most result rows printed.
    #[arg(long, default_value_t = 50)]
    max_rows: usize,
    /// Seed of the samples.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print JSON (the query, columns, rows, votes and retries).
    #[arg(long)]
    json: bool,
}

/// Runs a `flywheel sql` subcommand.
pub fn run(cmd: SqlCmd) -> Result<()> {
    match cmd {
        SqlCmd::Ask(a) => ask_cmd(a),
    }
}

fn ask_cmd(a: AskArgs) -> Result<()> {
    let constrain = match a.constrain.as_str() {
        "sql" => true,
        "none" => false,
        other => bail!("--constrain: `{other}` is not sql or none"),
    };
    if a.vote > 64 {
        bail!("--vote: at most 64 samples");
    }
    if !(a.temperature > 0.0 && a.temperature <= 2.0) {
        bail!("--temperature must be above 0 and at most 2");
    }
    if a.max_tokens == 0 || a.max_rows == 0 {
        bail!("--max-tokens and --max-rows must be at least 1");
    }
    if !a.db.is_file() {
        bail!("--db {}: no such file", a.db.display());
    }
    let model = a.model.load_text()?;
    let opts = AskOptions {
        sample_rows: a.sample_rows,
        constrain,
        vote: a.vote,
        self_correct: a.self_correct,
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        max_rows: a.max_rows,
        seed: a.seed,
    };
    let answer = ask(&model, &a.db, &a.question, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&answer)?);
        return Ok(());
    }
    for r in &answer.retries {
        eprintln!(
            "retried: {}\n  because: {}",
            escape(&r.sql, 500),
            escape(&r.feedback, 500)
        );
    }
    match &answer.voted {
        Some((sql, 0)) if *sql == answer.sql => {
            eprintln!("vote: none of {} samples ran", answer.votes.len());
        }
        Some((sql, agree)) if *sql == answer.sql => {
            eprintln!(
                "vote: {agree} of {} samples agree on this result",
                answer.votes.len()
            );
        }
        Some(_) => eprintln!("vote: its winner failed; self-correction replaced it"),
        None => {}
    }
    println!("{}\n", escape(&answer.sql, 4000));
    match &answer.error {
        Some(e) => bail!("the query did not run: {}", escape(e, 1000)),
        None => print_table(&answer.columns, &answer.rows, answer.truncated),
    }
    Ok(())
}

/// Prints rows as an aligned text table (cells escaped and cut to 60 characters).
fn print_table(columns: &[String], rows: &[Vec<String>], truncated: bool) {
    let cell = |s: &str| escape(s, 60);
    let mut widths: Vec<usize> = columns.iter().map(|c| cell(c).chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell(c).chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join(" | ").trim_end());
    };
    line(columns.iter().map(|c| cell(c)).collect());
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for r in rows {
        line(r.iter().map(|c| cell(c)).collect());
    }
    println!(
        "({} row{}{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if truncated { ", more not shown" } else { "" }
    );
}
