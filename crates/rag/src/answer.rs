//! Answering from retrieved context: numbered passages under a token budget, an instruction to
//! answer only from them and cite them as `[n]`, the citations parsed back into a source list,
//! a relevance gate that answers "I don't know" without calling the model when nothing
//! retrieved is close to the question, and an optional fact-check of every answer sentence.

use flywheel_api::{GenerateRequest, NullSink, RetrievedChunk, SamplingParams, TokenSink};

use crate::llm::Llm;
use crate::search::{SearchOptions, Searcher};
use crate::Result;

/// The reply used when the context does not hold the answer.
pub const DONT_KNOW: &str = "I don't know: the indexed documents do not answer this question.";

const SYSTEM: &str = "You answer questions using only the numbered context passages. \
Cite the passages you use with their numbers in brackets, like [1] or [2]. \
If the passages do not contain the answer, reply exactly: I don't know.";

/// How to answer.
#[derive(Debug, Clone)]
pub struct AskOptions {
    /// How to retrieve the context.
    pub search: SearchOptions,
    /// Most tokens (of the generator) of context passages.
    pub context_tokens: usize,
    /// Most tokens in the answer.
    pub max_tokens: usize,
    /// The best retrieved passage must reach this cosine similarity to the question, or the
    /// answer is "I don't know" (0 turns the gate off).
    pub min_similarity: f32,
    /// Ask the model whether each answer sentence is supported by the passages it cites.
    pub fact_check: bool,
    /// Sampling for the answer (greedy with repeat penalty 1.1 by default).
    pub sampling: SamplingParams,
}

impl Default for AskOptions {
    fn default() -> Self {
        Self {
            search: SearchOptions::default(),
            context_tokens: 1200,
            max_tokens: 256,
            min_similarity: 0.25,
            fact_check: false,
            // Greedy, with a mild repeat penalty: small models otherwise loop on one sentence.
            sampling: SamplingParams {
                repeat_penalty: 1.1,
                ..SamplingParams::greedy()
            },
        }
    }
}

/// One answer sentence and its fact-check verdict.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CheckedSentence {
    /// The sentence.
    pub sentence: String,
    /// P(supported) from the model.
    pub support: f32,
    /// `support >= 0.5`.
    pub supported: bool,
}

/// An answer with its sources.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Answer {
    /// The model's answer (or [`DONT_KNOW`]).
    pub text: String,
    /// The passages given to the model, numbered from 1 in this order.
    pub context: Vec<RetrievedChunk>,
    /// Passage numbers the answer cites (valid ones, in first-cited order).
    pub cited: Vec<usize>,
    /// Numbers the answer cites that match no passage.
    pub invalid_citations: Vec<usize>,
    /// True when the answer says it does not know (or the relevance gate said so).
    pub declined: bool,
    /// Fact-check verdicts, when asked for.
    pub checks: Vec<CheckedSentence>,
}

impl Answer {
    /// The answer followed by its numbered source list, as the CLI prints it.
    pub fn render(&self) -> String {
        let mut out = self.text.trim().to_string();
        if !self.checks.is_empty() {
            let bad: Vec<&CheckedSentence> = self.checks.iter().filter(|c| !c.supported).collect();
            if !bad.is_empty() {
                out.push_str("\n\nNot supported by the cited passages:");
                for c in bad {
                    out.push_str(&format!("\n  - {} (p={:.2})", c.sentence, c.support));
                }
            }
        }
        let listed: Vec<usize> = if self.cited.is_empty() {
            (1..=self.context.len()).collect()
        } else {
            self.cited.clone()
        };
        if !listed.is_empty() && !self.declined {
            out.push_str(if self.cited.is_empty() {
                "\n\nSources (retrieved, not cited):"
            } else {
                "\n\nSources:"
            });
            for n in listed {
                let c = &self.context[n - 1];
                let head = if c.heading.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", c.heading)
                };
                out.push_str(&format!(
                    "\n  [{n}] {}:{}-{}{head}",
                    c.path, c.lines.0, c.lines.1
                ));
            }
        }
        out
    }
}

