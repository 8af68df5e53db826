//! Self-correction of SQL answers: each query is executed, and SQLite's complaint (with a schema
//! hint), an empty result or a missing query is fed back for another try; a retry that repeats
//! an earlier query is drawn again with its own seed.

use flywheel_api::{ChatMessage, Grammar, SamplingParams};

use super::rung::Ctx;
use super::SQL_TIMEOUT;
use crate::metrics::{self, normalize_sql};
use crate::records::{Attempt, ResultRecord};
use crate::spec::{Feedback, Rung, SelfCorrect};
use crate::Result;

/// The sampling of draw `draw` of self-correction retry `retry` (1, 2, ...) of question
/// `index`: the retry temperature (unless it is 0 or the rung samples already), with a seed
/// fixed by the rung, the question, the retry and the draw.
fn retry_sampling(
    rung: &Rung,
    sc: &SelfCorrect,
    index: usize,
    retry: usize,
    draw: usize,
) -> SamplingParams {
    let mut s = if sc.temperature > 0.0 && rung.sampling.temperature == 0.0 {
        SamplingParams {
            temperature: sc.temperature,
            ..SamplingParams::default()
        }
    } else {
        rung.sampling.clone()
    };
    s.seed = rung
        .sampling
        .seed
        .wrapping_add(index as u64)
        .wrapping_add((retry as u64) << 32)
        .wrapping_add((draw as u64) << 48);
    s
}

/// The first answer to a SQL question, where self-correction starts.
pub(super) struct FirstAnswer {
    /// The rung's user message.
    pub(super) user: String,
    /// The messages that produced the answer (system and user).
    pub(super) messages: Vec<ChatMessage>,
    /// The rendered prompt.
    pub(super) prompt: String,
    /// The model's output.
    pub(super) output: String,
    /// The SQL extracted from it.
    pub(super) sql: String,
    /// The grammar answers are decoded under (the rung's `constrain`).
    pub(super) grammar: Option<Grammar>,
}

impl Ctx<'_> {
    /// Runs up to `sc.max_retries` corrections of `first` on `conn`, recording every attempt in
    /// `rec` (and its tokens); returns the final output and the SQL extracted from it.
    pub(super) fn self_correct(
        &self,
        rung: &Rung,
        sc: &SelfCorrect,
        conn: &rusqlite::Connection,
        index: usize,
        first: FirstAnswer,
        rec: &mut ResultRecord,
    ) -> Result<(String, String)> {
        let FirstAnswer {
            user,
            mut messages,
            mut prompt,
            mut output,
            mut sql,
            grammar,
        } = first;
        let mut draws = 1;
        for _ in 0..sc.max_retries {
            let feedback = metrics::sql_feedback(conn, &sql, SQL_TIMEOUT);
            rec.attempts.push(Attempt {
                prompt: prompt.clone(),
                output: output.clone(),
                sql: sql.clone(),
                feedback: feedback.clone(),
                draws,
            });
            let Some(fb) = feedback else { break };
            match sc.feedback {
                Feedback::Turns => {
                    messages.push(ChatMessage::new("assistant", output.trim()));
                    messages.push(ChatMessage::new(
                        "user",
                        format!("{fb}\nWrite a corrected SQLite query for the question. Reply with the SQL only."),
                    ));
                }
                Feedback::Restate => {
                    let notes: Vec<String> = rec
                        .attempts
                        .iter()
                        .filter_map(|a| a.feedback.as_deref())
                        .map(|f| format!("- {}", f.replace('\n', "\n  ")))
                        .collect();
                    messages = vec![
                        ChatMessage::new("system", &rung.system),
                        ChatMessage::new(
                            "user",
                            format!(
                                "{user}\n\nEarlier answers to this question were wrong:\n{}\nWrite a different SQLite query that avoids these errors. Reply with the SQL only.",
                                notes.join("\n")
                            ),
                        ),
                    ];
                }
            }
            let retry = rec.attempts.len();
            for draw in 0..sc.draws {
                draws = draw + 1;
                let g = self.generate_with(
                    &messages,
                    rung,
                    retry_sampling(rung, sc, index, retry, draw),
                    grammar.as_ref(),
                )?;
                rec.prompt_tokens += g.prompt_tokens;
                rec.completion_tokens += g.completion_tokens;
                prompt = g.prompt;
                output = g.text;
                sql = metrics::extract_sql(&output);
                let seen = |a: &Attempt| normalize_sql(&a.sql) == normalize_sql(&sql);
                if !rec.attempts.iter().any(seen) {
                    break;
                }
            }
        }
        if rec.attempts.last().is_some_and(|a| a.feedback.is_some()) {
            rec.attempts.push(Attempt {
                prompt,
                output: output.clone(),
                sql: sql.clone(),
                feedback: None,
                draws,
            });
        }
        Ok((output, sql))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rung(temperature: f32) -> Rung {
        Rung {
            name: "r".into(),
            system: String::new(),
            template: String::new(),
            sample_rows: 0,
            constrain: None,
            vote: None,
            few_shot: None,
            adapter: None,
            retrieval: None,
            self_correct: None,
            max_tokens: 8,
            sampling: SamplingParams {
                temperature,
                seed: 42,
                ..SamplingParams::default()
            },
            stop: Vec::new(),
        }
    }

    #[test]
    fn retries_sample_with_seeds_fixed_by_question_retry_and_draw() {
        let sc = |temperature| SelfCorrect {
            max_retries: 2,
            temperature,
            draws: 4,
            feedback: Feedback::Restate,
        };
        let greedy = rung(0.0);
        let s = retry_sampling(&greedy, &sc(0.7), 3, 1, 0);
        assert_eq!(s.temperature, 0.7);
        assert_eq!(retry_sampling(&greedy, &sc(0.7), 3, 1, 0), s);
        let seeds: std::collections::HashSet<u64> = [(3, 1, 0), (3, 1, 1), (3, 2, 0), (4, 1, 0)]
            .iter()
            .map(|&(q, r, d)| retry_sampling(&greedy, &sc(0.7), q, r, d).seed)
            .collect();
        assert_eq!(seeds.len(), 4);
        // Temperature 0 keeps the rung's greedy decoding; a sampling rung keeps its own settings.
        assert_eq!(retry_sampling(&greedy, &sc(0.0), 3, 1, 0).temperature, 0.0);
        let hot = rung(1.2);
        assert_eq!(retry_sampling(&hot, &sc(0.7), 3, 1, 0).temperature, 1.2);
    }
}
