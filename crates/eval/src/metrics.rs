//! Scoring metrics for evaluation runs: SQuAD-style answer normalisation, exact match, token F1,
//! ROUGE-L, JSON validity, SQL extraction and execution accuracy on SQLite (with error classes),
//! judge-verdict parsing, retrieval metrics (context precision, recall@k, reciprocal rank) and
//! percentile-bootstrap confidence intervals.
//!
//! Everything here is pure computation (plus read-only SQLite queries) and never panics on any
//! input text.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Text metrics
// ---------------------------------------------------------------------------------------------

/// SQuAD-style normalisation: lowercase, punctuation removed, articles a/an/the removed, whitespace collapsed.
///
/// Punctuation is the ASCII set (Python's `string.punctuation`), deleted without a space in its
/// place (so "don't" becomes "dont"); articles are removed as whole whitespace-separated tokens.
pub fn normalize_answer(s: &str) -> String {
    let no_punct: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Normalised exact match.
pub fn exact_match(pred: &str, gold: &str) -> bool {
    normalize_answer(pred) == normalize_answer(gold)
}

/// SQuAD token F1 on normalised tokens (bag of tokens with counts). Both empty -> 1.0; one empty -> 0.0.
pub fn token_f1(pred: &str, gold: &str) -> f64 {
    let pred_norm = normalize_answer(pred);
    let gold_norm = normalize_answer(gold);
    let p: Vec<&str> = pred_norm.split_whitespace().collect();
    let g: Vec<&str> = gold_norm.split_whitespace().collect();
    match (p.is_empty(), g.is_empty()) {
        (true, true) => return 1.0,
        (true, false) | (false, true) => return 0.0,
        (false, false) => {}
    }
    let mut gold_counts: HashMap<&str, usize> = HashMap::new();
    for t in &g {
        *gold_counts.entry(t).or_insert(0) += 1;
    }
    let mut common = 0usize;
    for t in &p {
        if let Some(c) = gold_counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    f1_from_overlap(common, p.len(), g.len())
}

/// ROUGE-L F1 (beta = 1) of the longest common subsequence of normalised tokens. Both empty -> 1.0; one empty -> 0.0.
pub fn rouge_l(pred: &str, gold: &str) -> f64 {
    let pred_norm = normalize_answer(pred);
    let gold_norm = normalize_answer(gold);
    let p: Vec<&str> = pred_norm.split_whitespace().collect();
    let g: Vec<&str> = gold_norm.split_whitespace().collect();
    match (p.is_empty(), g.is_empty()) {
        (true, true) => return 1.0,
        (true, false) | (false, true) => return 0.0,
        (false, false) => {}
    }
    f1_from_overlap(lcs_len(&p, &g), p.len(), g.len())
}

/// F1 of precision `overlap / pred_len` and recall `overlap / gold_len` (both lengths non-zero).
fn f1_from_overlap(overlap: usize, pred_len: usize, gold_len: usize) -> f64 {
    if overlap == 0 || pred_len == 0 || gold_len == 0 {
        return 0.0;
    }
    let precision = overlap as f64 / pred_len as f64;
    let recall = overlap as f64 / gold_len as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Length of the longest common subsequence of two token lists (two-row dynamic programme).
fn lcs_len(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Whether the output is valid JSON (after trimming and removing a surrounding ```json ... ``` or ``` ... ``` fence).
///
/// Any JSON value counts (object, array, string, number, boolean, null). Text after the closing
/// fence makes the output invalid; a missing closing fence is tolerated.
pub fn json_valid(output: &str) -> bool {
    let inner = strip_surrounding_fence(output.trim()).trim();
    serde_json::from_str::<serde_json::Value>(inner).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Markdown code fences
// ---------------------------------------------------------------------------------------------

/// One fenced code block: its info string (language tag, possibly empty), its contents and
/// the text after its closing fence (empty when the fence is not closed).
struct Fence<'a> {
    info: &'a str,
    body: &'a str,
    rest: &'a str,
}

/// Language tags recognised at the start of a single-line fence such as "```sql SELECT 1```".
const INLINE_TAGS: [&str; 6] = ["sql", "sqlite", "json", "mysql", "postgresql", "text"];

/// Whether the first line of a fence is an info string (a language tag) rather than code.
fn is_info_line(line: &str) -> bool {
    let t = line.trim();
    t.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.'))
        && !["select", "with", "values", "explain", "pragma"]
            .iter()
            .any(|kw| t.eq_ignore_ascii_case(kw))
}

/// The first fenced code block in `text`, if any ("```" opens it; an unclosed one runs to the end).
fn first_fence(text: &str) -> Option<Fence<'_>> {
    let open = text.find("```")?;
    let after = text.get(open + 3..)?;
    let close = after.find("```");
    let newline = after.find('\n');
    let multi_line = matches!((newline, close), (Some(n), Some(c)) if n < c)
        || (newline.is_some() && close.is_none());
    let (info, body_and_rest) = match newline {
        Some(n) if multi_line && is_info_line(&after[..n]) => (after[..n].trim(), &after[n + 1..]),
        _ if !multi_line => split_inline_tag(after),
        _ => ("", after),
    };
    Some(match body_and_rest.find("```") {
        Some(c) => Fence {
            info,
            body: &body_and_rest[..c],
            rest: &body_and_rest[c + 3..],
        },
        None => Fence {
            info,
            body: body_and_rest,
            rest: "",
        },
    })
}

/// Splits a known language tag followed by whitespace off a single-line fence's contents.
fn split_inline_tag(s: &str) -> (&str, &str) {
    let start = s.len() - s.trim_start().len();
    let trimmed = &s[start..];
    let word_end = trimmed
        .find(|c: char| c.is_whitespace())
        .unwrap_or(trimmed.len());
    let word = &trimmed[..word_end];
    if word_end < trimmed.len() && INLINE_TAGS.iter().any(|t| word.eq_ignore_ascii_case(t)) {
        (word, &trimmed[word_end..])
    } else {
        ("", s)
    }
}

/// The contents of a fence that surrounds the whole (trimmed) text, or the text unchanged.
fn strip_surrounding_fence(t: &str) -> &str {
    if !t.starts_with("```") {
        return t;
    }
    match first_fence(t) {
        Some(f) if f.rest.trim().is_empty() => f.body,
        _ => t,
    }
}

// ---------------------------------------------------------------------------------------------
// SQL text handling
// ---------------------------------------------------------------------------------------------

/// Kinds of significant SQL tokens (whitespace and comments are dropped by the lexer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokKind {
    /// An unquoted word: keyword, identifier or number.
    Word,
    /// `;`
    Semi,
    /// `(`
    Open,
    /// `)`
    Close,
    /// A string literal, quoted identifier or any other symbol.
    Other,
}

/// A significant SQL token with its byte range in the source.
#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: TokKind,
    start: usize,
    end: usize,
}

/// Byte of an unquoted word (identifier characters; any non-ASCII byte counts, as in SQLite).
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Index just past the closing `quote` of a quoted run starting at `i` (the opening quote);
/// a doubled quote is an escaped one. Unterminated runs end at the end of the text.
fn skip_quoted(bytes: &[u8], i: usize, quote: u8) -> usize {
    let mut j = i + 1;
    while j < bytes.len() {
        if bytes[j] == quote {
            if quote != b']' && bytes.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    bytes.len()
}

/// Splits SQL into significant tokens, skipping whitespace and `--` / `/* */` comments and
/// treating string literals and quoted identifiers ('..', "..", `..`, [..]) as single tokens.
fn lex(sql: &str) -> Vec<Tok> {
    let bytes = sql.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let start = i;
        let kind = match b {
            _ if b.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(bytes.len());
                continue;
            }
            b'\'' | b'"' | b'`' => {
                i = skip_quoted(bytes, i, b);
                TokKind::Other
            }
            b'[' => {
                i = skip_quoted(bytes, i, b']');
                TokKind::Other
            }
            b';' => {
                i += 1;
                TokKind::Semi
            }
            b'(' => {
                i += 1;
                TokKind::Open
            }
            b')' => {
                i += 1;
                TokKind::Close
            }
            _ if is_word_byte(b) => {
                while i < bytes.len() && is_word_byte(bytes[i]) {
                    i += 1;
                }
                TokKind::Word
            }
            _ => {
                i += 1;
                TokKind::Other
            }
        };
        toks.push(Tok {
            kind,
            start,
            end: i,
        });
    }
    toks
}

/// Labels a model may put before its query (matched case-insensitively, longest first).
const SQL_LABELS: [&str; 4] = ["sql query:", "sqlite:", "sql:", "query:"];

/// The SQL in a model's output: the first fenced code block's contents if there is one (```sql or ```), else the whole text;
/// a leading "SQL:" / "Query:" label (case-insensitive) dropped; cut after the first ';' that is outside a string literal
/// (the ';' itself removed); trimmed. Empty string when nothing is left.
///
/// When there are several fenced blocks, the first one tagged `sql…` or untagged is used, else
/// the first block. Semicolons inside string literals, quoted identifiers and comments do not cut.
pub fn extract_sql(output: &str) -> String {
    let mut block = None;
    let mut rest = output;
    while let Some(f) = first_fence(rest) {
        let sqlish = f.info.is_empty()
            || f.info
                .get(..3)
                .is_some_and(|p| p.eq_ignore_ascii_case("sql"));
        if sqlish {
            block = Some(f.body);
            break;
        }
        if block.is_none() {
            block = Some(f.body);
        }
        rest = f.rest;
        if rest.is_empty() {
            break;
        }
    }
    let mut text = block.unwrap_or(output).trim();
    for label in SQL_LABELS {
        if text
            .get(..label.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(label))
        {
            text = text[label.len()..].trim_start();
            break;
        }
    }
    let cut = lex(text)
        .iter()
        .find(|t| t.kind == TokKind::Semi)
        .and_then(|t| text.get(..t.start))
        .unwrap_or(text);
    cut.trim().to_string()
}

/// Whether the statement has an ORDER BY at the top level (not inside parentheses, not inside string literals or quoted identifiers), case-insensitive.
pub fn has_top_level_order_by(sql: &str) -> bool {
    let toks = lex(sql);
    let word = |t: &Tok, w: &str| {
        t.kind == TokKind::Word
            && sql
                .get(t.start..t.end)
                .is_some_and(|s| s.eq_ignore_ascii_case(w))
    };
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate() {
        match t.kind {
            TokKind::Open => depth += 1,
            TokKind::Close => depth = depth.saturating_sub(1),
            TokKind::Word
                if depth == 0
                    && word(t, "order")
                    && toks.get(i + 1).is_some_and(|n| word(n, "by")) =>
            {
                return true;
            }
            _ => {}
        }
    }
    false
}

/// The first statement of `sql` (comments before it and the ';' after it dropped), or an error
/// when there is none (NoSql) or when another statement follows it (OtherError).
fn single_statement(sql: &str) -> Result<&str, ExecError> {
    let toks = lex(sql);
    let Some(first) = toks.iter().position(|t| t.kind != TokKind::Semi) else {
        return Err(ExecError {
            class: SqlErrorClass::NoSql,
            message: "no SQL statement".to_string(),
        });
    };
    let end = toks[first..]
        .iter()
        .position(|t| t.kind == TokKind::Semi)
        .map(|p| first + p);
    let stmt_end = match end {
        Some(e) => {
            if toks[e..].iter().any(|t| t.kind != TokKind::Semi) {
                return Err(ExecError {
                    class: SqlErrorClass::OtherError,
                    message: "more than one SQL statement; only one may be executed".to_string(),
                });
            }
            toks[e].start
        }
        None => sql.len(),
    };
    Ok(sql.get(toks[first].start..stmt_end).unwrap_or(sql))
}

// ---------------------------------------------------------------------------------------------
// SQL execution
// ---------------------------------------------------------------------------------------------

/// Why a predicted query was scored wrong.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SqlErrorClass {
    /// The output held no SQL.
    NoSql,
    /// SQLite could not parse the query.
    SyntaxError,
    /// The query names a table or column that does not exist (or an ambiguous column).
    WrongTableOrColumn,
    /// The query ran past its time limit.
    Timeout,
    /// Any other execution error.
    OtherError,
    /// The query ran but returned no rows where the gold query returns some.
    EmptyResult,
    /// The query ran but returned different rows.
    WrongResult,
}

