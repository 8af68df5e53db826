//! One question to one database, as `flywheel sql ask` puts it: the prompt from the database's
//! own schema (with sample rows), decoding under the database's SQL grammar, execution voting
//! and self-correction on request, then the winning query's result.

use std::path::Path;

use flywheel_api::{ChatMessage, GenerateRequest, NullSink, SamplingParams};
use flywheel_runtime::TextModel;
use rusqlite::types::ValueRef;
use serde::Serialize;

use super::{run_samples, vote, DbSchema, VoteSample};
use crate::metrics::{self, SqlErrorClass};
use crate::{Error, Result};

/// The instruction that opens every SQL prompt (the Spider-derived data uses the same).
pub const PROMPT_HEAD: &str = "Given the SQLite database schema below, write one SQL query that answers the question. Reply with the SQL only.";
/// The system message of SQL prompts.
pub const SYSTEM: &str = "You are a helpful assistant that writes SQLite queries.";
/// How long one query may run.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The user message asking `question` over a database described by `schema`.
pub fn sql_prompt(schema: &str, question: &str) -> String {
    format!(
        "{PROMPT_HEAD}\n\n{schema}\n\nQuestion: {}\n",
        question.trim()
    )
}

/// How to ask.
#[derive(Debug, Clone)]
pub struct AskOptions {
    /// Sample rows per table in the prompt.
    pub sample_rows: usize,
    /// Decode under the database's SQL grammar.
    pub constrain: bool,
    /// Samples to vote over (0 or 1: one greedy answer).
    pub vote: usize,
    /// Retries after a query fails or returns nothing.
    pub self_correct: usize,
    /// Temperature of voted samples and retries.
    pub temperature: f32,
    /// Most tokens per query.
    pub max_tokens: usize,
    /// Most rows returned.
    pub max_rows: usize,
    /// Seed of the samples.
    pub seed: u64,
}

impl Default for AskOptions {
    fn default() -> Self {
        Self {
            sample_rows: 3,
            constrain: false,
            vote: 0,
            self_correct: 0,
            temperature: 0.7,
            max_tokens: 256,
            max_rows: 50,
            seed: 42,
        }
    }
}

/// One earlier try that self-correction replaced.
#[derive(Debug, Clone, Serialize)]
pub struct Retry {
    /// Its SQL.
    pub sql: String,
    /// What was wrong with it.
    pub feedback: String,
}

/// The answer to one question.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The query.
    pub sql: String,
    /// The result's column names.
    pub columns: Vec<String>,
    /// Its rows as text (`NULL` for nulls), at most `max_rows`.
    pub rows: Vec<Vec<String>>,
    /// More rows exist than were returned.
    pub truncated: bool,
    /// Why the query did not run, when it did not.
    pub error: Option<String>,
    /// Every voted sample (empty without a vote).
    pub votes: Vec<VoteSample>,
    /// The vote's winning query and how many samples shared its result (none without a vote).
    pub voted: Option<(String, usize)>,
    /// Tries replaced by self-correction, in order.
    pub retries: Vec<Retry>,
    /// Prompt tokens run through the model.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// Answers `question` on the SQLite database `db` (opened read-only) with `model`.
