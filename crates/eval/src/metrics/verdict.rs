//! Judge verdicts: a yes/no verdict read from a judge model's free text or JSON.

use super::fence::strip_surrounding_fence;

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
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        fn yes_with_any_suffix_is_yes(suffix in any::<String>()) {
            let text = format!("yes {suffix}");
            prop_assert_eq!(parse_verdict(&text), Some(Verdict::Yes));
        }
    }
}