impl SqlErrorClass {
    /// Human label for reports ("no SQL", "syntax error", "wrong table/column", "timeout", "other error", "empty result", "wrong result").
    pub fn label(self) -> &'static str {
        match self {
            SqlErrorClass::NoSql => "no SQL",
            SqlErrorClass::SyntaxError => "syntax error",
            SqlErrorClass::WrongTableOrColumn => "wrong table/column",
            SqlErrorClass::Timeout => "timeout",
            SqlErrorClass::OtherError => "other error",
            SqlErrorClass::EmptyResult => "empty result",
            SqlErrorClass::WrongResult => "wrong result",
        }
    }
}

/// Maps an SQLite error message to a class: "syntax error"/"incomplete input"/"unrecognized token" -> SyntaxError; "no such table"/"no such column"/"ambiguous column" -> WrongTableOrColumn; "interrupted" -> Timeout; else OtherError.
pub fn classify_sqlite_error(message: &str) -> SqlErrorClass {
    let m = message.to_lowercase();
    if ["syntax error", "incomplete input", "unrecognized token"]
        .iter()
        .any(|p| m.contains(p))
    {
        SqlErrorClass::SyntaxError
    } else if ["no such table", "no such column", "ambiguous column"]
        .iter()
        .any(|p| m.contains(p))
    {
        SqlErrorClass::WrongTableOrColumn
    } else if m.contains("interrupted") {
        SqlErrorClass::Timeout
    } else {
        SqlErrorClass::OtherError
    }
}

/// One result cell, normalised for comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Cell {
    /// SQL NULL (equal to every other NULL).
    Null,
    /// An integer or real as canonical number text (see [`num_cell`]).
    Num(String),
    /// Text (invalid UTF-8 replaced by U+FFFD).
    Text(String),
    /// A blob's bytes.
    Blob(Vec<u8>),
}

/// Integers and reals become Num with a canonical text such that 2 == 2.0 and values equal after rounding to 6 significant digits compare equal.
///
/// The rule: the value is rounded to 6 significant digits and written as `<mantissa>e<exponent>`
/// with trailing zeros of the mantissa dropped ("2e0", "3e-1", "-1.5e2", "1.23457e6"); zero
/// (either sign) is "0"; NaN is "NaN", infinities "inf" / "-inf". So 0.1+0.2 equals 0.3, 2 equals
/// 2.0, and 1234567.4 equals 1234567.0 — and also integers that differ only after their sixth
/// significant digit (1234567 and 1234568) compare equal.
pub fn num_cell(v: f64) -> Cell {
    let text = if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else if v == 0.0 {
        "0".to_string()
    } else {
        let s = format!("{v:.5e}");
        match s.split_once('e') {
            Some((mantissa, exp)) => {
                let mantissa = if mantissa.contains('.') {
                    mantissa.trim_end_matches('0').trim_end_matches('.')
                } else {
                    mantissa
                };
                format!("{mantissa}e{exp}")
            }
            None => s,
        }
    };
    Cell::Num(text)
}

