//! What a run folder holds: its file names, the record types of `results.jsonl` and
//! `timings.jsonl`, the run state, the JSONL reader that repairs a torn last line, and the hashes
//! that decide which results are resumed. The runner writes these and the reports read them.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::metrics::SqlErrorClass;
use crate::spec::{EvalSpec, Rung};
use crate::{io_err, Error, Result};

/// The results file in a run folder.
pub const RESULTS_FILE: &str = "results.jsonl";
/// Wall-clock seconds per (rung, question).
pub const TIMINGS_FILE: &str = "timings.jsonl";
/// The spec as the run used it (what `flywheel eval report` reads).
pub const SPEC_COPY: &str = "spec.toml";
/// The spec's hash and the run's state.
pub const STATE_FILE: &str = "state.json";

/// One generation of a self-correcting answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The whole prompt.
    pub prompt: String,
    /// The model's output.
    pub output: String,
    /// The SQL extracted from it.
    pub sql: String,
    /// What the executor said back (none: the attempt was accepted, or it was the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<String>,
    /// Generations drawn for this attempt: a retry whose SQL repeats an earlier attempt's is
    /// drawn again, up to `self_correct.draws` times.
    #[serde(default = "one")]
    pub draws: usize,
}

fn one() -> usize {
    1
}

/// A passage that was put in the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextRef {
    /// `path — heading`.
    pub source: String,
    /// Whether it is the question's gold passage (when the dataset names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<bool>,
}

/// One line of `results.jsonl`: a question answered by one rung, with everything needed to
/// audit it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    /// The rung.
    pub rung: String,
    /// The question's id.
    pub id: String,
    /// The question.
    pub question: String,
    /// The reference answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The first prompt, exactly as fed to the model.
    pub prompt: String,
    /// The final output.
    pub output: String,
    /// What was scored (the SQL extracted from the output, or the trimmed answer).
    pub prediction: String,
    /// Every generation when the rung self-corrects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// Every sample of an execution vote, with its result class and group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub votes: Vec<crate::sql::VoteSample>,
    /// Questions of the few-shot examples shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
    /// The HyDE draft used to pick examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<String>,
    /// The passages shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<ContextRef>,
    /// Metric values.
    pub scores: BTreeMap<String, f64>,
    /// Metrics that could not be scored, with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unscored: BTreeMap<String, String>,
    /// Whether the primary metric says right (none: it could not be scored).
    pub correct: Option<bool>,
    /// Why it is wrong, as a class the report counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<ErrorClass>,
    /// The error message behind the class (SQLite's, the runtime's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Prompt tokens over every generation of this answer.
    pub prompt_tokens: usize,
    /// Generated tokens over every generation of this answer.
    pub completion_tokens: usize,
}

/// Why an answer is wrong, as the report counts it. It is written to `results.jsonl` (and to
/// `summary.json`) as its [`label`](ErrorClass::label), and ordered by that label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// A SQL answer's class from executing it (no SQL, syntax error, wrong table/column, ...).
    Sql(SqlErrorClass),
    /// No answer could be generated (a prompt over the context window, a template error).
    Generation,
    /// A wrong QA answer.
    WrongAnswer,
    /// A wrong RAG answer from a rung without retrieval.
    NoRetrieval,
    /// A wrong RAG answer whose gold passage was not retrieved.
    NotRetrieved,
    /// A wrong RAG answer whose gold passage was retrieved but which is not faithful to it.
    Unfaithful,
    /// A wrong RAG answer whose gold passage was retrieved.
    RetrievedWrong,
}

impl ErrorClass {
    /// Every class.
    pub const ALL: [ErrorClass; 13] = [
        ErrorClass::Sql(SqlErrorClass::NoSql),
        ErrorClass::Sql(SqlErrorClass::SyntaxError),
        ErrorClass::Sql(SqlErrorClass::WrongTableOrColumn),
        ErrorClass::Sql(SqlErrorClass::Timeout),
        ErrorClass::Sql(SqlErrorClass::OtherError),
        ErrorClass::Sql(SqlErrorClass::EmptyResult),
        ErrorClass::Sql(SqlErrorClass::WrongResult),
        ErrorClass::Generation,
        ErrorClass::WrongAnswer,
        ErrorClass::NoRetrieval,
        ErrorClass::NotRetrieved,
        ErrorClass::Unfaithful,
        ErrorClass::RetrievedWrong,
    ];

    /// The label in results files and reports ("syntax error", "not retrieved", ...).
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Sql(c) => c.label(),
            ErrorClass::Generation => "generation error",
            ErrorClass::WrongAnswer => "wrong answer",
            ErrorClass::NoRetrieval => "wrong answer (no retrieval)",
            ErrorClass::NotRetrieved => "not retrieved",
            ErrorClass::Unfaithful => "retrieved but unfaithful",
            ErrorClass::RetrievedWrong => "retrieved, answer wrong",
        }
    }

    /// The class with this label.
    pub fn from_label(label: &str) -> Option<ErrorClass> {
        ErrorClass::ALL.into_iter().find(|c| c.label() == label)
    }
}

