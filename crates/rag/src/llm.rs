//! The generator's jobs in retrieval: HyDE (write a hypothetical answer), query decomposition
//! (split a multi-part question), relevance and support judgements read from the model's
//! next-token probability of "yes" versus "no". A [`Reranker`] trait lets a cross-encoder
//! replace the generator's pointwise judgement when such weights exist.

use flywheel_api::{ChatMessage, GenerateRequest, NullSink, SamplingParams};
use flywheel_runtime::TextModel;

use crate::Result;

/// Scores passages for relevance to a query (higher is more relevant).
pub trait Reranker {
    /// One score per passage, in order.
    fn score(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>>;
}

/// A generator model put to retrieval work.
pub struct Llm<'a> {
    model: &'a TextModel,
    yes: Vec<u32>,
    no: Vec<u32>,
    /// Passages longer than this many characters are cut before a judgement.
    pub max_passage_chars: usize,
    /// Prompts scored together in one batch.
    pub batch_size: usize,
}

fn single_tokens(model: &TextModel, words: &[&str]) -> Vec<u32> {
    let mut ids: Vec<u32> = words
        .iter()
        .filter_map(|w| {
            let t = model.tokenizer().encode(w, false).ok()?;
            (t.len() == 1).then(|| t[0])
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl<'a> Llm<'a> {
    /// Wraps a loaded model.
    pub fn new(model: &'a TextModel) -> Self {
        Self {
            yes: single_tokens(model, &["yes", "Yes", " yes", " Yes", "YES"]),
            no: single_tokens(model, &["no", "No", " no", " No", "NO"]),
            model,
            max_passage_chars: 1200,
            batch_size: 4,
        }
    }

    /// The model.
    pub fn model(&self) -> &TextModel {
        self.model
    }

    /// A system + user chat turn rendered with the model's template (plain text without one).
    pub fn chat_prompt(&self, system: &str, user: &str) -> Result<String> {
        self.prompt(system, user)
    }

    /// Whether the tokenizer has single-token yes and no words (judgements need them).
    pub fn can_judge(&self) -> bool {
        !self.yes.is_empty() && !self.no.is_empty()
    }

    /// Builds a prompt around `passage`, cut until `reserve` tokens of the window stay free.
    pub fn fit_passage(
        &self,
        passage: &str,
        reserve: usize,
        build: &dyn Fn(&str) -> Result<String>,
    ) -> Result<String> {
        self.fit(passage, reserve, build)
    }

    fn prompt(&self, system: &str, user: &str) -> Result<String> {
        let msgs = [
            ChatMessage::new("system", system),
            ChatMessage::new("user", user),
        ];
        Ok(match self.model.chat_template() {
            Some(_) => self.model.render_chat(&msgs)?,
            None => format!("{system}\n\n{user}\n\nAnswer:"),
        })
    }

    /// The model's context window in tokens.
    pub fn context_len(&self) -> usize {
        self.model.model().config().max_position_embeddings
    }

    /// Tokens of `text` for this model.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.model
            .tokenizer()
            .encode(text, false)
            .map_or(text.len() / 3 + 1, |t| t.len())
    }

    /// Builds a prompt around `passage`, cutting the passage (at most `max_passage_chars`, then
    /// shorter) until the prompt leaves `reserve` tokens of the context window free.
    fn fit(
        &self,
        passage: &str,
        reserve: usize,
        build: &dyn Fn(&str) -> Result<String>,
    ) -> Result<String> {
        let limit = self.context_len().saturating_sub(reserve + 1);
        let mut p = self.cut(passage, self.max_passage_chars);
        loop {
            let prompt = build(p)?;
            let n = self.count_tokens(&prompt);
            if n <= limit || p.is_empty() {
                return Ok(prompt);
            }
            let keep = (p.len() as f64 * 0.9 * limit as f64 / n as f64) as usize;
            p = self.cut(p, keep.min(p.len().saturating_sub(1)));
        }
    }

    /// Greedy completion of a chat turn (the answer is cut short if the window is nearly full).
    pub fn complete(&self, system: &str, user: &str, max_tokens: usize) -> Result<String> {
        let prompt = self.prompt(system, user)?;
        let room = self
            .context_len()
            .saturating_sub(self.count_tokens(&prompt) + 2);
        let mut req = GenerateRequest::new(prompt, max_tokens.min(room.max(1)));
        req.sampling = SamplingParams::greedy();
        Ok(self
            .model
            .generate(&req, &mut NullSink)?
            .text
            .trim()
            .to_string())
    }

    /// HyDE: a short passage that would answer the question (its facts may be wrong; only its
    /// wording is used to search).
    pub fn hyde(&self, question: &str) -> Result<String> {
        self.complete(
            "You write short documentation passages.",
            &format!("Write a short passage (two or three sentences) from technical documentation that answers this question.\n\nQuestion: {question}"),
            80,
        )
    }

    /// Splits a multi-part question into at most four sub-questions; a simple question comes
    /// back alone. The original question is always the first entry.
    pub fn decompose(&self, question: &str) -> Result<Vec<String>> {
        let text = self.complete(
            "You split questions into simpler questions.",
            &format!("If this question asks several things, write each part as a separate question, one per line. If it asks one thing, repeat it.\n\nQuestion: {question}"),
            96,
        )?;
        let mut out = vec![question.trim().to_string()];
        for line in text.lines() {
            let q = line
                .trim()
                .trim_start_matches(|c: char| {
                    c.is_ascii_digit() || matches!(c, '.' | ')' | '-' | '*' | ' ')
                })
                .trim();
            if q.len() >= 8 && !out.iter().any(|o| o.eq_ignore_ascii_case(q)) && out.len() < 5 {
                out.push(q.to_string());
            }
        }
        Ok(out)
    }

    /// P("yes") against P("no") for the next token after each prompt (0.5 when the
    /// tokenizer has no single-token yes/no).
    pub fn yes_probability(&self, prompts: &[String]) -> Result<Vec<f32>> {
        Ok(self
            .yes_probability_checked(prompts)?
            .into_iter()
            .map(|p| p.unwrap_or(0.5))
            .collect())
    }

    /// P("yes") against P("no"), or `None` where it cannot be read (no single-token yes/no in
    /// the vocabulary, or non-finite logits).
    pub fn yes_probability_checked(&self, prompts: &[String]) -> Result<Vec<Option<f32>>> {
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.model.encode_prompt(p))
            .collect::<std::result::Result<_, _>>()?;
        let logits = self.model.next_token_logits(&ids, self.batch_size)?;
        Ok(logits
            .iter()
            .map(|l| {
                let best = |set: &[u32]| {
                    set.iter()
                        .filter_map(|&i| l.get(i as usize).copied())
                        .fold(f32::NEG_INFINITY, f32::max)
                };
                let (y, n) = (best(&self.yes), best(&self.no));
                if !y.is_finite() || !n.is_finite() {
                    return None;
                }
                let m = y.max(n);
                let (ey, en) = ((y - m).exp(), (n - m).exp());
                Some(ey / (ey + en))
            })
            .collect())
    }

    fn cut<'t>(&self, s: &'t str, max: usize) -> &'t str {
        if s.len() <= max {
            return s;
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }

    /// P(yes) that each statement is supported by its passage.
    pub fn supported(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>> {
        let prompts = pairs
            .iter()
            .map(|(statement, passage)| {
                self.fit(passage, 1, &|p| {
                    self.prompt(
                        "You check facts. Answer only yes or no.",
                        &format!(
                            "Passage:\n{p}\n\nStatement: {statement}\n\nIs the statement supported by the passage? Answer yes or no."
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.yes_probability(&prompts)
    }
}

impl Reranker for Llm<'_> {
    fn score(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>> {
        let prompts = passages
            .iter()
            .map(|passage| {
                self.fit(passage, 1, &|p| {
                    self.prompt(
                        "You judge search results. Answer only yes or no.",
                        &format!(
                            "Passage:\n{p}\n\nQuestion: {query}\n\nDoes the passage help answer the question? Answer yes or no."
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.yes_probability(&prompts)
    }
}
