//! The eval spec: one TOML file naming a dataset, a model and the configurations (rungs) to
//! compare. Unknown keys are rejected, every value is checked, and errors name the key.

use std::path::{Path, PathBuf};

use flywheel_api::SamplingParams;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What kind of task the dataset holds; it picks the metrics and the default prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Text-to-SQL: predictions are executed on the question's SQLite database.
    Sql,
    /// Short answers: exact match, token F1, ROUGE-L, JSON validity.
    Qa,
    /// Answers from retrieved documents: the QA metrics plus retrieval recall/MRR and
    /// local-judge faithfulness, answer relevancy, context precision and context recall.
    Rag,
}

/// A whole eval spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// The run's name (also the default output folder `runs/<name>`).
    pub name: String,
    /// The task kind.
    pub task: Task,
    /// Where results and reports go (default `runs/<name>`).
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Seed of sampling, fixed few-shot choice and bootstrap.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The metric the ladder chart and "correct" use (default per task: execution_accuracy,
    /// exact_match, faithfulness).
    #[serde(default)]
    pub primary: Option<String>,
    /// The questions.
    pub dataset: DatasetSpec,
    /// The generator.
    pub model: ModelSpec,
    /// The embedding model used to retrieve few-shot examples.
    #[serde(default)]
    pub embedder: Option<ModelSpec>,
    /// The example store few-shot examples come from.
    #[serde(default)]
    pub examples: Option<ExamplesSpec>,
    /// How the local judge answers (rag metrics).
    #[serde(default)]
    pub judge: JudgeSpec,
    /// Settings every rung starts from.
    #[serde(default)]
    pub defaults: RungSpec,
    /// The configurations, in ladder order.
    #[serde(default)]
    pub rungs: Vec<RungSpec>,
}

fn default_seed() -> u64 {
    42
}

/// The dataset: a JSONL file and which fields mean what.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// The JSONL file.
    pub path: PathBuf,
    /// Use only the first N examples (0 = all).
    #[serde(default)]
    pub limit: usize,
    /// Field holding a unique id (default: the line number).
    #[serde(default)]
    pub id: Option<String>,
    /// Field holding the question.
    #[serde(default = "default_question")]
    pub question: String,
    /// Field holding the task prompt the template shows (default: the question field).
    #[serde(default)]
    pub prompt: Option<String>,
    /// Field holding the reference answer (gold SQL for sql).
    #[serde(default)]
    pub reference: Option<String>,
    /// sql: field naming the question's database.
    #[serde(default)]
    pub db_id: Option<String>,
    /// sql: the folder holding `<db_id>.sqlite`.
    #[serde(default)]
    pub db_dir: Option<PathBuf>,
    /// rag: fields naming the gold passage's document path and section heading.
    #[serde(default)]
    pub gold_path: Option<String>,
    /// See `gold_path`.
    #[serde(default)]
    pub gold_heading: Option<String>,
}

fn default_question() -> String {
    "question".into()
}

/// A model to load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A GGUF file, a Hugging Face folder or a hub id.
    pub path: String,
    /// `cpu`, `cuda` or `metal`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `f32`, `bf16` or `f16` (default: f32 on CPU, bf16 on GPUs).
    #[serde(default)]
    pub dtype: Option<String>,
}

fn default_device() -> String {
    "cpu".into()
}

/// The example store: a JSONL file of solved examples.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExamplesSpec {
    /// The JSONL file.
    pub path: PathBuf,
    /// Field holding the example's question (what question-similarity retrieval embeds).
    #[serde(default = "default_question")]
    pub question: String,
    /// Field holding the example's answer (what HyDE retrieval embeds).
    #[serde(default = "default_answer")]
    pub answer: String,
    /// Field naming an example's group (for SQL, its database). Retrieval leaves out the
    /// examples of the question's own group (the dataset field of the same name), in the eval
    /// and in `make-data`, so training prompts look like prompts on held-out databases:
    /// without it, Spider's paraphrased questions put the exact answer among the retrieved
    /// examples of 80% of the training prompts.
    #[serde(default)]
    pub group: Option<String>,
}

fn default_answer() -> String {
    "answer".into()
}

/// How judge verdicts are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum JudgeMethod {
    /// P("yes") against P("no") on the next token: always a number, never unparsable.
    #[default]
    Logprob,
    /// Greedy text, parsed as a yes/no verdict; unparsable verdicts are counted.
    Generate,
}

/// The local judge.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// How verdicts are read.
    #[serde(default)]
    pub method: JudgeMethod,
}