/// Citation numbers in `text`: `[1]`, `[2, 3]`, `[1][4]`.
pub fn parse_citations(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        let inside = &rest[..close];
        if inside
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
            && inside.chars().any(|c| c.is_ascii_digit())
        {
            for n in inside
                .split(',')
                .filter_map(|p| p.trim().parse::<usize>().ok())
            {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        rest = &rest[close + 1..];
    }
    out
}

/// Sentences of an answer (split after `.`, `!`, `?` followed by space, and at newlines).
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == '\n' {
            if !cur.trim().is_empty() {
                out.push(cur.trim().to_string());
            }
            cur.clear();
            continue;
        }
        cur.push(c);
        let next_space = chars.get(i + 1).is_none_or(|n| n.is_whitespace());
        if matches!(c, '.' | '!' | '?') && next_space && cur.trim().len() > 1 {
            out.push(cur.trim().to_string());
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// How a passage is named to the model and in source lists: `path — heading` (or the path).
pub fn source_label(h: &RetrievedChunk) -> String {
    if h.heading.is_empty() {
        h.path.clone()
    } else {
        format!("{} — {}", h.path, h.heading)
    }
}

/// The prompt's context block: numbered passages, as many as fit `budget` tokens.
pub fn build_context(
    hits: &[RetrievedChunk],
    budget: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> (String, Vec<RetrievedChunk>) {
    let mut text = String::new();
    let mut used = Vec::new();
    let mut tokens = 0usize;
    for h in hits {
        let head = source_label(h);
        let block = format!("[{}] ({head})\n{}\n\n", used.len() + 1, h.text.trim());
        let n = count_tokens(&block);
        if tokens + n > budget && !used.is_empty() {
            break;
        }
        tokens += n;
        text.push_str(&block);
        used.push(h.clone());
    }
    (text, used)
}

/// Retrieves context for `question` and answers it with citations; the answer streams into `sink`.
pub fn ask(
    searcher: &Searcher<'_>,
    llm: &Llm<'_>,
    question: &str,
    opts: &AskOptions,
    sink: &mut dyn TokenSink,
) -> Result<Answer> {
    let found = searcher.search(question, &opts.search)?;
    let qv = if found.query_vector.is_empty() {
        searcher.embed_query(question)?
    } else {
        found.query_vector.clone()
    };
    let best = found
        .hits
        .iter()
        .filter_map(|h| searcher.similarity(&qv, h.chunk_id))
        .fold(f32::NEG_INFINITY, f32::max);
    let gate_closed =
        found.hits.is_empty() || (opts.min_similarity > 0.0 && best < opts.min_similarity);
    if gate_closed {
        return Ok(Answer {
            text: DONT_KNOW.into(),
            context: Vec::new(),
            cited: Vec::new(),
            invalid_citations: Vec::new(),
            declined: true,
            checks: Vec::new(),
        });
    }
    let model = llm.model();
    let count = |s: &str| llm.count_tokens(s);
    // The passages get what the window leaves after the instructions, question and answer.
    let overhead = count(SYSTEM) + count(question) + 32;
    let budget = opts
        .context_tokens
        .min(llm.context_len().saturating_sub(overhead + opts.max_tokens));
    let (context_text, context) = build_context(&found.hits, budget, &count);
    let user = format!("Context:\n{context_text}Question: {question}");
    let prompt = match model.chat_template() {
        Some(_) => model.render_chat(&[
            flywheel_api::ChatMessage::new("system", SYSTEM),
            flywheel_api::ChatMessage::new("user", &user),
        ])?,
        None => format!("{SYSTEM}\n\n{user}\n\nAnswer:"),
    };
    let mut req = GenerateRequest::new(prompt, opts.max_tokens);
    req.sampling = opts.sampling.clone();
    let out = model.generate(&req, sink)?;
    let text = out.text.trim().to_string();
    let all = parse_citations(&text);
    let (cited, invalid_citations): (Vec<usize>, Vec<usize>) =
        all.into_iter().partition(|&n| n >= 1 && n <= context.len());
    let declined = text.to_lowercase().contains("i don't know")
        || text.to_lowercase().contains("i do not know");
    let mut checks = Vec::new();
    if opts.fact_check && !declined {
        let sents: Vec<String> = sentences(&text)
            .into_iter()
            .filter(|s| s.split_whitespace().count() >= 3)
            .collect();
        let passages: Vec<String> = sents
            .iter()
            .map(|s| {
                let refs: Vec<usize> = parse_citations(s)
                    .into_iter()
                    .filter(|&n| n >= 1 && n <= context.len())
                    .collect();
                let use_: Vec<usize> = if refs.is_empty() {
                    (1..=context.len()).collect()
                } else {
                    refs
                };
                use_.iter()
                    .map(|&n| context[n - 1].text.as_str())
                    .collect::<Vec<_>>()
                    .join("\n\n")
            })
            .collect();
        let pairs: Vec<(&str, &str)> = sents
            .iter()
            .zip(&passages)
            .map(|(s, p)| (s.as_str(), p.as_str()))
            .collect();
        let probs = llm.supported(&pairs)?;
        checks = sents
            .into_iter()
            .zip(probs)
            .map(|(sentence, support)| CheckedSentence {
                sentence,
                support,
                supported: support >= 0.5,
            })
            .collect();
    }
    Ok(Answer {
        text,
        context,
        cited,
        invalid_citations,
        declined,
        checks,
    })
}

/// Answers without streaming.
pub fn ask_quiet(
    searcher: &Searcher<'_>,
    llm: &Llm<'_>,
    question: &str,
    opts: &AskOptions,
) -> Result<Answer> {
    ask(searcher, llm, question, opts, &mut NullSink)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_parse_in_all_shapes() {
        assert_eq!(
            parse_citations("A [1]. B [2, 3][1] and [x] [] [10]"),
            vec![1, 2, 3, 10]
        );
        assert_eq!(parse_citations("no refs"), Vec::<usize>::new());
        assert_eq!(parse_citations("unclosed [4"), Vec::<usize>::new());
    }

    #[test]
    fn sentences_split_on_terminators_not_decimals() {
        assert_eq!(
            sentences("Use pdb [1]. It costs 1.5 s! Really?\nNew line"),
            vec!["Use pdb [1].", "It costs 1.5 s!", "Really?", "New line"]
        );
    }

    #[test]
    fn context_respects_the_budget_but_keeps_one_passage() {
        let chunk = |id: i64, text: &str| RetrievedChunk {
            chunk_id: id,
            path: "a.md".into(),
            heading: "H".into(),
            text: text.into(),
            span: (0, 0),
            lines: (1, 1),
            score: 0.0,
        };
        let hits = vec![
            chunk(1, "one two three"),
            chunk(2, "four five six"),
            chunk(3, "seven"),
        ];
        let words = |s: &str| s.split_whitespace().count();
        let (text, used) = build_context(&hits, 16, &words);
        assert_eq!(used.len(), 2, "{text}");
        assert!(text.starts_with("[1] (a.md — H)\none two three"));
        assert!(text.contains("[2] (a.md — H)\nfour five six"));
        let (_, used) = build_context(&hits, 1, &words);
        assert_eq!(used.len(), 1, "the best passage always goes in");
    }
}
