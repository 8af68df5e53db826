//! SQL execution on SQLite: read-only, single-statement queries under a timeout, normalised
//! result cells, error classes, and execution accuracy against a gold query.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::sql_extract::{has_top_level_order_by, lex, TokKind};

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
    with_timeout(conn, timeout, || read_rows(conn, stmt, max_rows, timeout))
}

/// Runs `f` (statements on `conn`) under a watchdog thread that interrupts the connection once
/// `timeout` has passed.
pub fn with_timeout<T>(
    conn: &rusqlite::Connection,
    timeout: Duration,
    f: impl FnOnce() -> Result<T, ExecError>,
) -> Result<T, ExecError> {
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
    let result = f();
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
#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

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
}