/// A failed execution.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ExecError {
    /// The failure's class.
    pub class: SqlErrorClass,
    /// SQLite's (or our) message.
    pub message: String,
}

/// Rows, truncation flag and column count of one executed query.
struct QueryResult {
    rows: Vec<Vec<Cell>>,
    truncated: bool,
    columns: usize,
}

/// Turns a rusqlite error into an [`ExecError`] with its class.
fn exec_error(e: &rusqlite::Error, timeout: Duration) -> ExecError {
    let message = match e {
        rusqlite::Error::SqliteFailure(_, Some(m)) => m.clone(),
        rusqlite::Error::SqlInputError { msg, .. } => msg.clone(),
        rusqlite::Error::MultipleStatement => {
            "more than one SQL statement; only one may be executed".to_string()
        }
        other => other.to_string(),
    };
    let interrupted = e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted);
    let class = if interrupted {
        SqlErrorClass::Timeout
    } else {
        classify_sqlite_error(&message)
    };
    let message = if class == SqlErrorClass::Timeout {
        format!("interrupted: query ran longer than {timeout:?}")
    } else {
        message
    };
    ExecError { class, message }
}

/// Prepares and steps one statement, reading at most `max_rows` rows.
fn read_rows(
    conn: &rusqlite::Connection,
    sql: &str,
    max_rows: usize,
    timeout: Duration,
) -> Result<QueryResult, ExecError> {
    let err = |e: rusqlite::Error| exec_error(&e, timeout);
    let mut stmt = conn.prepare(sql).map_err(err)?;
    if !stmt.readonly() {
        return Err(ExecError {
            class: SqlErrorClass::OtherError,
            message: "statement would modify the database; only read-only queries are run"
                .to_string(),
        });
    }
    let columns = stmt.column_count();
    let mut rows_iter = stmt.query([]).map_err(err)?;
    let mut rows = Vec::new();
    let mut truncated = false;
    while let Some(row) = rows_iter.next().map_err(err)? {
        if rows.len() >= max_rows {
            truncated = true;
            break;
        }
        let mut cells = Vec::with_capacity(columns);
        for i in 0..columns {
            let cell = match row.get_ref(i).map_err(err)? {
                rusqlite::types::ValueRef::Null => Cell::Null,
                rusqlite::types::ValueRef::Integer(n) => num_cell(n as f64),
                rusqlite::types::ValueRef::Real(f) => num_cell(f),
                rusqlite::types::ValueRef::Text(t) => {
                    Cell::Text(String::from_utf8_lossy(t).into_owned())
                }
                rusqlite::types::ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
            };
            cells.push(cell);
        }
        rows.push(cells);
    }
    Ok(QueryResult {
        rows,
        truncated,
        columns,
    })
}

/// Runs the single statement in `sql` under a watchdog thread that interrupts the connection
/// once `timeout` has passed.
fn run_query(
    conn: &rusqlite::Connection,
    sql: &str,
    timeout: Duration,
    max_rows: usize,
) -> Result<QueryResult, ExecError> {
    let stmt = single_statement(sql)?;
    let handle = conn.get_interrupt_handle();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::Builder::new()
        .name("sql-timeout".to_string())
        .spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                handle.interrupt();
            }
        })
        .map_err(|e| ExecError {
            class: SqlErrorClass::OtherError,
            message: format!("cannot start the query timeout thread: {e}"),
        })?;
    let result = read_rows(conn, stmt, max_rows, timeout);
    drop(done_tx);
    // The watchdog only waits on the channel, so joining returns at once; a late interrupt
    // with no statement running is cleared by SQLite when the next statement starts.
    let _ = watchdog.join();
    result
}

/// Runs one query on a read-only connection, interrupting it after `timeout` and reading at most `max_rows` rows; the flag tells whether rows were cut off.
///
/// Only the first statement is run (text after it other than ';' is an OtherError), and only
/// read-only statements are run. The timeout is enforced by a watchdog thread calling
/// `sqlite3_interrupt` on the connection.
pub fn execute(
    conn: &rusqlite::Connection,
    sql: &str,
    timeout: Duration,
    max_rows: usize,
) -> Result<(Vec<Vec<Cell>>, bool), ExecError> {
    run_query(conn, sql, timeout, max_rows).map(|r| (r.rows, r.truncated))
}

/// Opens a database read-only (no mutex); error text names the path.
pub fn open_read_only(db: &Path) -> Result<rusqlite::Connection, String> {
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(db, flags).map_err(|e| {
        format!(
            "cannot open SQLite database {} read-only: {e}",
            db.display()
        )
    })?;
    // Opening is lazy: read the schema once so a non-database file fails here, by name.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| format!("cannot read SQLite database {}: {e}", db.display()))?;
    Ok(conn)
}

/// The tables of a database (creation order, SQLite's own left out) with their columns.
pub fn schema_columns(conn: &rusqlite::Connection) -> Result<Vec<(String, Vec<String>)>, String> {
    let read = || -> rusqlite::Result<Vec<(String, Vec<String>)>> {
        let mut tables = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
        )?;
        let names: Vec<String> = tables
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut cols = conn.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
        names
            .into_iter()
            .map(|t| {
                let c = cols
                    .query_map([&t], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((t, c))
            })
            .collect()
    };
    read().map_err(|e| format!("cannot read the schema: {e}"))
}

/// What to tell a model after SQLite refused a name (`no such table`, `no such column`,
/// `ambiguous column name`): the names in the database closest to the refused one (at most
/// three, by edit distance ignoring case and underscores), or for an ambiguous column the tables
/// that have it, then every table with its columns. `None` for any other error, or when the
/// schema cannot be read.
pub fn schema_hint(conn: &rusqlite::Connection, message: &str) -> Option<String> {
    // ASCII lowering keeps byte offsets, so `at` indexes `message` too.
    let lower = message.to_ascii_lowercase();
    let (kind, at) = [
        "no such table:",
        "no such column:",
        "ambiguous column name:",
    ]
    .iter()
    .enumerate()
    .find_map(|(i, p)| lower.find(p).map(|at| (i, at + p.len())))?;
    let refused = message.get(at..)?.trim();
    // `main.t` or `T1.col`: the last part is the name SQLite could not resolve.
    let name = refused
        .rsplit('.')
        .next()
        .unwrap_or(refused)
        .trim_matches(['"', '`', '\'', '[', ']']);
    let schema = schema_columns(conn).ok()?;
    if schema.is_empty() {
        return None;
    }
    let norm = |s: &str| s.to_lowercase().replace(['_', ' '], "");
    // Plurals are the commonest near miss (`country` for `countries`).
    let singular = |s: &str| {
        if let Some(stem) = s.strip_suffix("ies") {
            format!("{stem}y")
        } else {
            s.strip_suffix('s').unwrap_or(s).to_string()
        }
    };
    let wanted = norm(name);
    let first = match kind {
        2 => {
            let having: Vec<String> = schema
                .iter()
                .filter(|(_, c)| c.iter().any(|c| norm(c) == wanted))
                .map(|(t, _)| format!("{t}.{name}"))
                .collect();
            (!having.is_empty()).then(|| {
                format!(
                    "Qualify the column with its table: {}.",
                    having.join(" or ")
                )
            })
        }
        _ => {
            let candidates: Vec<String> = if kind == 0 {
                schema.iter().map(|(t, _)| t.clone()).collect()
            } else {
                schema
                    .iter()
                    .flat_map(|(t, c)| c.iter().map(move |c| format!("{t}.{c}")))
                    .collect()
            };
            let mut scored: Vec<(usize, usize, &String)> = candidates
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let bare = norm(c.rsplit('.').next().unwrap_or(c));
                    let d = strsim::levenshtein(&wanted, &bare)
                        .min(strsim::levenshtein(&singular(&wanted), &singular(&bare)));
                    let contains = (wanted.len() >= 3 && bare.contains(&wanted))
                        || (bare.len() >= 3 && wanted.contains(&bare));
                    let close = d <= (wanted.chars().count() / 3).max(1);
                    (close || contains).then_some((d, i, c))
                })
                .collect();
            scored.sort();
            let near: Vec<&str> = scored.iter().take(3).map(|(_, _, c)| c.as_str()).collect();
            (!near.is_empty()).then(|| {
                format!(
                    "Names in this database close to {name}: {}.",
                    near.join(", ")
                )
            })
        }
    };
    let listing: Vec<String> = schema
        .iter()
        .map(|(t, c)| format!("{t}({})", c.join(", ")))
        .collect();
    let all = format!("The tables and their columns: {}.", listing.join("; "));
    Some(match first {
        Some(f) => format!("{f}\n{all}"),
        None => all,
    })
}