/// How few-shot examples are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// The same k examples for every question (seeded choice).
    Fixed,
    /// The k examples whose questions are most similar to the question (embeddings).
    Question,
    /// HyDE: the model drafts an answer without examples; the k examples whose answers are most
    /// similar to the draft.
    Hyde,
    /// By structure (sql, DAIL-SQL): the similarity of the questions with their schema words
    /// and values masked, plus that of the SQL skeletons of the example and of a draft answer.
    Skeleton,
}

/// Few-shot settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShot {
    /// How many examples.
    pub k: usize,
    /// How they are chosen.
    #[serde(default = "default_select")]
    pub select: Select,
}

fn default_select() -> Select {
    Select::Fixed
}

/// Retrieval of document passages into the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalSpec {
    /// The store built by `flywheel rag index`.
    pub store: PathBuf,
    /// Passages retrieved.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// `dense`, `bm25` or `hybrid`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// HyDE on the document search.
    #[serde(default)]
    pub hyde: bool,
    /// Rerank by the model's yes/no relevance.
    #[serde(default)]
    pub rerank: bool,
    /// Most tokens of context passages.
    #[serde(default = "default_context_tokens")]
    pub context_tokens: usize,
}

fn default_top_k() -> usize {
    4
}
fn default_mode() -> String {
    "hybrid".into()
}
fn default_context_tokens() -> usize {
    1000
}

/// Execution-guided self-correction (sql).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfCorrect {
    /// Retries after an error or an empty result.
    pub max_retries: usize,
    /// Temperature of the retries (0: the rung's own sampling). A greedy retry mostly repeats
    /// the failed query word for word (23 of 25 retried questions on Qwen2.5-Coder-0.5B), so
    /// retries sample, with seeds fixed by the question and the attempt.
    #[serde(default = "default_retry_temperature")]
    pub temperature: f32,
    /// Draws per retry: a draw whose SQL repeats an earlier attempt is drawn again, up to this
    /// many times.
    #[serde(default = "default_retry_draws")]
    pub draws: usize,
    /// How a retry is asked for.
    #[serde(default)]
    pub feedback: Feedback,
}

/// How a self-correction retry puts the error in front of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Feedback {
    /// The conversation goes on: the failed answer as the assistant's turn, the error as the
    /// next user turn.
    Turns,
    /// One fresh user turn: the task again, then what went wrong with each earlier attempt
    /// (errors and schema hints, not the failed SQL, which a small model copies).
    #[default]
    Restate,
}

/// A grammar a rung's answers are decoded under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Constrain {
    /// SQLite `SELECT` whose tables and columns are the question's database's own.
    Sql,
}

/// Execution voting (sql): `n` samples from one prefill, each run read-only; the largest group
/// of samples with the same non-empty result wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vote {
    /// Samples per question.
    pub n: usize,
    /// Their temperature.
    #[serde(default = "default_vote_temperature")]
    pub temperature: f32,
    /// Their nucleus (top-p) cut.
    #[serde(default = "default_vote_top_p")]
    pub top_p: f32,
}

fn default_vote_temperature() -> f32 {
    0.7
}
fn default_vote_top_p() -> f32 {
    0.95
}

fn default_retry_temperature() -> f32 {
    0.7
}
fn default_retry_draws() -> usize {
    4
}

/// One configuration; every field left out comes from `[defaults]`, then the built-in default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RungSpec {
    /// The rung's name (unique).
    #[serde(default)]
    pub name: Option<String>,
    /// The system message.
    #[serde(default)]
    pub system: Option<String>,
    /// A minijinja template for the user message; variables: `prompt`, `question`, `examples`
    /// (list of `{question, answer}`), `context` (list of `{n, source, text}`), `record` (the
    /// dataset line), and for sql tasks `schema` (the database's `CREATE TABLE` text).
    #[serde(default)]
    pub template: Option<String>,
    /// Sample rows per table in `{{ schema }}` (sql; default 0).
    #[serde(default)]
    pub sample_rows: Option<usize>,
    /// Decoding under a grammar: `"sql"` holds the answer to SQLite `SELECT` over the
    /// database's own tables and columns (sql; default none).
    #[serde(default)]
    pub constrain: Option<Constrain>,
    /// Execution voting: `n` sampled queries, the answer most of them agree on (sql).
    #[serde(default)]
    pub vote: Option<Vote>,
    /// Few-shot examples.
    #[serde(default)]
    pub few_shot: Option<FewShot>,
    /// A LoRA adapter folder.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Document retrieval.
    #[serde(default)]
    pub retrieval: Option<RetrievalSpec>,
    /// Execution-guided self-correction.
    #[serde(default)]
    pub self_correct: Option<SelfCorrect>,
    /// The most tokens per answer.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Sampling (default greedy).
    #[serde(default)]
    pub sampling: Option<SamplingParams>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Vec<String>>,
}

