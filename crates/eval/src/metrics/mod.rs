//! Scoring metrics for evaluation runs, one module per kind: text metrics ([`exact_match`],
//! [`token_f1`], [`rouge_l`], [`json_valid`]), SQL extraction and comparison as text
//! ([`extract_sql`], [`normalize_sql`]), SQL execution on SQLite with error classes
//! ([`sql_execution_match`]) and schema hints ([`schema_hint`]), judge verdicts
//! ([`parse_verdict`]), retrieval metrics ([`context_precision`], [`recall_and_rr`], from `flywheel_rag::metrics`,
//! which `flywheel rag eval` uses too) and
//! bootstrap intervals ([`bootstrap_ci`]).
//!
//! Everything here is pure computation (plus read-only SQLite queries) and never panics on any
//! input text.

mod fence;
mod schema;
mod sql_exec;
mod sql_extract;
mod stats;
mod text;
mod verdict;

/// Retrieval metrics: one implementation, in `flywheel_rag::metrics`.
pub use flywheel_rag::metrics::{context_precision, recall_and_rr};
pub use schema::{schema_columns, schema_hint, sql_feedback};
pub use sql_exec::{
    classify_sqlite_error, execute, num_cell, open_read_only, sql_execution_match, with_timeout,
    Cell, ExecError, SqlErrorClass, SqlOutcome,
};
pub use sql_extract::{extract_sql, has_top_level_order_by, normalize_sql};
pub use stats::{bootstrap_ci, mcnemar_exact};
pub use text::{exact_match, json_valid, normalize_answer, rouge_l, token_f1};
pub use verdict::{parse_verdict, Verdict};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_verdict_never_panics(s in "\\PC*") {
            let _ = parse_verdict(&s);
            let _ = extract_sql(&s);
            let _ = has_top_level_order_by(&s);
            let _ = json_valid(&s);
            let _ = normalize_answer(&s);
            let _ = normalize_sql(&s);
        }

        #[test]
        fn parse_verdict_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = parse_verdict(&s);
            let _ = extract_sql(&s);
            let _ = has_top_level_order_by(&s);
            let _ = token_f1(&s, "a b");
            let _ = rouge_l(&s, "a b");
            let _ = normalize_sql(&s);
        }
    }
}
