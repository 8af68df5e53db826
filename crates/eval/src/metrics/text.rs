//! Text metrics: SQuAD-style answer normalisation, exact match, token F1, ROUGE-L and JSON
//! validity.

use std::collections::HashMap;

use super::fence::strip_surrounding_fence;

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
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        #[test]
        fn f1_and_rouge_are_bounded(a in "[a-e ]{0,12}", b in "[a-e ]{0,12}") {
            let f = token_f1(&a, &b);
            let r = rouge_l(&a, &b);
            prop_assert!((0.0..=1.0).contains(&f));
            prop_assert!((0.0..=1.0).contains(&r));
            prop_assert!(r <= f + 1e-12);
        }
    }
}