pub fn ask(model: &TextModel, db: &Path, question: &str, opts: &AskOptions) -> Result<Answer> {
    let io = |reason: String| Error::Io {
        path: db.display().to_string(),
        reason,
    };
    let conn = metrics::open_read_only(db).map_err(io)?;
    let schema = DbSchema::read(&conn, opts.sample_rows).map_err(io)?;
    // The grammar needs only the names, which the sample rows do not change.
    let grammar = opts.constrain.then(|| schema.grammar());
    let user = sql_prompt(&schema.render(), question);
    let mut messages = vec![
        ChatMessage::new("system", SYSTEM),
        ChatMessage::new("user", &user),
    ];
    let mut answer = Answer {
        sql: String::new(),
        columns: Vec::new(),
        rows: Vec::new(),
        truncated: false,
        error: None,
        votes: Vec::new(),
        voted: None,
        retries: Vec::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let sampled = SamplingParams {
        temperature: opts.temperature,
        seed: opts.seed,
        ..SamplingParams::default()
    };
    let request = |messages: &[ChatMessage], sampling: SamplingParams| -> Result<GenerateRequest> {
        let prompt = render(model, messages)?;
        let mut req = GenerateRequest::new(prompt, opts.max_tokens);
        req.sampling = sampling;
        req.grammar = grammar.clone();
        Ok(req)
    };
    let mut sql = if opts.vote > 1 {
        let req = request(&messages, sampled.clone())?;
        let seeds: Vec<u64> = (0..opts.vote as u64)
            .map(|k| opts.seed.wrapping_add(k << 40))
            .collect();
        let s = model.generate_samples(&req, &seeds)?;
        answer.prompt_tokens += s.prefill_tokens;
        answer.completion_tokens += s
            .outputs
            .iter()
            .map(|o| o.usage.completion_tokens)
            .sum::<usize>();
        let runs = run_samples(&conn, &s.outputs, TIMEOUT, 10_000);
        let v = vote(&runs);
        answer.votes = v.samples;
        answer.voted = Some((runs[v.winner].0.clone(), v.votes));
        runs[v.winner].0.clone()
    } else {
        let req = request(&messages, SamplingParams::greedy())?;
        let out = model.generate(&req, &mut NullSink)?;
        answer.prompt_tokens += out.usage.prompt_tokens;
        answer.completion_tokens += out.usage.completion_tokens;
        metrics::extract_sql(&out.text)
    };
    for retry in 0..opts.self_correct {
        let Some(feedback) = metrics::sql_feedback(&conn, &sql, TIMEOUT) else {
            break;
        };
        answer.retries.push(Retry {
            sql: sql.clone(),
            feedback: feedback.clone(),
        });
        let notes: Vec<String> = answer
            .retries
            .iter()
            .map(|r| format!("- {}", r.feedback.replace('\n', "\n  ")))
            .collect();
        messages[1] = ChatMessage::new(
            "user",
            format!(
                "{user}\n\nEarlier answers to this question were wrong:\n{}\nWrite a different SQLite query that avoids these errors. Reply with the SQL only.",
                notes.join("\n")
            ),
        );
        let mut s = sampled.clone();
        s.seed = opts.seed.wrapping_add(((retry + 1) as u64) << 32);
        let out = model.generate(&request(&messages, s)?, &mut NullSink)?;
        answer.prompt_tokens += out.usage.prompt_tokens;
        answer.completion_tokens += out.usage.completion_tokens;
        sql = metrics::extract_sql(&out.text);
    }
    answer.sql = sql;
    match result_table(&conn, &answer.sql, opts.max_rows) {
        Ok((columns, rows, truncated)) => {
            answer.columns = columns;
            answer.rows = rows;
            answer.truncated = truncated;
        }
        Err(e) => answer.error = Some(e),
    }
    Ok(answer)
}

/// The chat prompt for `messages` (plain text for a model without a chat template).
fn render(model: &TextModel, messages: &[ChatMessage]) -> Result<String> {
    if model.chat_template().is_some() {
        return Ok(model.render_chat(messages)?);
    }
    let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    Ok(format!("{}\nSQL:", text.join("\n\n")))
}

/// Column names, rows as text, and whether rows were left out.
type Table = (Vec<String>, Vec<Vec<String>>, bool);

/// Runs `sql` (one read-only statement, under the time limit) and returns its column names and
/// up to `max_rows` rows as text, and whether there were more.
fn result_table(
    conn: &rusqlite::Connection,
    sql: &str,
    max_rows: usize,
) -> std::result::Result<Table, String> {
    if sql.trim().is_empty() {
        return Err(format!(
            "{}: the reply held no SQL",
            SqlErrorClass::NoSql.label()
        ));
    }
    // The checked executor first (one statement, read-only), then the rows as text; both runs
    // are interrupted after the limit.
    metrics::execute(conn, sql, TIMEOUT, max_rows).map_err(|e| e.message)?;
    let run = || {
        text_rows(conn, sql, max_rows).map_err(|e| metrics::ExecError {
            class: SqlErrorClass::OtherError,
            message: e.to_string(),
        })
    };
    metrics::with_timeout(conn, TIMEOUT, run).map_err(|e| e.message)
}

/// Column names, up to `max_rows` rows as text, and whether there were more.
fn text_rows(conn: &rusqlite::Connection, sql: &str, max_rows: usize) -> rusqlite::Result<Table> {
    let mut st = conn.prepare(sql)?;
    let columns: Vec<String> = st.column_names().iter().map(|c| c.to_string()).collect();
    let n = columns.len();
    let mut it = st.query([])?;
    let mut rows = Vec::new();
    while let Some(r) = it.next()? {
        if rows.len() == max_rows {
            return Ok((columns, rows, true));
        }
        let row: Vec<String> = (0..n)
            .map(|i| match r.get_ref(i) {
                Ok(ValueRef::Null) => "NULL".to_string(),
                Ok(ValueRef::Integer(v)) => v.to_string(),
                Ok(ValueRef::Real(v)) => format!("{v:?}"),
                Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
                Ok(ValueRef::Blob(b)) => format!("<{} bytes>", b.len()),
                Err(e) => format!("<{e}>"),
            })
            .collect();
        rows.push(row);
    }
    Ok((columns, rows, false))
}
