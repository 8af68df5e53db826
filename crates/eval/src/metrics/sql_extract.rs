//! SQL as text: a small SQL lexer (string literals, quoted identifiers and comments as single
//! tokens), the query extracted from a reply, top-level ORDER BY detection, and the
//! normalisation under which two queries are compared as text.

use super::fence::first_fence;

/// Kinds of significant SQL tokens (whitespace and comments are dropped by the lexer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokKind {
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
pub(super) struct Tok {
    /// The token's kind.
    pub(super) kind: TokKind,
    /// Byte offset of its first byte.
    pub(super) start: usize,
    /// Byte offset just past its last byte.
    pub(super) end: usize,
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
pub(super) fn lex(sql: &str) -> Vec<Tok> {
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

/// SQL compared as text: lower case outside string literals, single spaces, no trailing
/// semicolon.
///
/// Text inside '…' and "…" keeps its case, so `'Paris'` and `'paris'` differ (SQLite compares
/// strings case-sensitively, and reads a double-quoted name that is no column as a string, as
/// the gold queries do for values); keywords and names, bare or in backticks or brackets, are
/// lowercased. A quote inside a comment opens no literal.
pub fn normalize_sql(s: &str) -> String {
    let mut folded = String::with_capacity(s.len());
    let mut at = 0;
    for t in lex(s) {
        if matches!(s.as_bytes()[t.start], b'\'' | b'"') {
            folded.push_str(&s[at..t.start].to_lowercase());
            folded.push_str(&s[t.start..t.end]);
            at = t.end;
        }
    }
    folded.push_str(&s[at..].to_lowercase());
    folded
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(';')
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn normalize_sql_keeps_the_case_of_string_literals() {
        assert_ne!(
            normalize_sql("SELECT id FROM t WHERE city = 'Paris'"),
            normalize_sql("SELECT id FROM t WHERE city = 'paris'")
        );
        assert_ne!(
            normalize_sql("SELECT id FROM t WHERE city = \"Paris\""),
            normalize_sql("SELECT id FROM t WHERE city = \"paris\"")
        );
        // Keywords and names still fold, whitespace collapses, trailing ';' go.
        assert_eq!(
            normalize_sql("SELECT Name\n  FROM Cities WHERE City = 'Paris' ;;"),
            normalize_sql("select name from cities where city = 'Paris'")
        );
        assert_eq!(
            normalize_sql("SELECT Name\n  FROM Cities WHERE City = 'Paris' ;;"),
            "select name from cities where city = 'Paris'"
        );
        assert_eq!(
            normalize_sql(
                "SELECT [Full Name], `Age` FROM T WHERE A = \"It\"\"s\" OR B = 'O''Neil'"
            ),
            "select [full name], `age` from t where a = \"It\"\"s\" or b = 'O''Neil'"
        );
        // A quote in a comment opens no literal; an unterminated literal runs to the end.
        assert_eq!(
            normalize_sql("SELECT A -- it's\nFROM T"),
            "select a -- it's from t"
        );
        assert_eq!(normalize_sql("SELECT 'Open END"), "select 'Open END");
        assert_eq!(normalize_sql(""), "");
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
}