/// Result of comparing a predicted query with the gold one on a database.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SqlOutcome {
    /// Whether the prediction's result matches the gold result.
    pub correct: bool,
    /// Why it is wrong; None when correct.
    pub error_class: Option<SqlErrorClass>,
    /// SQLite's message when the prediction failed to run.
    pub error: Option<String>,
    /// Rows the prediction returned (None when it did not run).
    pub pred_rows: Option<usize>,
    /// Rows the gold query returned.
    pub gold_rows: usize,
}

/// Most rows read from either query in [`sql_execution_match`].
const MAX_COMPARE_ROWS: usize = 200_000;

/// Execution accuracy: runs gold and prediction and compares their results; Err only when the gold query itself fails.
///
/// Results are compared as multisets (rows sorted by their cells) unless the gold has a top-level
/// ORDER BY, then order matters. Column count and column order must match. Prediction empty ->
/// NoSql. Prediction error -> its class. Prediction returns no rows while gold returns rows ->
/// EmptyResult. Different rows -> WrongResult. Only one statement is executed; text after it
/// other than whitespace, comments and ';' is an OtherError. Numbers compare by [`num_cell`]'s
/// rule. The gold query may return at most 200 000 rows (more is an Err); a prediction returning
/// more than that is a WrongResult.
pub fn sql_execution_match(
    conn: &rusqlite::Connection,
    pred: &str,
    gold: &str,
    timeout: Duration,
) -> Result<SqlOutcome, String> {
    let gold_res = run_query(conn, gold, timeout, MAX_COMPARE_ROWS)
        .map_err(|e| format!("gold query failed ({}): {e}; gold: {gold}", e.class.label()))?;
    if gold_res.truncated {
        return Err(format!(
            "gold query returns more than {MAX_COMPARE_ROWS} rows; gold: {gold}"
        ));
    }
    let gold_rows = gold_res.rows.len();
    let wrong =
        |class: SqlErrorClass, error: Option<String>, pred_rows: Option<usize>| SqlOutcome {
            correct: false,
            error_class: Some(class),
            error,
            pred_rows,
            gold_rows,
        };
    let pred_res = match run_query(conn, pred, timeout, MAX_COMPARE_ROWS) {
        Ok(r) => r,
        Err(e) => return Ok(wrong(e.class, Some(e.message), None)),
    };
    let pred_rows = Some(pred_res.rows.len());
    if pred_res.rows.is_empty() && gold_rows > 0 {
        return Ok(wrong(SqlErrorClass::EmptyResult, None, pred_rows));
    }
    if pred_res.truncated || pred_res.columns != gold_res.columns {
        return Ok(wrong(SqlErrorClass::WrongResult, None, pred_rows));
    }
    let (mut p, mut g) = (pred_res.rows, gold_res.rows);
    if !has_top_level_order_by(gold) {
        p.sort();
        g.sort();
    }
    if p == g {
        Ok(SqlOutcome {
            correct: true,
            error_class: None,
            error: None,
            pred_rows,
            gold_rows,
        })
    } else {
        Ok(wrong(SqlErrorClass::WrongResult, None, pred_rows))
    }
}

// ---------------------------------------------------------------------------------------------
// Judge verdicts
// ---------------------------------------------------------------------------------------------

/// A yes/no verdict from a judge model's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verdict {
    /// Affirmative (yes / true / supported / correct / relevant).
    Yes,
    /// Negative (no / false / unsupported / incorrect / irrelevant / not).
    No,
}

/// Words that only label the verdict that follows them ("Verdict: yes", "Final answer: no").
const VERDICT_LABELS: [&str; 9] = [
    "verdict",
    "answer",
    "final",
    "judgement",
    "judgment",
    "label",
    "decision",
    "result",
    "output",
];

/// JSON keys that may hold a verdict, in priority order.
const VERDICT_KEYS: [&str; 10] = [
    "verdict",
    "answer",
    "label",
    "decision",
    "judgement",
    "judgment",
    "result",
    "relevant",
    "supported",
    "correct",
];

/// Parses a judge's free text: the first word (after leading punctuation and labels such as "verdict:") decides.
///
/// Leading non-alphanumeric characters (whitespace, quotes, '*', '#', '(', '{', …) are skipped,
/// then label words (verdict, answer, final, judgement, label, decision, result, output) with
/// their punctuation; the next word decides: yes/true/supported/correct/relevant -> Yes;
/// no/false/unsupported/incorrect/irrelevant/not -> No; anything else -> None. A JSON object
/// (optionally fenced) such as {"verdict": "yes"} or {"supported": true} is read by key.
/// Never panics on any input.
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    let t = strip_surrounding_fence(text.trim()).trim();
    if t.starts_with('{') || t.starts_with('"') {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(t) {
            if let Some(v) = verdict_from_json(&value, 0) {
                return Some(v);
            }
        }
    }
    verdict_from_words(t)
}

/// A verdict from a parsed JSON value (bool, string, or an object with a verdict key).
fn verdict_from_json(value: &serde_json::Value, depth: usize) -> Option<Verdict> {
    match value {
        serde_json::Value::Bool(true) => Some(Verdict::Yes),
        serde_json::Value::Bool(false) => Some(Verdict::No),
        serde_json::Value::String(s) => verdict_from_words(s),
        serde_json::Value::Object(map) if depth < 4 => VERDICT_KEYS.iter().find_map(|key| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .and_then(|(_, v)| verdict_from_json(v, depth + 1))
        }),
        _ => None,
    }
}

