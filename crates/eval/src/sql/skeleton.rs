//! Few-shot examples chosen by structure, not topic (DAIL-SQL's idea): a question with its
//! schema words and values masked, and the skeleton of a query (its keywords and punctuation,
//! every name and value a `_`).
//!
//! `few_shot.select = "skeleton"` ranks examples by the similarity of the masked questions
//! (embedded) plus the similarity of the example's SQL skeleton to the skeleton of a draft
//! answer to the question.

/// SQL words a skeleton keeps (lowercase); every other word is a name and becomes `_`.
const KEEP: &[&str] = &[
    "select",
    "distinct",
    "from",
    "where",
    "group",
    "by",
    "having",
    "order",
    "limit",
    "offset",
    "join",
    "inner",
    "left",
    "outer",
    "cross",
    "on",
    "using",
    "as",
    "and",
    "or",
    "not",
    "in",
    "like",
    "between",
    "is",
    "null",
    "exists",
    "union",
    "intersect",
    "except",
    "all",
    "asc",
    "desc",
    "case",
    "when",
    "then",
    "else",
    "end",
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "cast",
];

/// The skeleton of `sql`: keywords (lowercase) and punctuation kept; names, qualified names,
/// numbers and strings each become one `_`.
pub fn sql_skeleton(sql: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let b = sql.as_bytes();
    let mut i = 0;
    let hole = |out: &mut Vec<String>| {
        // `t.col` is one hole: a hole right after `_ .` replaces both.
        if out.len() >= 2 && out[out.len() - 1] == "." && out[out.len() - 2] == "_" {
            out.pop();
        } else {
            out.push("_".into());
        }
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'\'' || c == b'"' || c == b'`' || c == b'[' {
            let close = if c == b'[' { b']' } else { c };
            i += 1;
            while i < b.len() && b[i] != close {
                i += 1;
            }
            i += 1;
            hole(&mut out);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let w = sql[s..i].to_ascii_lowercase();
            if KEEP.contains(&w.as_str()) {
                out.push(w);
            } else {
                hole(&mut out);
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            hole(&mut out);
        } else {
            // One operator or punctuation character (two for <=, >=, <>, !=, ||, ==).
            let two = sql.get(i..i + 2).unwrap_or("");
            let op = if ["<=", ">=", "<>", "!=", "||", "=="].contains(&two) {
                two
            } else {
                &sql[i..i + sql[i..].chars().next().map_or(1, char::len_utf8)]
            };
            i += op.len();
            if op != ";" {
                out.push(op.to_string());
            }
        }
    }
    out
}

/// How alike two skeletons are: 1 minus their token edit distance over the longer length.
pub fn skeleton_similarity(a: &[String], b: &[String]) -> f64 {
    let n = a.len().max(b.len());
    if n == 0 {
        return 1.0;
    }
    1.0 - strsim::generic_levenshtein(&a.to_vec(), &b.to_vec()) as f64 / n as f64
}

/// `question` with the words that name a table or column of its database (or a part of a
/// name split at `_`), numbers and quoted values replaced by `<mask>`: what is left is its
/// structure (`How many <mask> are there with <mask> above <mask>?`).
pub fn mask_question(question: &str, names: &[String]) -> String {
    let mut words: Vec<String> = Vec::new();
    for n in names {
        let lower = n.to_lowercase();
        words.extend(
            lower
                .split(|c: char| !c.is_alphanumeric())
                .map(str::to_string),
        );
        words.push(lower);
    }
    words.retain(|w| w.chars().count() > 2);
    fn singular(w: &str) -> [Option<&str>; 2] {
        [w.strip_suffix("es"), w.strip_suffix('s')]
    }
    let mut out: Vec<String> = Vec::new();
    let mut in_quote = false;
    for token in question.split_whitespace() {
        let starts = token.starts_with(['"', '\'']);
        // A closing quote may be followed by punctuation (`"France",`).
        let bare = token.trim_end_matches(['.', ',', ';', ':', '!', '?', ')']);
        let ends = bare.len() > 1 && bare.ends_with(['"', '\'']);
        if in_quote || starts {
            in_quote = !ends && (in_quote || starts);
            if out.last().map(String::as_str) != Some("<mask>") {
                out.push("<mask>".into());
            }
            continue;
        }
        let core: String = token
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        let is_name = !core.is_empty()
            && (words.contains(&core)
                || singular(&core)
                    .iter()
                    .flatten()
                    .any(|s| words.iter().any(|w| w == s)));
        let is_number = !core.is_empty() && core.chars().all(|c| c.is_ascii_digit() || c == '.');
        if is_name || is_number {
            let tail: String = token
                .chars()
                .rev()
                .take_while(|c| !c.is_alphanumeric())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out.push(format!("<mask>{tail}"));
        } else {
            out.push(token.to_string());
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeletons_keep_keywords_and_punctuation_only() {
        let s = sql_skeleton(
            "SELECT T1.name, count(*) FROM singer AS T1 JOIN concert AS T2 ON T1.id = T2.sid \
             WHERE T2.year > 2014 AND T1.country = 'France' GROUP BY T1.name ORDER BY count(*) DESC LIMIT 3;",
        );
        assert_eq!(
            s.join(" "),
            "select _ , count ( * ) from _ as _ join _ as _ on _ = _ where _ > _ and _ = _ \
             group by _ order by count ( * ) desc limit _"
        );
        // Same structure, other names and values: the same skeleton.
        assert_eq!(
            sql_skeleton("select count(*) from pets where weight >= 10.5"),
            sql_skeleton("SELECT COUNT(*) FROM dogs WHERE \"age\" >= 3")
        );
        assert_eq!(
            skeleton_similarity(
                &sql_skeleton("SELECT a FROM t"),
                &sql_skeleton("SELECT b FROM u")
            ),
            1.0
        );
        let far = skeleton_similarity(
            &sql_skeleton("SELECT a FROM t"),
            &sql_skeleton("SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 2"),
        );
        assert!(far > 0.0 && far < 0.5, "{far}");
    }

    #[test]
    fn questions_lose_their_schema_words_numbers_and_quoted_values() {
        let names: Vec<String> = ["singer", "concert", "Song_Name", "Country"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            mask_question(
                "How many singers are from the country \"United States\"?",
                &names
            ),
            "How many <mask> are from the <mask>"
        );
        assert_eq!(
            mask_question("Singers from \"France\", older than 30?", &names),
            "<mask> from <mask> older than <mask>?"
        );
        assert_eq!(
            mask_question("Show the song names of concerts after 2014.", &names),
            "Show the <mask> <mask> of <mask> after <mask>."
        );
    }
}