impl From<SqlErrorClass> for ErrorClass {
    fn from(c: SqlErrorClass) -> Self {
        ErrorClass::Sql(c)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// By label, the order the report's error counts have always been kept in.
impl Ord for ErrorClass {
    fn cmp(&self, other: &Self) -> Ordering {
        self.label().cmp(other.label())
    }
}

impl PartialOrd for ErrorClass {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.label())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let label = String::deserialize(deserializer)?;
        ErrorClass::from_label(&label)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error class `{label}`")))
    }
}

/// One line of `timings.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    /// The rung.
    pub rung: String,
    /// The question's id.
    pub id: String,
    /// Seconds spent answering (judging excluded).
    pub seconds: f64,
}

fn sha(text: &str) -> String {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    format!("{:x}", h.finalize())
}

/// The identity of what every rung shares (task, dataset fields, models, example store, judge,
/// seed, primary metric). Results made under another one are never resumed. The dataset's
/// `limit`, the name, the output folder and the rungs are not part of it: a longer or shorter
/// run reuses the questions already answered, and each rung has its own hash.
pub fn spec_hash(spec: &EvalSpec) -> String {
    let mut shared = spec.clone();
    shared.dataset.limit = 0;
    shared.name = String::new();
    shared.output = None;
    shared.rungs.clear();
    shared.defaults = Default::default();
    sha(&serde_json::to_string(&shared).unwrap_or_default())
}

/// The identity of one resolved rung under a shared hash.
pub fn rung_hash(shared: &str, rung: &Rung) -> String {
    sha(&format!(
        "{shared}\n{}",
        serde_json::to_string(rung).unwrap_or_default()
    ))
}

/// The contents of `state.json`: the hashes the results were made under, and whether the run
/// is complete.
#[derive(Serialize, Deserialize)]
pub(crate) struct State {
    /// [`spec_hash`] of the spec.
    pub(crate) spec_sha256: String,
    /// The spec's name.
    pub(crate) name: String,
    /// [`rung_hash`] of every rung, by name.
    #[serde(default)]
    pub(crate) rungs: BTreeMap<String, String>,
    /// Every (rung, question) has a result.
    pub(crate) complete: bool,
}

impl State {
    /// Writes the state to `path` (atomically).
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        crate::atomic_write(path, text.as_bytes())
    }
}

/// Reads a JSONL file of `T`; a torn (unparsable) last line is cut off the file. Any other bad
/// line is an error naming it.
pub fn read_jsonl_repair<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path, e)),
    };
    let mut out = Vec::new();
    let mut good_end = 0usize;
    let mut pos = 0usize;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        pos += line.len();
        if line.trim().is_empty() {
            good_end = pos;
            continue;
        }
        let complete = line.ends_with('\n');
        match serde_json::from_str::<T>(line.trim_end()) {
            Ok(v) if complete => {
                out.push(v);
                good_end = pos;
            }
            Ok(_) | Err(_) if i + 1 == lines.len() => {
                // A line cut by a crash: drop it, the run redoes that question.
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| io_err(path, e))?;
                f.set_len(good_end as u64).map_err(|e| io_err(path, e))?;
            }
            Ok(_) => unreachable!("only the last line can lack its newline"),
            Err(e) => {
                return Err(Error::Data {
                    path: path.display().to_string(),
                    line: i + 1,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Writes `rows` as a JSONL file (atomically), replacing it.
pub(crate) fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).unwrap_or_default());
        text.push('\n');
    }
    crate::atomic_write(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels results files have always held, one per class.
    const LABELS: [&str; 13] = [
        "no SQL",
        "syntax error",
        "wrong table/column",
        "timeout",
        "other error",
        "empty result",
        "wrong result",
        "generation error",
        "wrong answer",
        "wrong answer (no retrieval)",
        "not retrieved",
        "retrieved but unfaithful",
        "retrieved, answer wrong",
    ];

    #[test]
    fn error_classes_keep_their_labels_on_the_wire() {
        for (c, label) in ErrorClass::ALL.into_iter().zip(LABELS) {
            assert_eq!(c.label(), label);
            assert_eq!(c.to_string(), label);
            let json = serde_json::to_string(&c).expect("serializes");
            assert_eq!(json, serde_json::to_string(label).expect("serializes"));
            assert_eq!(serde_json::from_str::<ErrorClass>(&json).ok(), Some(c));
            assert_eq!(ErrorClass::from_label(label), Some(c));
        }
        assert_eq!(
            ErrorClass::from(SqlErrorClass::WrongTableOrColumn).label(),
            "wrong table/column"
        );
        assert!(serde_json::from_str::<ErrorClass>("\"no such class\"").is_err());
        // Ordered by label, so error counts keep the order reports have always shown.
        let mut sorted = ErrorClass::ALL;
        sorted.sort();
        let mut labels = LABELS;
        labels.sort();
        assert_eq!(sorted.map(ErrorClass::label), labels);
    }
}