/// A rung with every setting resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rung {
    /// Its name.
    pub name: String,
    /// System message.
    pub system: String,
    /// User-message template.
    pub template: String,
    /// Sample rows per table in `{{ schema }}`.
    pub sample_rows: usize,
    /// The grammar answers are decoded under.
    pub constrain: Option<Constrain>,
    /// Execution voting.
    pub vote: Option<Vote>,
    /// Few-shot examples.
    pub few_shot: Option<FewShot>,
    /// Adapter folder.
    pub adapter: Option<PathBuf>,
    /// Retrieval.
    pub retrieval: Option<RetrievalSpec>,
    /// Self-correction.
    pub self_correct: Option<SelfCorrect>,
    /// Answer length limit.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// The default user template of a task.
pub fn default_template(task: Task) -> &'static str {
    match task {
        Task::Sql => {
            "{% if examples %}Examples of questions and the SQL that answers them (on other databases):\n\n\
{% for e in examples %}Question: {{ e.question }}\nSQL: {{ e.answer }}\n\n{% endfor %}\
Now the task.\n\n{% endif %}{% if schema %}Given the SQLite database schema below, write one SQL query that \
answers the question. Reply with the SQL only.\n\n{{ schema }}\n\nQuestion: {{ question | trim }}\n\
{% else %}{{ prompt }}{% endif %}"
        }
        Task::Qa | Task::Rag => {
            "{% if context %}Answer using only the numbered passages below; cite them like [1]. \
If they do not contain the answer, say you don't know.\n\n{% for c in context %}[{{ c.n }}] ({{ c.source }})\n{{ c.text }}\n\n{% endfor %}{% endif %}\
{% if examples %}Examples:\n\n{% for e in examples %}Question: {{ e.question }}\nAnswer: {{ e.answer }}\n\n{% endfor %}{% endif %}\
Question: {{ question }}{% if not context %}\nAnswer briefly.{% endif %}"
        }
    }
}

fn default_system(task: Task) -> &'static str {
    match task {
        Task::Sql => "You are a helpful assistant that writes SQLite queries.",
        Task::Qa | Task::Rag => "You are a helpful assistant. Answer briefly and precisely.",
    }
}

impl EvalSpec {
    /// Reads and validates a spec; relative paths are taken from the current directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates spec text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let spec: EvalSpec = toml::from_str(text).map_err(|e| Error::Spec {
            path: origin.to_string(),
            reason: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The output folder.
    pub fn output_dir(&self) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// The primary metric's name.
    pub fn primary_metric(&self) -> String {
        self.primary.clone().unwrap_or_else(|| {
            match self.task {
                Task::Sql => "execution_accuracy",
                Task::Qa => "exact_match",
                Task::Rag => "faithfulness",
            }
            .to_string()
        })
    }

