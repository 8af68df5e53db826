//! Markdown code fences: finding the first fenced block of a model's output (its language tag,
//! contents and what follows it), used by JSON validity, SQL extraction and verdict parsing.

/// One fenced code block: its info string (language tag, possibly empty), its contents and
/// the text after its closing fence (empty when the fence is not closed).
pub(super) struct Fence<'a> {
    /// The info string (language tag), possibly empty.
    pub(super) info: &'a str,
    /// The block's contents.
    pub(super) body: &'a str,
    /// The text after the closing fence.
    pub(super) rest: &'a str,
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
pub(super) fn first_fence(text: &str) -> Option<Fence<'_>> {
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
pub(super) fn strip_surrounding_fence(t: &str) -> &str {
    if !t.starts_with("```") {
        return t;
    }
    match first_fence(t) {
        Some(f) if f.rest.trim().is_empty() => f.body,
        _ => t,
    }
}
