//! The prompt of a rung: its user message rendered from the template, and the few-shot examples
//! picked for a question by nearest-neighbour search over embedded example questions or answers.

use crate::data::{Example, Shot};
use crate::metrics;
use crate::spec::{EvalSpec, Rung};
use crate::{Error, Result};

/// `v` scaled to unit length (unchanged when it is all zeros).
pub(super) fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// The dot product of two vectors.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The rung's user message for `ex` with the chosen examples and passages.
pub(super) fn render_user(
    rung: &Rung,
    ex: &Example,
    all_shots: &[Shot],
    shots: &[usize],
    context: &[(usize, String, String)],
) -> Result<String> {
    let env = minijinja::Environment::new();
    let examples: Vec<&Shot> = shots.iter().map(|&i| &all_shots[i]).collect();
    let ctx: Vec<serde_json::Value> = context
        .iter()
        .map(|(n, source, text)| serde_json::json!({"n": n, "source": source, "text": text}))
        .collect();
    env.render_str(
        &rung.template,
        minijinja::context! {
            prompt => ex.prompt,
            question => ex.question,
            examples => examples,
            context => ctx,
            record => ex.record,
        },
    )
    .map_err(|e| Error::Template {
        rung: rung.name.clone(),
        reason: e.to_string(),
    })
}

/// The group of `ex` (its value of the `[examples] group` field), if the store names one.
pub(super) fn group_of(spec: &EvalSpec, ex: &Example) -> Option<String> {
    let g = spec.examples.as_ref()?.group.as_ref()?;
    ex.record.get(g).map(|v| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The `k` examples of `pool` most similar to `query` (most similar last, nearest the
/// question), leaving out any whose question is `skip` (the question itself) and any of the
/// question's own `group`.
pub(super) fn nearest(
    shots: &[Shot],
    query: &[f32],
    pool: &[Vec<f32>],
    k: usize,
    skip: &str,
    group: Option<&str>,
) -> Vec<usize> {
    let skip = metrics::normalize_answer(skip);
    let mut scored: Vec<(usize, f32)> = pool
        .iter()
        .enumerate()
        .filter(|(i, _)| metrics::normalize_answer(&shots[*i].question) != skip)
        .filter(|(i, _)| group.is_none() || shots[*i].group.as_deref() != group)
        .map(|(i, v)| (i, dot(query, v)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out: Vec<usize> = scored.into_iter().take(k).map(|(i, _)| i).collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieval_leaves_out_the_question_itself_and_its_group() {
        let shot = |q: &str, g: &str| Shot {
            question: q.into(),
            answer: String::new(),
            group: Some(g.into()),
        };
        let shots = vec![
            shot("how many cars?", "car_1"),
            shot("count the cars", "car_1"),
            shot("how many singers?", "concert"),
            shot("how many pets?", "pets"),
        ];
        let pool = vec![
            vec![1.0, 0.0],
            vec![0.9, 0.1],
            vec![0.8, 0.2],
            vec![0.1, 0.9],
        ];
        let q = [1.0, 0.0];
        // Most similar last; the question's own text is never an example.
        assert_eq!(
            nearest(&shots, &q, &pool, 2, "How many cars?", None),
            vec![2, 1]
        );
        // With its group named, the other car_1 question goes too.
        assert_eq!(
            nearest(&shots, &q, &pool, 2, "How many cars?", Some("car_1")),
            vec![3, 2]
        );
    }
}
