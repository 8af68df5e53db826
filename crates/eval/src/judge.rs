//! The local judge: Ragas-style RAG metrics (faithfulness, answer relevancy, context precision,
//! context recall) decided by a local model whose verdict is constrained to yes/no. A verdict
//! that cannot be read is `None`, counted by the caller, and never becomes a NaN.

use flywheel_api::{GenerateRequest, NullSink, SamplingParams};
use flywheel_rag::answer::sentences;
use flywheel_rag::Llm;

use crate::metrics::{context_precision, parse_verdict, Verdict};
use crate::spec::JudgeMethod;
use crate::Result;

const SYSTEM: &str = "You are a strict grader. Answer only yes or no.";

/// A judge over a loaded model.
pub struct Judge<'a> {
    llm: &'a Llm<'a>,
    method: JudgeMethod,
}

/// One metric's value, or why there is none.
pub type Scored = std::result::Result<f64, String>;

impl<'a> Judge<'a> {
    /// A judge reading verdicts by `method`.
    pub fn new(llm: &'a Llm<'a>, method: JudgeMethod) -> Self {
        Self { llm, method }
    }

    /// Verdicts (as P(yes) or 1/0) for prompts; `None` where unreadable.
    fn verdicts(&self, prompts: &[String]) -> Result<Vec<Option<f64>>> {
        match self.method {
            JudgeMethod::Logprob => {
                if !self.llm.can_judge() {
                    return Ok(vec![None; prompts.len()]);
                }
                Ok(self
                    .llm
                    .yes_probability_checked(prompts)?
                    .into_iter()
                    .map(|p| p.map(f64::from))
                    .collect())
            }
            JudgeMethod::Generate => prompts
                .iter()
                .map(|p| {
                    let mut req = GenerateRequest::new(p.clone(), 8);
                    req.sampling = SamplingParams::greedy();
                    let out = self.llm.model().generate(&req, &mut NullSink)?;
                    Ok(parse_verdict(&out.text).map(|v| match v {
                        Verdict::Yes => 1.0,
                        Verdict::No => 0.0,
                    }))
                })
                .collect(),
        }
    }

    fn supported_prompts(&self, claims: &[String], passage: &str) -> Result<Vec<String>> {
        claims
            .iter()
            .map(|c| {
                self.llm.fit_passage(passage, 8, &|p| {
                    self.llm.chat_prompt(
                        SYSTEM,
                        &format!(
                            "Passage:\n{p}\n\nStatement: {c}\n\nCan the statement be inferred from the passage? Answer yes or no."
                        ),
                    )
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Into::into)
    }

    /// Share of `claims` each judged supported (verdict ≥ 0.5) by `passage`.
    fn share_supported(&self, claims: &[String], passage: &str, what: &str) -> Result<Scored> {
        if claims.is_empty() {
            return Ok(Err(format!("no {what} to check")));
        }
        let v = self.verdicts(&self.supported_prompts(claims, passage)?)?;
        if v.iter().any(Option::is_none) {
            return Ok(Err("unreadable verdict".into()));
        }
        let yes = v.iter().flatten().filter(|&&p| p >= 0.5).count();
        Ok(Ok(yes as f64 / claims.len() as f64))
    }

    /// Faithfulness: the share of the answer's statements supported by the context.
    pub fn faithfulness(&self, answer: &str, context: &str) -> Result<Scored> {
        if context.trim().is_empty() {
            return Ok(Err("no context".into()));
        }
        self.share_supported(&claims(answer), context, "answer statements")
    }

    /// Context recall: the share of the reference's statements supported by the context.
    pub fn context_recall(&self, reference: &str, context: &str) -> Result<Scored> {
        if context.trim().is_empty() {
            return Ok(Err("no context".into()));
        }
        self.share_supported(&claims(reference), context, "reference statements")
    }

    /// Answer relevancy: the judge's belief that the answer addresses the question.
    pub fn answer_relevancy(&self, question: &str, answer: &str) -> Result<Scored> {
        if answer.trim().is_empty() {
            return Ok(Ok(0.0));
        }
        let p = self.llm.chat_prompt(
            SYSTEM,
            &format!(
                "Question: {question}\n\nAnswer: {answer}\n\nDoes the answer directly address the question? Answer yes or no."
            ),
        )?;
        Ok(match self.verdicts(&[p])?.pop().flatten() {
            Some(v) => Ok(v),
            None => Err("unreadable verdict".into()),
        })
    }

    /// Context precision: average precision of the passages judged useful for the question
    /// (and its reference answer when there is one), in retrieval order.
    pub fn context_precision(
        &self,
        question: &str,
        reference: Option<&str>,
        passages: &[String],
    ) -> Result<Scored> {
        if passages.is_empty() {
            return Ok(Err("no context".into()));
        }
        let prompts = passages
            .iter()
            .map(|passage| {
                self.llm.fit_passage(passage, 8, &|p| {
                    let reference = reference
                        .map(|r| format!("\nReference answer: {r}"))
                        .unwrap_or_default();
                    self.llm.chat_prompt(
                        SYSTEM,
                        &format!(
                            "Question: {question}{reference}\n\nPassage:\n{p}\n\nIs this passage useful for answering the question? Answer yes or no."
                        ),
                    )
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let v = self.verdicts(&prompts)?;
        if v.iter().any(Option::is_none) {
            return Ok(Err("unreadable verdict".into()));
        }
        let flags: Vec<bool> = v.iter().flatten().map(|&p| p >= 0.5).collect();
        Ok(context_precision(&flags).ok_or_else(|| "no context".to_string()))
    }
}

/// The statements of a text worth checking: its sentences of three words or more, with
/// citation marks removed.
pub fn claims(text: &str) -> Vec<String> {
    sentences(text)
        .into_iter()
        .map(|s| strip_citations(&s))
        .filter(|s| s.split_whitespace().count() >= 3)
        .collect()
}

fn strip_citations(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close)
                if close > 0
                    && after[..close]
                        .chars()
                        .all(|c| c.is_ascii_digit() || matches!(c, ',' | ' ')) =>
            {
                out.push_str(rest[..open].trim_end());
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_drop_citations_and_short_sentences() {
        let c = claims("Python uses indentation [1]. Yes. It is elegant [1, 2] and clear.");
        assert_eq!(
            c,
            vec!["Python uses indentation.", "It is elegant and clear."]
        );
        assert_eq!(strip_citations("a [x] b [12]"), "a [x] b");
    }
}