/// A verdict from the first non-label word of free text.
fn verdict_from_words(text: &str) -> Option<Verdict> {
    let mut rest = text;
    for _ in 0..=VERDICT_LABELS.len() {
        rest = rest.trim_start_matches(|c: char| !c.is_alphanumeric());
        let end = rest
            .find(|c: char| !c.is_alphanumeric())
            .unwrap_or(rest.len());
        let word = rest.get(..end)?.to_lowercase();
        match word.as_str() {
            "yes" | "true" | "supported" | "correct" | "relevant" => return Some(Verdict::Yes),
            "no" | "false" | "unsupported" | "incorrect" | "irrelevant" | "not" => {
                return Some(Verdict::No)
            }
            w if !w.is_empty() && VERDICT_LABELS.contains(&w) => rest = rest.get(end..)?,
            _ => return None,
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Retrieval metrics and statistics
// ---------------------------------------------------------------------------------------------

/// Ragas context precision: sum over ranks k of precision@k · v_k divided by the number of relevant items; 0.0 when nothing is relevant, None for an empty list.
pub fn context_precision(relevant: &[bool]) -> Option<f64> {
    if relevant.is_empty() {
        return None;
    }
    let mut hits = 0usize;
    let mut sum = 0.0;
    for (i, &r) in relevant.iter().enumerate() {
        if r {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    Some(if hits == 0 { 0.0 } else { sum / hits as f64 })
}

/// Recall@k and reciprocal rank of the first relevant item among the first `k` of `ranked` (gold flags in rank order), given the number of gold items in total.
///
/// recall = relevant found in the first k / gold_total (0 when gold_total is 0, at most 1);
/// rr = 1/rank of the first relevant item within the first k, else 0.
pub fn recall_and_rr(ranked: &[bool], k: usize, gold_total: usize) -> (f64, f64) {
    let top = &ranked[..k.min(ranked.len())];
    let found = top.iter().filter(|&&r| r).count();
    let recall = if gold_total == 0 {
        0.0
    } else {
        (found as f64 / gold_total as f64).min(1.0)
    };
    let rr = top
        .iter()
        .position(|&r| r)
        .map_or(0.0, |i| 1.0 / (i + 1) as f64);
    (recall, rr)
}

/// Percentile bootstrap 95% interval of the mean of `values` with `resamples` resamples from a seeded `StdRng` (ChaCha); empty -> (0, 0), one value v -> (v, v).
///
/// Deterministic for a seed. The bounds are the 2.5th and 97.5th percentiles (linear
/// interpolation) of the resampled means; with `resamples == 0` both bounds are the mean.
pub fn bootstrap_ci(values: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    let n = values.len();
    match values {
        [] => return (0.0, 0.0),
        [v] => return (*v, *v),
        _ => {}
    }
    if resamples == 0 {
        let mean = values.iter().sum::<f64>() / n as f64;
        return (mean, mean);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let sum: f64 = (0..n).map(|_| values[rng.random_range(0..n)]).sum();
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    (percentile(&means, 0.025), percentile(&means, 0.975))
}

/// The `p`-quantile (0..=1) of sorted, non-empty `sorted` with linear interpolation.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let last = sorted.len().saturating_sub(1);
    let pos = p * last as f64;
    let lo = (pos.floor() as usize).min(last);
    let hi = (pos.ceil() as usize).min(last);
    let (a, b) = (
        sorted.get(lo).copied().unwrap_or(0.0),
        sorted.get(hi).copied().unwrap_or(0.0),
    );
    if lo == hi {
        a
    } else {
        a + (b - a) * (pos - lo as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Duration = Duration::from_secs(5);

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn normalize_examples() {
        assert_eq!(normalize_answer("The  Cat!"), "cat");
        assert_eq!(normalize_answer("  An apple, a DAY. "), "apple day");
        assert_eq!(normalize_answer("don't\tstop"), "dont stop");
        assert_eq!(normalize_answer("theater anatomy"), "theater anatomy");
        assert_eq!(normalize_answer(""), "");
        assert_eq!(normalize_answer("Ünïcödé — ok"), "ünïcödé — ok");
    }

    #[test]
    fn exact_match_examples() {
        assert!(exact_match("The Eiffel Tower.", "eiffel tower"));
        assert!(!exact_match("Eiffel", "eiffel tower"));
        assert!(exact_match("", "the"));
    }

    #[test]
    fn token_f1_examples() {
        // pred {red:2, blue:1, green:1}, gold {red:1, blue:2, yellow:1}: overlap 2, P = R = 2/4.
        assert!(close(
            token_f1("red red blue green", "red blue blue yellow"),
            0.5
        ));
        // overlap 2, P = 2/2, R = 2/4 -> F1 = 2/3.
        assert!(close(token_f1("cat sat", "cat sat on mat"), 2.0 / 3.0));
        assert!(close(token_f1("The cat", "cat!"), 1.0));
        assert!(close(token_f1("dog", "cat"), 0.0));
        assert!(close(token_f1("", "the"), 1.0));
        assert!(close(token_f1("", "cat"), 0.0));
        assert!(close(token_f1("cat", "a"), 0.0));
    }

    #[test]
    fn rouge_l_examples() {
        // [police, killed, gunman] vs [gunman, police, killed]: LCS 2, P = R = 2/3.
        assert!(close(
            rouge_l("police killed the gunman", "the gunman police killed"),
            2.0 / 3.0
        ));
        // [w x y z] vs [w y]: LCS 2, P = 2/4, R = 1 -> F = 2/3.
        assert!(close(rouge_l("w x y z", "w y"), 2.0 / 3.0));
        assert!(close(rouge_l("same words", "Same words."), 1.0));
        assert!(close(rouge_l("", ""), 1.0));
        assert!(close(rouge_l("x", ""), 0.0));
        assert!(close(rouge_l("x", "y"), 0.0));
    }

    #[test]
    fn json_valid_examples() {
        assert!(json_valid(r#"{"a": 1}"#));
        assert!(json_valid("  [1, 2, 3]\n"));
        assert!(json_valid("```json\n{\"a\": [1, 2]}\n```"));
        assert!(json_valid("```JSON\n{\"a\": 1}\n```\n"));
        assert!(json_valid("```\n{\"a\": 1}\n```"));
        assert!(json_valid("```json {\"a\": 1} ```"));
        assert!(json_valid("```json\n{\"a\": 1}"));
        assert!(json_valid("42"));
        assert!(!json_valid(""));
        assert!(!json_valid("```json\n```"));
        assert!(!json_valid("{\"a\": 1,}"));
        assert!(!json_valid("{'a': 1}"));
        assert!(!json_valid("Here you go: {\"a\": 1}"));
        assert!(!json_valid("```json\n{\"a\": 1}\n```\nHope this helps"));
        assert!(!json_valid("```"));
    }

    #[test]
    fn extract_sql_examples() {
        assert_eq!(extract_sql("SELECT 1"), "SELECT 1");
        assert_eq!(
            extract_sql("```sql\nSELECT a FROM t;\n```"),
            "SELECT a FROM t"
        );
        assert_eq!(
            extract_sql("Here it is:\n```\nSELECT a\nFROM t\n```\nThis lists a."),
            "SELECT a\nFROM t"
        );
        assert_eq!(
            extract_sql("```python\nprint(1)\n```\n```sql\nSELECT 2\n```"),
            "SELECT 2"
        );
        assert_eq!(extract_sql("```sql SELECT 3```"), "SELECT 3");
        assert_eq!(extract_sql("```SELECT *\nFROM t```"), "SELECT *\nFROM t");
        assert_eq!(extract_sql("SQL: SELECT 1"), "SELECT 1");
        assert_eq!(extract_sql("query:\nSELECT 1"), "SELECT 1");
        assert_eq!(extract_sql("```sql\nsql: SELECT 1\n```"), "SELECT 1");
        assert_eq!(
            extract_sql("SELECT * FROM t WHERE x = 'a;b'; -- done"),
            "SELECT * FROM t WHERE x = 'a;b'"
        );
        assert_eq!(
            extract_sql("SELECT \"we;ird\" FROM t WHERE y = 'it''s;'; extra"),
            "SELECT \"we;ird\" FROM t WHERE y = 'it''s;'"
        );
        assert_eq!(
            extract_sql("SELECT name FROM t; This query returns the names."),
            "SELECT name FROM t"
        );
        assert_eq!(extract_sql("SELECT 1 -- a;b\n;"), "SELECT 1 -- a;b");
        assert_eq!(extract_sql(""), "");
        assert_eq!(extract_sql("   ;  "), "");
        assert_eq!(extract_sql("```sql\n\n```"), "");
        assert_eq!(extract_sql("SQL:"), "");
        assert_eq!(
            extract_sql("SELECT 'unterminated;"),
            "SELECT 'unterminated;"
        );
    }

    #[test]
    fn order_by_detection() {
        assert!(has_top_level_order_by("SELECT a FROM t ORDER BY a"));
        assert!(has_top_level_order_by("select a from t order\n  by a desc"));
        assert!(has_top_level_order_by(
            "SELECT a FROM (SELECT a FROM t ORDER BY a) ORDER /* c */ BY a"
        ));
        assert!(!has_top_level_order_by(
            "SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3)"
        ));
        assert!(!has_top_level_order_by(
            "SELECT a FROM t WHERE b = 'order by'"
        ));
        assert!(!has_top_level_order_by("SELECT \"order\" FROM t"));
        assert!(!has_top_level_order_by("SELECT [order by] FROM t"));
        assert!(!has_top_level_order_by(
            "SELECT row_number() OVER (ORDER BY a) FROM t"
        ));
        assert!(!has_top_level_order_by("SELECT a FROM t -- ORDER BY a"));
        assert!(!has_top_level_order_by("SELECT reorder BY FROM t"));
        assert!(!has_top_level_order_by(""));
        assert!(!has_top_level_order_by(")))(ORDER BY"));
    }

    #[test]
    fn error_classes() {
        assert_eq!(
            classify_sqlite_error("near \"SELEC\": syntax error"),
            SqlErrorClass::SyntaxError
        );
        assert_eq!(
            classify_sqlite_error("incomplete input"),
            SqlErrorClass::SyntaxError
        );
        assert_eq!(
            classify_sqlite_error("unrecognized token: \"'abc\""),
            SqlErrorClass::SyntaxError
        );
        assert_eq!(
            classify_sqlite_error("no such table: foo"),
            SqlErrorClass::WrongTableOrColumn
        );
        assert_eq!(
            classify_sqlite_error("no such column: bar"),
            SqlErrorClass::WrongTableOrColumn
        );
        assert_eq!(
            classify_sqlite_error("ambiguous column name: id"),
            SqlErrorClass::WrongTableOrColumn
        );
        assert_eq!(classify_sqlite_error("interrupted"), SqlErrorClass::Timeout);
        assert_eq!(
            classify_sqlite_error("datatype mismatch"),
            SqlErrorClass::OtherError
        );
        assert_eq!(
            SqlErrorClass::WrongTableOrColumn.label(),
            "wrong table/column"
        );
        assert_eq!(SqlErrorClass::NoSql.label(), "no SQL");
        assert_eq!(
            serde_json::to_string(&SqlErrorClass::WrongTableOrColumn).ok(),
            Some("\"wrong_table_or_column\"".to_string())
        );
    }

    #[test]
    fn num_cell_canonical() {
        assert_eq!(num_cell(2.0), Cell::Num("2e0".into()));
        assert_eq!(num_cell(0.1 + 0.2), num_cell(0.3));
        assert_eq!(num_cell(0.3), Cell::Num("3e-1".into()));
        assert_eq!(num_cell(1234567.4), num_cell(1234567.0));
        assert_eq!(num_cell(1234567.4), Cell::Num("1.23457e6".into()));
        assert_eq!(num_cell(-150.0), Cell::Num("-1.5e2".into()));
        assert_eq!(num_cell(9.999995), num_cell(10.0));
        assert_ne!(num_cell(1.00001), num_cell(1.00002));
        assert_eq!(num_cell(0.0), num_cell(-0.0));
        assert_eq!(num_cell(f64::NAN), Cell::Num("NaN".into()));
        assert_eq!(num_cell(f64::INFINITY), Cell::Num("inf".into()));
        assert_eq!(num_cell(f64::NEG_INFINITY), Cell::Num("-inf".into()));
    }

    fn test_db() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().expect("in-memory db");
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER, name TEXT, score REAL, tag TEXT);
             INSERT INTO t VALUES (1, 'ann', 0.1, NULL), (2, 'bob', 0.2, 'x'),
                                  (3, 'cy', 2.0, NULL), (4, 'bob', 0.3, 'y');
             CREATE TABLE d (v INTEGER);
             INSERT INTO d VALUES (1), (1), (2);
             CREATE TABLE e (v INTEGER);
             INSERT INTO e VALUES (1), (2), (2);",
        )
        .expect("create test tables");
        conn
    }

    fn outcome(conn: &rusqlite::Connection, pred: &str, gold: &str) -> SqlOutcome {
        sql_execution_match(conn, pred, gold, T).expect("gold query runs")
    }

    /// The hint follows SQLite's own messages: each query below fails, and the hint names the
    /// closest names and lists the schema; other errors get none.
    #[test]
    fn schema_hints_name_the_closest_tables_and_columns() {
        let conn = rusqlite::Connection::open_in_memory().expect("in-memory db");
        conn.execute_batch(
            "CREATE TABLE continents (ContId INTEGER PRIMARY KEY, Continent TEXT);
             CREATE TABLE countries (CountryId INTEGER PRIMARY KEY, CountryName TEXT,
                                     Continent INTEGER);
             CREATE TABLE car_makers (Id INTEGER PRIMARY KEY, Maker TEXT, Country TEXT);",
        )
        .expect("create tables");
        let schema = schema_columns(&conn).expect("schema");
        assert_eq!(
            schema,
            vec![
                (
                    "continents".to_string(),
                    vec!["ContId".into(), "Continent".into()]
                ),
                (
                    "countries".to_string(),
                    vec!["CountryId".into(), "CountryName".into(), "Continent".into()]
                ),
                (
                    "car_makers".to_string(),
                    vec!["Id".into(), "Maker".into(), "Country".into()]
                ),
            ]
        );
        let listing = "The tables and their columns: continents(ContId, Continent); \
countries(CountryId, CountryName, Continent); car_makers(Id, Maker, Country).";
        let hint_for = |sql: &str| {
            let e = execute(&conn, sql, T, 1).expect_err("the query fails");
            schema_hint(&conn, &e.message)
        };
        assert_eq!(
            hint_for("SELECT country_name FROM countries").as_deref(),
            Some(format!("Names in this database close to country_name: countries.CountryName, car_makers.Country.\n{listing}").as_str())
        );
        assert_eq!(
            hint_for("SELECT T2.maker FROM countries AS T2").as_deref(),
            Some(
                format!("Names in this database close to maker: car_makers.Maker.\n{listing}")
                    .as_str()
            )
        );
        assert_eq!(
            hint_for("SELECT count(*) FROM country").as_deref(),
            Some(
                format!("Names in this database close to country: countries.\n{listing}").as_str()
            )
        );
        assert_eq!(
            hint_for("SELECT Continent FROM continents JOIN countries").as_deref(),
            Some(format!("Qualify the column with its table: continents.Continent or countries.Continent.\n{listing}").as_str())
        );
        // Nothing close: the listing alone.
        assert_eq!(
            hint_for("SELECT horsepower FROM car_makers").as_deref(),
            Some(listing)
        );
        assert_eq!(hint_for("SELEC 1"), None);
        assert_eq!(schema_hint(&conn, "datatype mismatch"), None);
        // An empty database has nothing to list.
        let empty = rusqlite::Connection::open_in_memory().expect("in-memory db");
        assert_eq!(schema_hint(&empty, "no such table: t"), None);
    }

    #[test]
    fn execute_reads_cells_and_truncates() {
        let conn = test_db();
        let (rows, truncated) = execute(
            &conn,
            "SELECT id, name, tag, x'00ff' FROM t WHERE id <= 2 ORDER BY id",
            T,
            10,
        )
        .expect("runs");
        assert!(!truncated);
        assert_eq!(
            rows,
            vec![
                vec![
                    num_cell(1.0),
                    Cell::Text("ann".into()),
                    Cell::Null,
                    Cell::Blob(vec![0, 255])
                ],
                vec![
                    num_cell(2.0),
                    Cell::Text("bob".into()),
                    Cell::Text("x".into()),
                    Cell::Blob(vec![0, 255])
                ],
            ]
        );
        let (rows, truncated) = execute(&conn, "SELECT id FROM t", T, 2).expect("runs");
        assert_eq!(rows.len(), 2);
        assert!(truncated);
        let (rows, truncated) = execute(&conn, "SELECT id FROM t;;", T, 4).expect("runs");
        assert_eq!(rows.len(), 4);
        assert!(!truncated);
        let err = execute(&conn, "DELETE FROM t", T, 10).expect_err("write refused");
        assert_eq!(err.class, SqlErrorClass::OtherError);
        let err = execute(&conn, " ; -- nothing", T, 10).expect_err("no sql");
        assert_eq!(err.class, SqlErrorClass::NoSql);
        let err = execute(&conn, "SELECT ?", T, 10).expect_err("unbound parameter");
        assert_eq!(err.class, SqlErrorClass::OtherError);
    }

    #[test]
    fn sql_match_correct_cases() {
        let conn = test_db();
        let o = outcome(&conn, "SELECT id FROM t", "SELECT id FROM t;");
        assert!(o.correct);
        assert_eq!(o.error_class, None);
        assert_eq!((o.pred_rows, o.gold_rows), (Some(4), 4));
        // Without ORDER BY in the gold, row order does not matter.
        assert!(
            outcome(
                &conn,
                "SELECT id FROM t ORDER BY id DESC",
                "SELECT id FROM t"
            )
            .correct
        );
        // NULL equals NULL.
        assert!(
            outcome(
                &conn,
                "SELECT tag FROM t WHERE tag IS NULL",
                "SELECT NULL UNION ALL SELECT NULL"
            )
            .correct
        );
        // Float rounding and 2 vs 2.0.
        assert!(outcome(&conn, "SELECT 0.1 + 0.2", "SELECT 0.3").correct);
        assert!(outcome(&conn, "SELECT 2", "SELECT 2.0").correct);
        assert!(outcome(&conn, "SELECT score FROM t WHERE id = 3", "SELECT 2").correct);
        // Gold with ORDER BY, prediction in the same order.
        assert!(
            outcome(
                &conn,
                "SELECT id FROM t ORDER BY -id",
                "SELECT id FROM t ORDER BY id DESC"
            )
            .correct
        );
        // Column names do not matter, values do.
        assert!(
            outcome(
                &conn,
                "SELECT name AS n FROM t WHERE id = 1",
                "SELECT 'ann'"
            )
            .correct
        );
        // Both empty.
        assert!(
            outcome(
                &conn,
                "SELECT id FROM t WHERE id > 9",
                "SELECT id FROM t WHERE id < 0"
            )
            .correct
        );
    }

    #[test]
    fn sql_match_wrong_cases() {
        let conn = test_db();
        let wrong = |pred: &str, gold: &str| outcome(&conn, pred, gold).error_class;
        // Multisets: duplicates count.
        assert_eq!(
            wrong("SELECT v FROM d", "SELECT v FROM e"),
            Some(SqlErrorClass::WrongResult)
        );
        assert_eq!(
            wrong("SELECT DISTINCT v FROM d", "SELECT v FROM d"),
            Some(SqlErrorClass::WrongResult)
        );
        // Gold with ORDER BY, prediction in another order.
        assert_eq!(
            wrong(
                "SELECT id FROM t ORDER BY id",
                "SELECT id FROM t ORDER BY id DESC"
            ),
            Some(SqlErrorClass::WrongResult)
        );
        // Column count and column order.
        assert_eq!(
            wrong("SELECT id, name FROM t", "SELECT id FROM t"),
            Some(SqlErrorClass::WrongResult)
        );
        assert_eq!(
            wrong("SELECT name, id FROM t", "SELECT id, name FROM t"),
            Some(SqlErrorClass::WrongResult)
        );
        // Text '2' is not the number 2.
        assert_eq!(
            wrong("SELECT '2'", "SELECT 2"),
            Some(SqlErrorClass::WrongResult)
        );
        assert_eq!(
            wrong("SELECT 1", "SELECT id FROM t WHERE id > 9"),
            Some(SqlErrorClass::WrongResult)
        );
        let o = outcome(&conn, "SELECT id FROM t WHERE id > 9", "SELECT id FROM t");
        assert_eq!(o.error_class, Some(SqlErrorClass::EmptyResult));
        assert_eq!((o.pred_rows, o.gold_rows, o.correct), (Some(0), 4, false));
        assert_eq!(wrong("", "SELECT 1"), Some(SqlErrorClass::NoSql));
        assert_eq!(wrong("  ;  ", "SELECT 1"), Some(SqlErrorClass::NoSql));
        let o = outcome(&conn, "SELEC id FROM t", "SELECT 1");
        assert_eq!(o.error_class, Some(SqlErrorClass::SyntaxError));
        assert!(o
            .error
            .as_deref()
            .is_some_and(|e| e.contains("syntax error")));
        assert_eq!(o.pred_rows, None);
        assert_eq!(
            wrong("SELECT id FROM", "SELECT 1"),
            Some(SqlErrorClass::SyntaxError)
        );
        let o = outcome(&conn, "SELECT nope FROM t", "SELECT 1");
        assert_eq!(o.error_class, Some(SqlErrorClass::WrongTableOrColumn));
        assert!(o
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no such column")));
        assert_eq!(
            wrong("SELECT * FROM missing", "SELECT 1"),
            Some(SqlErrorClass::WrongTableOrColumn)
        );
        assert_eq!(
            wrong("SELECT 1; SELECT 2", "SELECT 1"),
            Some(SqlErrorClass::OtherError)
        );
        assert_eq!(
            wrong("SELECT 1; DROP TABLE t", "SELECT 1"),
            Some(SqlErrorClass::OtherError)
        );
        assert_eq!(
            wrong("DROP TABLE t", "SELECT 1"),
            Some(SqlErrorClass::OtherError)
        );
        // The refused statements changed nothing.
        assert!(outcome(&conn, "SELECT count(*) FROM t", "SELECT 4").correct);
    }

    #[test]
    fn sql_match_timeout() {
        let conn = test_db();
        let forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                       SELECT count(*) FROM c";
        let start = std::time::Instant::now();
        let o = sql_execution_match(&conn, forever, "SELECT 1", Duration::from_millis(50))
            .expect("gold runs");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(o.error_class, Some(SqlErrorClass::Timeout));
        assert!(!o.correct);
        // The connection is usable afterwards.
        assert!(outcome(&conn, "SELECT 1", "SELECT 1").correct);
        // A timed-out gold query is an Err.
        let err = sql_execution_match(&conn, "SELECT 1", forever, Duration::from_millis(50))
            .expect_err("gold times out");
        assert!(err.contains("gold"));
    }

    #[test]
    fn sql_match_gold_failure_is_err() {
        let conn = test_db();
        let err = sql_execution_match(&conn, "SELECT 1", "SELECT nope FROM t", T)
            .expect_err("gold fails");
        assert!(err.contains("gold") && err.contains("SELECT nope FROM t"));
        assert!(sql_execution_match(&conn, "SELECT 1", "", T).is_err());
    }

    #[test]
    fn open_read_only_refuses_writes_and_names_missing_paths() {
        let dir = std::env::temp_dir().join(format!("flywheel-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("db.sqlite");
        {
            let conn = rusqlite::Connection::open(&path).expect("create db");
            conn.execute_batch("CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (7);")
                .expect("fill db");
        }
        let conn = open_read_only(&path).expect("opens");
        assert!(outcome(&conn, "SELECT a FROM t", "SELECT 7").correct);
        assert!(conn.execute("INSERT INTO t VALUES (8)", []).is_err());
        let missing = dir.join("missing.sqlite");
        let err = open_read_only(&missing).expect_err("missing file");
        assert!(err.contains("missing.sqlite"));
        let not_db = dir.join("not-a-db.sqlite");
        std::fs::write(&not_db, b"this is not a database file at all, just text").expect("write");
        let err = open_read_only(&not_db).expect_err("not a database");
        assert!(err.contains("not-a-db.sqlite"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parse_verdict_table() {
        let cases: &[(&str, Option<Verdict>)] = &[
            ("yes", Some(Verdict::Yes)),
            ("Yes.", Some(Verdict::Yes)),
            ("  YES, the answer is supported", Some(Verdict::Yes)),
            ("\"yes\"", Some(Verdict::Yes)),
            ("**Yes**", Some(Verdict::Yes)),
            ("# Verdict: yes", Some(Verdict::Yes)),
            ("**Verdict:** No", Some(Verdict::No)),
            ("Answer: no", Some(Verdict::No)),
            ("Final answer: correct", Some(Verdict::Yes)),
            ("(true)", Some(Verdict::Yes)),
            ("Supported", Some(Verdict::Yes)),
            ("relevant", Some(Verdict::Yes)),
            ("no", Some(Verdict::No)),
            ("False", Some(Verdict::No)),
            ("Unsupported.", Some(Verdict::No)),
            ("incorrect", Some(Verdict::No)),
            ("Irrelevant", Some(Verdict::No)),
            ("Not relevant", Some(Verdict::No)),
            ("'no' - the context lacks it", Some(Verdict::No)),
            (r#"{"verdict": "yes"}"#, Some(Verdict::Yes)),
            (
                r#"{"reason": "it says no", "verdict": "no"}"#,
                Some(Verdict::No),
            ),
            ("```json\n{\"Verdict\": \"Yes\"}\n```", Some(Verdict::Yes)),
            (r#"{"supported": false}"#, Some(Verdict::No)),
            (r#"{"verdict": "yes""#, Some(Verdict::Yes)),
            ("Yesterday it rained", None),
            ("Nothing", None),
            ("maybe", None),
            ("I think yes", None),
            ("", None),
            ("   ", None),
            ("***", None),
            ("Verdict:", None),
            (r#"{"reason": "x"}"#, None),
            ("N/A", None),
            ("🙂", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_verdict(text), *want, "input {text:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_verdict_never_panics(s in "\\PC*") {
            let _ = parse_verdict(&s);
            let _ = extract_sql(&s);
            let _ = has_top_level_order_by(&s);
            let _ = json_valid(&s);
            let _ = normalize_answer(&s);
        }

        #[test]
        fn parse_verdict_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = parse_verdict(&s);
            let _ = extract_sql(&s);
            let _ = has_top_level_order_by(&s);
            let _ = token_f1(&s, "a b");
            let _ = rouge_l(&s, "a b");
        }

        #[test]
        fn schema_hint_never_panics(
            prefix in "\\PC{0,8}",
            kind in 0usize..3,
            name in "\\PC{0,24}",
        ) {
            let conn = rusqlite::Connection::open_in_memory().expect("in-memory db");
            conn.execute_batch("CREATE TABLE \"İt_ems\" (\"naMe\" TEXT, ID INTEGER);")
                .expect("create table");
            let p = ["no such table: ", "No such column: ", "ambiguous column name: "][kind];
            let hint = schema_hint(&conn, &format!("{prefix}{p}{name}"));
            prop_assert!(hint.is_some_and(|h| h.contains("İt_ems(naMe, ID)")));
        }

        #[test]
        fn yes_with_any_suffix_is_yes(suffix in any::<String>()) {
            let text = format!("yes {suffix}");
            prop_assert_eq!(parse_verdict(&text), Some(Verdict::Yes));
        }

        #[test]
        fn f1_and_rouge_are_bounded(a in "[a-e ]{0,12}", b in "[a-e ]{0,12}") {
            let f = token_f1(&a, &b);
            let r = rouge_l(&a, &b);
            prop_assert!((0.0..=1.0).contains(&f));
            prop_assert!((0.0..=1.0).contains(&r));
            prop_assert!(r <= f + 1e-12);
        }
    }

    #[test]
    fn context_precision_examples() {
        assert_eq!(context_precision(&[]), None);
        assert_eq!(context_precision(&[false, false]), Some(0.0));
        assert_eq!(context_precision(&[true, true]), Some(1.0));
        // Relevant at ranks 1 and 3: (1/1 + 2/3) / 2 = 5/6.
        assert!(close(
            context_precision(&[true, false, true]).unwrap_or(-1.0),
            5.0 / 6.0
        ));
        // Relevant at rank 2 only: (1/2) / 1.
        assert!(close(
            context_precision(&[false, true, false]).unwrap_or(-1.0),
            0.5
        ));
    }

    #[test]
    fn recall_and_rr_examples() {
        let ranked = [false, true, false, true];
        assert_eq!(recall_and_rr(&ranked, 1, 2), (0.0, 0.0));
        assert_eq!(recall_and_rr(&ranked, 2, 2), (0.5, 0.5));
        assert_eq!(recall_and_rr(&ranked, 10, 2), (1.0, 0.5));
        assert_eq!(recall_and_rr(&ranked, 4, 4), (0.5, 0.5));
        assert_eq!(recall_and_rr(&ranked, 4, 0), (0.0, 0.5));
        assert_eq!(recall_and_rr(&[], 5, 3), (0.0, 0.0));
        assert_eq!(recall_and_rr(&[true, true], 2, 1), (1.0, 1.0));
        assert_eq!(recall_and_rr(&[true], 0, 1), (0.0, 0.0));
    }

    #[test]
    fn bootstrap_examples() {
        assert_eq!(bootstrap_ci(&[], 100, 1), (0.0, 0.0));
        assert_eq!(bootstrap_ci(&[0.7], 100, 1), (0.7, 0.7));
        assert_eq!(bootstrap_ci(&[1.0; 20], 500, 3), (1.0, 1.0));
        let values: Vec<f64> = (0..50)
            .map(|i| if i % 3 == 0 { 1.0 } else { 0.0 })
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let a = bootstrap_ci(&values, 1000, 42);
        assert_eq!(a, bootstrap_ci(&values, 1000, 42));
        assert_ne!(a, bootstrap_ci(&values, 1000, 43));
        assert!(a.0 < mean && mean < a.1, "{a:?} around {mean}");
        assert!(a.0 >= 0.0 && a.1 <= 1.0);
        assert_eq!(bootstrap_ci(&[1.0, 3.0], 0, 1), (2.0, 2.0));
        let _ = bootstrap_ci(&[f64::NAN, 1.0], 10, 1);
    }
}
