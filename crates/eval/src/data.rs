//! Reading the dataset and the example store: JSONL lines mapped to questions, prompts,
//! references and databases through the spec's field names; errors name the file and line.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::spec::{DatasetSpec, ExamplesSpec};
use crate::{Error, Result};

/// One question of the dataset.
#[derive(Debug, Clone)]
pub struct Example {
    /// Its id (the id field, or the 1-based line number).
    pub id: String,
    /// The question.
    pub question: String,
    /// The task prompt shown to the model (the question when no prompt field is set).
    pub prompt: String,
    /// The reference answer.
    pub reference: Option<String>,
    /// sql: the database file.
    pub db: Option<PathBuf>,
    /// rag: the gold passage (document path, section heading).
    pub gold: Option<(String, String)>,
    /// The whole line.
    pub record: Map<String, Value>,
}

/// One solved example of the example store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shot {
    /// Its question.
    pub question: String,
    /// Its answer.
    pub answer: String,
    /// Its group (`[examples] group`), if the store names one.
    pub group: Option<String>,
}

fn lines(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let f = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| Error::Data {
            path: path.display().to_string(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        let Value::Object(m) = v else {
            return Err(Error::Data {
                path: path.display().to_string(),
                line: i + 1,
                reason: "expected a JSON object".into(),
            });
        };
        out.push((i + 1, m));
    }
    Ok(out)
}

fn field(
    m: &Map<String, Value>,
    name: &str,
    path: &Path,
    line: usize,
    required: bool,
) -> Result<Option<String>> {
    match m.get(name) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Null) | None if !required => Ok(None),
        Some(other) => Err(Error::Data {
            path: path.display().to_string(),
            line,
            reason: format!("field `{name}` must be a string, found {other}"),
        }),
        None => Err(Error::Data {
            path: path.display().to_string(),
            line,
            reason: format!("missing field `{name}`"),
        }),
    }
}

/// Reads the dataset (the first `limit` lines when set); ids must be unique.
pub fn read_dataset(spec: &DatasetSpec) -> Result<Vec<Example>> {
    let path = &spec.path;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line, m) in lines(path)? {
        if spec.limit > 0 && out.len() >= spec.limit {
            break;
        }
        let id = match &spec.id {
            Some(f) => field(&m, f, path, line, true)?.unwrap_or_default(),
            None => line.to_string(),
        };
        if !seen.insert(id.clone()) {
            return Err(Error::Data {
                path: path.display().to_string(),
                line,
                reason: format!("id `{id}` appears twice"),
            });
        }
        let question = field(&m, &spec.question, path, line, true)?.unwrap_or_default();
        let prompt = match &spec.prompt {
            Some(f) => field(&m, f, path, line, true)?.unwrap_or_default(),
            None => question.clone(),
        };
        let reference = match &spec.reference {
            Some(f) => field(&m, f, path, line, true)?,
            None => None,
        };
        let db = match (&spec.db_id, &spec.db_dir) {
            (Some(f), Some(dir)) => {
                let id = field(&m, f, path, line, true)?.unwrap_or_default();
                Some(dir.join(format!("{id}.sqlite")))
            }
            _ => None,
        };
        let gold = match (&spec.gold_path, &spec.gold_heading) {
            (Some(p), Some(h)) => Some((
                field(&m, p, path, line, true)?.unwrap_or_default(),
                field(&m, h, path, line, true)?.unwrap_or_default(),
            )),
            _ => None,
        };
        out.push(Example {
            id,
            question,
            prompt,
            reference,
            db,
            gold,
            record: m,
        });
    }
    if out.is_empty() {
        return Err(Error::Data {
            path: path.display().to_string(),
            line: 0,
            reason: "no examples".into(),
        });
    }
    Ok(out)
}

/// Reads the example store.
pub fn read_examples(spec: &ExamplesSpec) -> Result<Vec<Shot>> {
    let path = &spec.path;
    let mut out = Vec::new();
    for (line, m) in lines(path)? {
        out.push(Shot {
            question: field(&m, &spec.question, path, line, true)?.unwrap_or_default(),
            answer: field(&m, &spec.answer, path, line, true)?.unwrap_or_default(),
            group: match &spec.group {
                Some(g) => field(&m, g, path, line, true)?,
                None => None,
            },
        });
    }
    if out.is_empty() {
        return Err(Error::Data {
            path: path.display().to_string(),
            line: 0,
            reason: "the example store is empty".into(),
        });
    }
    Ok(out)
}
