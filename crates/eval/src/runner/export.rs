//! Training-data export: prompts built the way a rung builds them (template and retrieved
//! few-shot examples), each with its reference answer as the completion.

use std::path::Path;

use flywheel_runtime::EmbeddingModel;
use rand::SeedableRng;

use super::load_options;
use super::prompt::{group_of, nearest, render_user, unit};
use crate::data::{read_dataset, read_examples};
use crate::spec::{EvalSpec, Select};
use crate::{io_err, Error, Result};

/// Writes training data whose prompts are built the way `rung` builds them (its template and
/// its few-shot examples, retrieved from the example store for each training question, the
/// question itself left out), so a LoRA learns to use retrieved examples ("RAG examples in
/// training"). Each line is `{"prompt", "completion"}`, the completion being the reference.
/// Returns the number of lines written.
pub fn make_training_data(
    spec: &EvalSpec,
    rung_name: &str,
    input: &crate::spec::DatasetSpec,
    out: &Path,
) -> Result<usize> {
    let rungs = spec.resolved_rungs();
    let rung = rungs
        .iter()
        .find(|r| r.name == rung_name)
        .ok_or_else(|| Error::Config {
            field: "rungs".into(),
            reason: format!(
                "no rung named `{rung_name}` (have: {})",
                rungs
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    if rung.retrieval.is_some() {
        return Err(Error::Config {
            field: format!("rung `{rung_name}`.retrieval"),
            reason: "document retrieval is not supported when making training data".into(),
        });
    }
    let examples = read_dataset(input)?;
    let shots = match &spec.examples {
        Some(e) => read_examples(e)?,
        None => Vec::new(),
    };
    let mut picks: Vec<Vec<usize>> = vec![Vec::new(); examples.len()];
    if let Some(fs) = &rung.few_shot {
        match fs.select {
            Select::Hyde | Select::Skeleton => return Err(Error::Config {
                field: format!("rung `{rung_name}`.few_shot.select"),
                reason:
                    "HyDE and skeleton selection need generation; make training data from a `question` or `fixed` rung"
                        .into(),
            }),
            Select::Fixed => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
                let fixed = rand::seq::index::sample(&mut rng, shots.len(), fs.k.min(shots.len()))
                    .into_vec();
                picks.iter_mut().for_each(|p| p.clone_from(&fixed));
            }
            Select::Question => {
                let e = spec.embedder.as_ref().ok_or_else(|| Error::Config {
                    field: "embedder".into(),
                    reason: "retrieved examples need an embedding model".into(),
                })?;
                let embedder = EmbeddingModel::load(&e.path, &load_options(e)?)?;
                let embed = |texts: Vec<&str>| -> Result<Vec<Vec<f32>>> {
                    Ok(embedder
                        .embed_all(&texts, 32)?
                        .into_iter()
                        .map(unit)
                        .collect())
                };
                let pool = embed(shots.iter().map(|s| s.question.as_str()).collect())?;
                let qs = embed(examples.iter().map(|x| x.question.as_str()).collect())?;
                for (p, (ex, q)) in picks.iter_mut().zip(examples.iter().zip(&qs)) {
                    let g = group_of(spec, ex);
                    *p = nearest(&shots, q, &pool, fs.k, &ex.question, g.as_deref());
                }
            }
        }
    }
    let mut text = String::new();
    let mut schemas = super::prompt::Schemas::default();
    for (ex, p) in examples.iter().zip(&picks) {
        let reference = ex.reference.clone().ok_or_else(|| Error::Config {
            field: "dataset.reference".into(),
            reason: "training data needs the reference answer field".into(),
        })?;
        let schema = schemas.text(spec, rung, ex)?;
        let prompt = render_user(rung, ex, &shots, p, &[], &schema)?;
        text.push_str(&serde_json::json!({"prompt": prompt, "completion": reference}).to_string());
        text.push('\n');
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    crate::atomic_write(out, text.as_bytes())?;
    Ok(examples.len())
}