    /// Every rung with defaults applied, in order.
    pub fn resolved_rungs(&self) -> Vec<Rung> {
        let d = &self.defaults;
        self.rungs
            .iter()
            .enumerate()
            .map(|(i, r)| Rung {
                name: r.name.clone().unwrap_or_else(|| format!("rung{}", i + 1)),
                system: r
                    .system
                    .clone()
                    .or_else(|| d.system.clone())
                    .unwrap_or_else(|| default_system(self.task).to_string()),
                template: r
                    .template
                    .clone()
                    .or_else(|| d.template.clone())
                    .unwrap_or_else(|| default_template(self.task).to_string()),
                sample_rows: r.sample_rows.or(d.sample_rows).unwrap_or(0),
                constrain: r.constrain.or(d.constrain),
                vote: r.vote.clone().or_else(|| d.vote.clone()),
                few_shot: r.few_shot.clone().or_else(|| d.few_shot.clone()),
                adapter: r.adapter.clone().or_else(|| d.adapter.clone()),
                retrieval: r.retrieval.clone().or_else(|| d.retrieval.clone()),
                self_correct: r.self_correct.clone().or_else(|| d.self_correct.clone()),
                max_tokens: r.max_tokens.or(d.max_tokens).unwrap_or(128),
                sampling: r
                    .sampling
                    .clone()
                    .or_else(|| d.sampling.clone())
                    .unwrap_or_else(|| SamplingParams {
                        seed: self.seed,
                        ..SamplingParams::greedy()
                    }),
                stop: r
                    .stop
                    .clone()
                    .or_else(|| d.stop.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Whether `rung`'s prompt shows the schema read from the database: its template uses
    /// `{{ schema }}`, and it is not the default SQL template over a dataset that names its own
    /// `prompt` field (which the default template then shows instead, as before).
    pub fn renders_schema(&self, rung: &Rung) -> bool {
        rung.template.contains("schema")
            && !(self.dataset.prompt.is_some() && rung.template == default_template(self.task))
    }

    /// Checks every value and names the first bad key.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| {
            Err(Error::Config {
                field: field.to_string(),
                reason: reason.to_string(),
            })
        };
        if self.name.trim().is_empty()
            || self
                .name
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return bad(
                "name",
                "must be non-empty and use only letters, digits, -, _ and .",
            );
        }
        if self.rungs.is_empty() {
            return bad("rungs", "list at least one [[rungs]] entry");
        }
        let primary = self.primary_metric();
        let known: &[&str] = match self.task {
            Task::Sql => &["execution_accuracy", "exact_match"],
            Task::Qa => &["exact_match", "token_f1", "rouge_l", "json_valid"],
            Task::Rag => &[
                "exact_match",
                "token_f1",
                "rouge_l",
                "faithfulness",
                "answer_relevancy",
                "context_precision",
                "context_recall",
                "recall_at_k",
                "mrr",
            ],
        };
        if !known.contains(&primary.as_str()) {
            return bad(
                "primary",
                &format!("`{primary}` is not a metric of this task; one of {known:?}"),
            );
        }
        if self.task == Task::Sql {
            if self.dataset.db_id.is_none() {
                return bad(
                    "dataset.db_id",
                    "sql tasks need the field naming the database",
                );
            }
            if self.dataset.db_dir.is_none() {
                return bad(
                    "dataset.db_dir",
                    "sql tasks need the folder of <db_id>.sqlite",
                );
            }
            if self.dataset.reference.is_none() {
                return bad("dataset.reference", "sql tasks need the gold SQL field");
            }
        }
        if self.task == Task::Qa && self.dataset.reference.is_none() {
            return bad(
                "dataset.reference",
                "qa tasks need the reference answer field",
            );
        }
        if self.dataset.gold_path.is_some() != self.dataset.gold_heading.is_some() {
            return bad(
                "dataset.gold_path",
                "gold_path and gold_heading go together",
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in self.resolved_rungs().iter().enumerate() {
            let at = |k: &str| format!("rungs[{i}].{k}");
            if !names.insert(r.name.clone()) {
                return bad(&at("name"), &format!("`{}` is used twice", r.name));
            }
            if r.max_tokens == 0 {
                return bad(&at("max_tokens"), "must be at least 1");
            }
            if let Err(e) = r.sampling.validate() {
                return bad(&at("sampling"), &e.to_string());
            }
            if let Err(e) = minijinja::Environment::new().template_from_str(&r.template) {
                return bad(&at("template"), &e.to_string());
            }
            if let Some(f) = &r.few_shot {
                if f.k == 0 {
                    return bad(&at("few_shot.k"), "must be at least 1");
                }
                if self.examples.is_none() {
                    return bad(&at("few_shot"), "needs an [examples] store");
                }
                if f.select == Select::Skeleton && self.task != Task::Sql {
                    return bad(&at("few_shot.select"), "skeleton applies to sql tasks only");
                }
                if f.select != Select::Fixed && self.embedder.is_none() {
                    return bad(
                        &at("few_shot.select"),
                        "retrieved examples need an [embedder]",
                    );
                }
            }
            if let Some(rt) = &r.retrieval {
                if !matches!(rt.mode.as_str(), "dense" | "bm25" | "hybrid") {
                    return bad(&at("retrieval.mode"), "must be dense, bm25 or hybrid");
                }
                if rt.top_k == 0 {
                    return bad(&at("retrieval.top_k"), "must be at least 1");
                }
                if self.embedder.is_none() {
                    return bad(&at("retrieval"), "needs an [embedder] (the store's model)");
                }
            }
            if let Some(sc) = &r.self_correct {
                if !(0.0..=2.0).contains(&sc.temperature) {
                    return bad(&at("self_correct.temperature"), "must be between 0 and 2");
                }
                if sc.draws == 0 {
                    return bad(&at("self_correct.draws"), "must be at least 1");
                }
            }
            if r.self_correct.is_some() && self.task != Task::Sql {
                return bad(&at("self_correct"), "applies to sql tasks only");
            }
            for (set, key) in [
                (r.sample_rows > 0, "sample_rows"),
                (r.constrain.is_some(), "constrain"),
                (r.vote.is_some(), "vote"),
            ] {
                if set && self.task != Task::Sql {
                    return bad(&at(key), "applies to sql tasks only");
                }
            }
            if r.sample_rows > 0 && !self.renders_schema(r) {
                return bad(
                    &at("sample_rows"),
                    "the rung's template does not use {{ schema }} (the default SQL template shows the dataset's `prompt` field when the dataset names one), so the rows would not be shown",
                );
            }
            if let Some(v) = &r.vote {
                if !(2..=64).contains(&v.n) {
                    return bad(&at("vote.n"), "must be between 2 and 64");
                }
                if !(v.temperature > 0.0 && v.temperature <= 2.0) {
                    return bad(&at("vote.temperature"), "must be above 0 and at most 2");
                }
                if !(v.top_p > 0.0 && v.top_p <= 1.0) {
                    return bad(&at("vote.top_p"), "must be above 0 and at most 1");
                }
                if r.self_correct.is_some() {
                    return bad(
                        &at("vote"),
                        "vote and self_correct cannot be combined on one rung (the vote already prefers samples that run)",
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "t"
task = "sql"
[dataset]
path = "d.jsonl"
reference = "sql"
db_id = "db"
db_dir = "dbs"
[model]
path = "m"
[examples]
path = "e.jsonl"
[embedder]
path = "emb"
[defaults]
max_tokens = 64
[[rungs]]
name = "prompt"
[[rungs]]
name = "few"
few_shot = { k = 2, select = "question" }
max_tokens = 32
"#;

    /// Every spec shipped in `evals/` parses and validates (paths are not checked here).
    #[test]
    fn shipped_specs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../evals");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("evals/") {
            let path = entry.expect("an entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let spec = EvalSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!spec.resolved_rungs().is_empty(), "{}", path.display());
                n += 1;
            }
        }
        assert!(n >= 6, "found {n} specs");
    }

    #[test]
    fn defaults_flow_into_rungs() {
        let s = EvalSpec::parse(BASE, "t.toml").unwrap();
        let r = s.resolved_rungs();
        assert_eq!(r[0].max_tokens, 64);
        assert_eq!(r[1].max_tokens, 32);
        assert_eq!(r[1].few_shot.as_ref().unwrap().select, Select::Question);
        assert_eq!(r[0].sampling.temperature, 0.0);
        assert_eq!(s.output_dir(), PathBuf::from("runs/t"));
        assert_eq!(s.primary_metric(), "execution_accuracy");
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = EvalSpec::parse(&format!("{BASE}\nbogus = 1\n"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = EvalSpec::parse(
            &BASE.replace("max_tokens = 32", "max_tokens = 32\nfew_shott = 1"),
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("few_shott"), "{e}");
        let e = EvalSpec::parse(&BASE.replace("k = 2", "k = 0"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("rungs[1].few_shot.k"), "{e}");
        let sc = |v: &str| BASE.replace("max_tokens = 32", &format!("self_correct = {v}"));
        let s = EvalSpec::parse(&sc("{ max_retries = 2 }"), "t.toml").unwrap();
        let r = s.resolved_rungs()[1].self_correct.clone().unwrap();
        assert_eq!((r.max_retries, r.temperature, r.draws), (2, 0.7, 4));
        let e = EvalSpec::parse(&sc("{ max_retries = 2, draws = 0 }"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("rungs[1].self_correct.draws"), "{e}");
        let e =
            EvalSpec::parse(&sc("{ max_retries = 2, temperature = -1.0 }"), "t.toml").unwrap_err();
        assert!(
            e.to_string().contains("rungs[1].self_correct.temperature"),
            "{e}"
        );
        let e = EvalSpec::parse(&sc("{ max_retries = 2, tries = 3 }"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("tries"), "{e}");
        let e = EvalSpec::parse(
            &BASE.replace("name = \"few\"", "name = \"prompt\""),
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rungs[1].name"), "{e}");
        let e = EvalSpec::parse(&BASE.replace("db_id = \"db\"\n", ""), "t.toml").unwrap_err();
        assert!(e.to_string().contains("dataset.db_id"), "{e}");
        let e = EvalSpec::parse(
            &BASE.replace(
                "name = \"prompt\"",
                "name = \"prompt\"\ntemplate = \"{% if %}\"",
            ),
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rungs[0].template"), "{e}");
    }
}
