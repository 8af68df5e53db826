//! The prompt of a rung: its user message rendered from the template, and the few-shot examples
//! picked for a question by nearest-neighbour search over embedded example questions or answers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use flywheel_api::Grammar;

use crate::data::{Example, Shot};
use crate::metrics;
use crate::spec::{EvalSpec, Rung};
use crate::sql::DbSchema;
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

/// The databases' schema texts read so far, by file and sample rows per table.
#[derive(Default)]
pub(super) struct Schemas(
    BTreeMap<(PathBuf, usize), Arc<DbSchema>>,
    BTreeMap<PathBuf, Grammar>,
);

impl Schemas {
    /// The schema of `ex`'s database with `rows` sample rows per table.
    pub(super) fn get(&mut self, ex: &Example, rows: usize) -> Result<Arc<DbSchema>> {
        let db = ex.db.clone().ok_or_else(|| Error::Config {
            field: "dataset.db_id".into(),
            reason: format!("question `{}` names no database", ex.id),
        })?;
        let key = (db, rows);
        if let Some(s) = self.0.get(&key) {
            return Ok(s.clone());
        }
        let io = |reason: String| Error::Io {
            path: key.0.display().to_string(),
            reason,
        };
        let conn = metrics::open_read_only(&key.0).map_err(io)?;
        let schema = Arc::new(DbSchema::read(&conn, rows).map_err(io)?);
        self.0.insert(key, schema.clone());
        Ok(schema)
    }

    /// The SQL grammar of `ex`'s database (built once per database).
    pub(super) fn grammar(&mut self, ex: &Example) -> Result<Grammar> {
        let db = ex.db.clone().unwrap_or_default();
        if let Some(g) = self.1.get(&db) {
            return Ok(g.clone());
        }
        let g = self.get(ex, 0)?.grammar();
        self.1.insert(db, g.clone());
        Ok(g)
    }

    /// The `{{ schema }}` text for `ex` under `rung` (empty when its prompt does not show it:
    /// see [`EvalSpec::renders_schema`]).
    pub(super) fn text(&mut self, spec: &EvalSpec, rung: &Rung, ex: &Example) -> Result<String> {
        if !spec.renders_schema(rung) || ex.db.is_none() {
            return Ok(String::new());
        }
        Ok(self.get(ex, rung.sample_rows)?.render())
    }
}

/// The rung's user message for `ex` with the chosen examples, passages and schema text.
pub(super) fn render_user(
    rung: &Rung,
    ex: &Example,
    all_shots: &[Shot],
    shots: &[usize],
    context: &[(usize, String, String)],
    schema: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // A template that ends in a newline keeps it (prompts compare byte for byte with data
    // rendered elsewhere).
    env.set_keep_trailing_newline(true);
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
            schema => schema,
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
    nearest_by(shots, k, skip, group, |i| dot(query, &pool[i]))
}

/// [`nearest`] with any score of example `i` (higher is nearer).
pub(super) fn nearest_by(
    shots: &[Shot],
    k: usize,
    skip: &str,
    group: Option<&str>,
    score: impl Fn(usize) -> f32,
) -> Vec<usize> {
    let skip = metrics::normalize_answer(skip);
    let mut scored: Vec<(usize, f32)> = (0..shots.len())
        .filter(|&i| metrics::normalize_answer(&shots[i].question) != skip)
        .filter(|&i| group.is_none() || shots[i].group.as_deref() != group)
        .map(|i| (i, score(i)))
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
    fn the_default_sql_prompt_is_the_prepared_datas_prompt_byte_for_byte() {
        // scripts/prepare-sql-data.sh wrote each question's prompt with the schema rendered in
        // Python; the default template renders the schema from the database in Rust.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut spec = crate::EvalSpec::load(&root.join("evals/sql-ladder-cpu.toml")).unwrap();
        spec.dataset.path = root.join(&spec.dataset.path);
        spec.dataset.db_dir = spec.dataset.db_dir.map(|d| root.join(d));
        spec.dataset.limit = 0;
        // The schema rendered from the database, never the prepared field.
        spec.dataset.prompt = None;
        let data = crate::data::read_dataset(&spec.dataset)
            .expect("data/sql is missing: run scripts/prepare-sql-data.sh");
        let rung = &spec.resolved_rungs()[0];
        assert!(spec.renders_schema(rung));
        let mut schemas = Schemas::default();
        for ex in &data {
            let prepared = ex.record["prompt"].as_str().unwrap();
            let schema = schemas.text(&spec, rung, ex).unwrap();
            assert_eq!(
                render_user(rung, ex, &[], &[], &[], &schema).unwrap(),
                prepared
            );
        }
        assert_eq!(data.len(), 337);
    }

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
