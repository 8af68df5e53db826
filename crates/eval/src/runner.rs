//! The ladder runner: loads the model once, runs every rung over every question, scores each
//! answer, and appends one line per (rung, question) to `results.jsonl` (timings go to
//! `timings.jsonl`, so the results file is identical whenever the spec is). An interrupted run
//! resumes where its results file ends; a torn last line is dropped.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_api::{ChatMessage, GenerateRequest, NullSink, SamplingParams};
use flywheel_peft::{with_routing, Adapter, LoraHook, Routing};
use flywheel_rag::answer::{build_context, source_label};
use flywheel_rag::eval::{is_gold, EvalQuestion};
use flywheel_rag::{DenseIndex, Llm, Mode, SearchOptions, Searcher, Store};
use flywheel_runtime::{EmbeddingModel, LoadOptions, ModelFormat, TextModel};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{read_dataset, read_examples, Example, Shot};
use crate::judge::Judge;
use crate::metrics;
use crate::spec::{EvalSpec, Feedback, ModelSpec, Rung, Select, Task};
use crate::{io_err, Error, Result};

/// The results file in a run folder.
pub const RESULTS_FILE: &str = "results.jsonl";
/// Wall-clock seconds per (rung, question).
pub const TIMINGS_FILE: &str = "timings.jsonl";
/// The spec as the run used it (what `flywheel eval report` reads).
pub const SPEC_COPY: &str = "spec.toml";
/// The spec's hash and the run's state.
pub const STATE_FILE: &str = "state.json";
/// How long one SQL query may run before it counts as a timeout.
pub const SQL_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub error_class: Option<String>,
    /// The error message behind the class (SQLite's, the runtime's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Prompt tokens over every generation of this answer.
    pub prompt_tokens: usize,
    /// Generated tokens over every generation of this answer.
    pub completion_tokens: usize,
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

/// What a run is told.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Discard earlier results in the output folder instead of resuming.
    pub fresh: bool,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run folder.
    pub dir: PathBuf,
    /// Every (rung, question) has a result.
    pub complete: bool,
    /// Results found from an earlier run.
    pub resumed: usize,
    /// Results written by this call.
    pub written: usize,
}

/// Progress callbacks; `example_done` may stop the run (it resumes later).
pub trait Observer {
    /// Called once the models are loaded.
    fn loaded(&mut self, _what: &str) {}
    /// Something the user should know (results dropped because a rung changed).
    fn note(&mut self, _message: &str) {}
    /// A rung starts: its index, the rung count, the question count and how many are done.
    fn rung_started(
        &mut self,
        _rung: &Rung,
        _index: usize,
        _rungs: usize,
        _questions: usize,
        _done: usize,
    ) {
    }
    /// A question was answered and scored.
    fn example_done(&mut self, _record: &ResultRecord) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// An observer that says nothing.
pub struct Quiet;
impl Observer for Quiet {}

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

#[derive(Serialize, Deserialize)]
struct State {
    spec_sha256: String,
    name: String,
    #[serde(default)]
    rungs: BTreeMap<String, String>,
    complete: bool,
}

impl State {
    fn save(&self, path: &Path) -> Result<()> {
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

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).unwrap_or_default());
        text.push('\n');
    }
    crate::atomic_write(path, text.as_bytes())
}

fn load_options(m: &ModelSpec) -> Result<LoadOptions> {
    Ok(LoadOptions {
        device: flywheel_runtime::parse_device(&m.device)?,
        dtype: m
            .dtype
            .as_deref()
            .map(flywheel_runtime::parse_dtype)
            .transpose()?,
    })
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The sampling of draw `draw` of self-correction retry `retry` (1, 2, ...) of question
/// `index`: the retry temperature (unless it is 0 or the rung samples already), with a seed
/// fixed by the rung, the question, the retry and the draw.
fn retry_sampling(
    rung: &Rung,
    sc: &crate::spec::SelfCorrect,
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

/// Lower case, single spaces, no trailing semicolon: SQL compared as text.
pub fn normalize_sql(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(';')
        .trim()
        .to_lowercase()
}

/// The rung's user message for `ex` with the chosen examples and passages.
fn render_user(
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
fn group_of(spec: &EvalSpec, ex: &Example) -> Option<String> {
    let g = spec.examples.as_ref()?.group.as_ref()?;
    ex.record.get(g).map(|v| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The `k` examples of `pool` most similar to `query` (most similar last, nearest the
/// question), leaving out any whose question is `skip` (the question itself) and any of the
/// question's own `group`.
fn nearest(
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
            Select::Hyde => return Err(Error::Config {
                field: format!("rung `{rung_name}`.few_shot.select"),
                reason:
                    "HyDE needs generation; make training data from a `question` or `fixed` rung"
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
    for (ex, p) in examples.iter().zip(&picks) {
        let reference = ex.reference.clone().ok_or_else(|| Error::Config {
            field: "dataset.reference".into(),
            reason: "training data needs the reference answer field".into(),
        })?;
        let prompt = render_user(rung, ex, &shots, p, &[])?;
        text.push_str(&serde_json::json!({"prompt": prompt, "completion": reference}).to_string());
        text.push('\n');
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    crate::atomic_write(out, text.as_bytes())?;
    Ok(examples.len())
}

/// Everything a run holds while it works.
struct Ctx<'a> {
    spec: &'a EvalSpec,
    model: &'a TextModel,
    hook: Option<&'a LoraHook>,
    llm: &'a Llm<'a>,
    embedder: Option<&'a EmbeddingModel>,
    shots: &'a [Shot],
    shot_q: Vec<Vec<f32>>,
    shot_a: Vec<Vec<f32>>,
    fixed: Vec<usize>,
    stores: BTreeMap<PathBuf, (Store, DenseIndex)>,
    adapters: BTreeMap<PathBuf, Adapter>,
    installed: Option<PathBuf>,
}

/// Passages for the prompt `(n, source, text)`, their references, and gold flags of every hit.
type Retrieved = (Vec<(usize, String, String)>, Vec<ContextRef>, Vec<bool>);

struct Generated {
    prompt: String,
    text: String,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Ctx<'_> {
    fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        if self.model.chat_template().is_some() {
            return Ok(self.model.render_chat(messages)?);
        }
        let mut s = String::new();
        for m in messages {
            match m.role.as_str() {
                "assistant" => s.push_str(&format!("Answer: {}\n\n", m.content)),
                _ => s.push_str(&format!("{}\n\n", m.content)),
            }
        }
        s.push_str("Answer:");
        Ok(s)
    }

    fn generate(&self, messages: &[ChatMessage], rung: &Rung, index: usize) -> Result<Generated> {
        let mut sampling = rung.sampling.clone();
        sampling.seed = rung.sampling.seed.wrapping_add(index as u64);
        self.generate_with(messages, rung, sampling)
    }

    /// [`Self::generate`] with the given sampling settings (seed included).
    fn generate_with(
        &self,
        messages: &[ChatMessage],
        rung: &Rung,
        sampling: SamplingParams,
    ) -> Result<Generated> {
        let prompt = self.render(messages)?;
        let n = self.model.encode_prompt(&prompt)?.len();
        let window = self.model.model().config().max_position_embeddings;
        if n + 1 >= window {
            return Err(Error::Runtime(flywheel_runtime::Error::PromptTooLong {
                tokens: n,
                context: window,
            }));
        }
        let mut req = GenerateRequest::new(prompt.clone(), rung.max_tokens.min(window - n - 1));
        req.sampling = sampling;
        req.stop = rung.stop.clone();
        let out = self.model.generate(&req, &mut NullSink)?;
        Ok(Generated {
            prompt,
            text: out.text,
            prompt_tokens: n,
            completion_tokens: out.usage.completion_tokens,
        })
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let e = self.embedder.ok_or_else(|| Error::Config {
            field: "embedder".into(),
            reason: "this rung needs an embedding model".into(),
        })?;
        Ok(unit(e.embed_batch(&[text])?.pop().unwrap_or_default()))
    }

    /// Installs the rung's adapter (or none) on the shared model.
    fn use_adapter(&mut self, adapter: Option<&PathBuf>) -> Result<()> {
        if self.installed.as_ref() == adapter {
            return Ok(());
        }
        let Some(hook) = self.hook else {
            return Ok(());
        };
        match adapter {
            None => hook.clear(),
            Some(dir) => {
                if !self.adapters.contains_key(dir) {
                    let a = Adapter::load(
                        dir,
                        &self.model.model().device().clone(),
                        self.model.model().dtype(),
                    )?;
                    self.adapters.insert(dir.clone(), a);
                }
                hook.install(&self.adapters[dir])?;
            }
        }
        self.installed = adapter.cloned();
        Ok(())
    }

    fn retrieve(&mut self, rung: &Rung, ex: &Example) -> Result<Retrieved> {
        let Some(rt) = &rung.retrieval else {
            return Ok(Default::default());
        };
        if !self.stores.contains_key(&rt.store) {
            let store = Store::open_existing(&rt.store)?;
            let dense = DenseIndex::load(&store)?;
            self.stores.insert(rt.store.clone(), (store, dense));
        }
        let (store, dense) = &self.stores[&rt.store];
        let embedder = self.embedder.ok_or_else(|| Error::Config {
            field: "embedder".into(),
            reason: "retrieval needs the store's embedding model".into(),
        })?;
        let searcher = Searcher::new(store, dense, embedder).with_llm(self.llm);
        let opts = SearchOptions {
            mode: rt.mode.parse::<Mode>()?,
            top_k: rt.top_k,
            hyde: rt.hyde,
            rerank: rt.rerank,
            ..SearchOptions::default()
        };
        let found = searcher.search(&ex.question, &opts)?;
        let gold_q = ex.gold.as_ref().map(|(p, h)| EvalQuestion {
            id: ex.id.clone(),
            question: ex.question.clone(),
            path: p.clone(),
            heading: h.clone(),
        });
        let flags: Vec<bool> = found
            .hits
            .iter()
            .map(|h| {
                gold_q
                    .as_ref()
                    .is_some_and(|q| is_gold(&h.path, &h.heading, q))
            })
            .collect();
        let count = |s: &str| self.llm.count_tokens(s);
        let (_, used) = build_context(&found.hits, rt.context_tokens, &count);
        let mut ctx = Vec::new();
        let mut refs = Vec::new();
        // `used` is a prefix of the hits, so the hits' gold flags apply to it.
        for (i, h) in used.iter().enumerate() {
            let source = source_label(h);
            ctx.push((i + 1, source.clone(), h.text.trim().to_string()));
            refs.push(ContextRef {
                source,
                gold: gold_q.as_ref().map(|_| flags[i]),
            });
        }
        Ok((ctx, refs, flags))
    }

    /// Answers and scores one question with one rung.
    fn answer(&mut self, rung: &Rung, ex: &Example, index: usize) -> Result<ResultRecord> {
        let mut rec = ResultRecord {
            rung: rung.name.clone(),
            id: ex.id.clone(),
            question: ex.question.clone(),
            reference: ex.reference.clone(),
            prompt: String::new(),
            output: String::new(),
            prediction: String::new(),
            attempts: Vec::new(),
            examples: Vec::new(),
            draft: None,
            context: Vec::new(),
            scores: BTreeMap::new(),
            unscored: BTreeMap::new(),
            correct: None,
            error_class: None,
            error: None,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        match self.answer_inner(rung, ex, index, &mut rec) {
            Ok(()) => {}
            Err(e @ (Error::Runtime(_) | Error::Template { .. })) => {
                // One question that cannot be answered (a prompt over the window) is a wrong
                // answer with its reason, not the end of the run.
                rec.correct = Some(false);
                rec.error_class = Some("generation error".into());
                rec.error = Some(e.to_string());
            }
            Err(e) => return Err(e),
        }
        Ok(rec)
    }

    fn answer_inner(
        &mut self,
        rung: &Rung,
        ex: &Example,
        index: usize,
        rec: &mut ResultRecord,
    ) -> Result<()> {
        let is_sql = self.spec.task == Task::Sql;
        let (context, refs, gold_flags) = self.retrieve(rung, ex)?;
        rec.context = refs;
        let mut shots = Vec::new();
        if let Some(fs) = &rung.few_shot {
            shots = match fs.select {
                Select::Fixed => self.fixed.iter().copied().take(fs.k).collect(),
                Select::Question => {
                    let q = self.embed(&ex.question)?;
                    let g = group_of(self.spec, ex);
                    nearest(
                        self.shots,
                        &q,
                        &self.shot_q,
                        fs.k,
                        &ex.question,
                        g.as_deref(),
                    )
                }
                Select::Hyde => {
                    let user = render_user(rung, ex, self.shots, &[], &context)?;
                    let g = self.generate(
                        &[
                            ChatMessage::new("system", &rung.system),
                            ChatMessage::new("user", user),
                        ],
                        rung,
                        index,
                    )?;
                    rec.prompt_tokens += g.prompt_tokens;
                    rec.completion_tokens += g.completion_tokens;
                    let draft = if is_sql {
                        metrics::extract_sql(&g.text)
                    } else {
                        g.text.trim().to_string()
                    };
                    let v = self.embed(if draft.is_empty() {
                        &ex.question
                    } else {
                        &draft
                    })?;
                    rec.draft = Some(draft);
                    let g = group_of(self.spec, ex);
                    nearest(
                        self.shots,
                        &v,
                        &self.shot_a,
                        fs.k,
                        &ex.question,
                        g.as_deref(),
                    )
                }
            };
            rec.examples = shots
                .iter()
                .map(|&i| self.shots[i].question.clone())
                .collect();
        }
        let user = render_user(rung, ex, self.shots, &shots, &context)?;
        let mut messages = vec![
            ChatMessage::new("system", &rung.system),
            ChatMessage::new("user", &user),
        ];
        let g = self.generate(&messages, rung, index)?;
        rec.prompt = g.prompt.clone();
        rec.prompt_tokens += g.prompt_tokens;
        rec.completion_tokens += g.completion_tokens;
        let mut output = g.text;
        if is_sql {
            let db = ex.db.clone().unwrap_or_default();
            let conn = metrics::open_read_only(&db).map_err(|reason| Error::Io {
                path: db.display().to_string(),
                reason,
            })?;
            let mut sql = metrics::extract_sql(&output);
            if let Some(sc) = &rung.self_correct {
                let mut prompt = g.prompt;
                let mut draws = 1;
                for _ in 0..sc.max_retries {
                    let feedback = if sql.is_empty() {
                        Some("Your reply contained no SQL query.".to_string())
                    } else {
                        match metrics::execute(&conn, &sql, SQL_TIMEOUT, 1) {
                            Err(e) => {
                                let mut fb = format!(
                                    "The query failed with this SQLite error: {}",
                                    e.message
                                );
                                if let Some(hint) = metrics::schema_hint(&conn, &e.message) {
                                    fb.push('\n');
                                    fb.push_str(&hint);
                                }
                                Some(fb)
                            }
                            Ok((rows, _)) if rows.is_empty() => {
                                Some("The query ran but returned no rows.".to_string())
                            }
                            Ok(_) => None,
                        }
                    };
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
            }
            rec.output = output;
            rec.prediction = sql.clone();
            let gold = ex.reference.clone().unwrap_or_default();
            rec.scores.insert(
                "exact_match".into(),
                f64::from(u8::from(normalize_sql(&sql) == normalize_sql(&gold))),
            );
            match metrics::sql_execution_match(&conn, &sql, &gold, SQL_TIMEOUT) {
                Ok(o) => {
                    rec.scores
                        .insert("execution_accuracy".into(), f64::from(u8::from(o.correct)));
                    rec.error_class = o.error_class.map(|c| c.label().to_string());
                    rec.error = o.error;
                }
                Err(e) => {
                    rec.unscored.insert(
                        "execution_accuracy".into(),
                        format!("gold query fails: {e}"),
                    );
                }
            }
        } else {
            rec.output = output.clone();
            rec.prediction = output.trim().to_string();
            if let Some(reference) = &ex.reference {
                let p = &rec.prediction;
                rec.scores.insert(
                    "exact_match".into(),
                    f64::from(u8::from(metrics::exact_match(p, reference))),
                );
                rec.scores
                    .insert("token_f1".into(), metrics::token_f1(p, reference));
                rec.scores
                    .insert("rouge_l".into(), metrics::rouge_l(p, reference));
            }
            if self.spec.task == Task::Qa {
                rec.scores.insert(
                    "json_valid".into(),
                    f64::from(u8::from(metrics::json_valid(&rec.prediction))),
                );
            }
            if ex.gold.is_some() && rung.retrieval.is_some() {
                // Hit rate at k (any gold chunk retrieved) and the reciprocal rank of the first.
                let first = gold_flags.iter().position(|&g| g);
                rec.scores
                    .insert("recall_at_k".into(), f64::from(u8::from(first.is_some())));
                rec.scores
                    .insert("mrr".into(), first.map_or(0.0, |p| 1.0 / (p + 1) as f64));
            }
            if self.spec.task == Task::Rag {
                self.judge(ex, &context, rec)?;
            }
        }
        Ok(())
    }

    fn judge(
        &self,
        ex: &Example,
        context: &[(usize, String, String)],
        rec: &mut ResultRecord,
    ) -> Result<()> {
        let judge = Judge::new(self.llm, self.spec.judge.method);
        let joined: String = context
            .iter()
            .map(|(_, _, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        let passages: Vec<String> = context.iter().map(|(_, _, t)| t.clone()).collect();
        let answer = rec.prediction.clone();
        let mut put = |name: &str, v: crate::judge::Scored| match v {
            Ok(x) => {
                rec.scores.insert(name.into(), x);
            }
            Err(why) => {
                rec.unscored.insert(name.into(), why);
            }
        };
        // The judge is the base model, whatever adapter the rung answered with: a routing with
        // no adapter groups makes every LoRA layer on this thread use its base weights alone,
        // without touching the installed adapter.
        with_routing(Routing::default(), || -> Result<()> {
            put("faithfulness", judge.faithfulness(&answer, &joined)?);
            put(
                "answer_relevancy",
                judge.answer_relevancy(&ex.question, &answer)?,
            );
            put(
                "context_precision",
                judge.context_precision(&ex.question, ex.reference.as_deref(), &passages)?,
            );
            match &ex.reference {
                Some(r) => put("context_recall", judge.context_recall(r, &joined)?),
                None => put("context_recall", Err("no reference answer".into())),
            }
            Ok(())
        })
    }
}

fn classify_rag(rec: &ResultRecord, had_retrieval: bool) -> String {
    if !had_retrieval {
        return "wrong answer (no retrieval)".into();
    }
    let gold_seen = rec
        .context
        .iter()
        .filter_map(|c| c.gold)
        .collect::<Vec<_>>();
    let not_retrieved = if gold_seen.is_empty() {
        rec.scores.get("context_recall").is_some_and(|&r| r < 0.5)
    } else {
        !gold_seen.iter().any(|&g| g)
    };
    if not_retrieved {
        "not retrieved".into()
    } else if rec.scores.get("faithfulness").is_some_and(|&f| f < 0.5) {
        "retrieved but unfaithful".into()
    } else {
        "retrieved, answer wrong".into()
    }
}

/// Runs (or resumes) the spec; writes the reports when every result is in.
pub fn run(spec: &EvalSpec, opts: &RunOptions, obs: &mut dyn Observer) -> Result<RunOutcome> {
    let dir = spec.output_dir();
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let results_path = dir.join(RESULTS_FILE);
    let timings_path = dir.join(TIMINGS_FILE);
    let state_path = dir.join(STATE_FILE);
    let hash = spec_hash(spec);
    let rungs = spec.resolved_rungs();
    if opts.fresh {
        for p in [&results_path, &timings_path, &state_path] {
            if p.exists() {
                std::fs::remove_file(p).map_err(|e| io_err(p, e))?;
            }
        }
    }
    let old: Option<State> = match std::fs::read_to_string(&state_path) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| Error::Data {
            path: state_path.display().to_string(),
            line: 0,
            reason: e.to_string(),
        })?),
        Err(_) => None,
    };
    if let Some(st) = &old {
        if st.spec_sha256 != hash && results_path.exists() {
            return Err(Error::Resume(format!(
                "{} holds results made with another dataset, model, example store, judge or seed (spec `{}`); pass --fresh to discard them, or set another `output`",
                dir.display(),
                st.name
            )));
        }
    }
    // Rungs keep their results while their settings stay the same; a changed rung is redone.
    let mut hashes = old.as_ref().map(|s| s.rungs.clone()).unwrap_or_default();
    let mut changed = HashSet::new();
    for r in &rungs {
        let h = rung_hash(&hash, r);
        if hashes.get(&r.name).is_some_and(|old| *old != h) {
            changed.insert(r.name.clone());
        }
        hashes.insert(r.name.clone(), h);
    }
    let mut previous: Vec<ResultRecord> = read_jsonl_repair(&results_path)?;
    let mut timings: Vec<Timing> = read_jsonl_repair(&timings_path)?;
    let known = |rung: &str| old.as_ref().is_some_and(|s| s.rungs.contains_key(rung));
    let stale = |rung: &str| changed.contains(rung) || !known(rung);
    let dropped: std::collections::BTreeSet<String> = previous
        .iter()
        .filter(|r| stale(&r.rung))
        .map(|r| r.rung.clone())
        .collect();
    if !dropped.is_empty() {
        previous.retain(|r| !stale(&r.rung));
        timings.retain(|t| !stale(&t.rung));
        write_jsonl(&results_path, &previous)?;
        write_jsonl(&timings_path, &timings)?;
        obs.note(&format!(
            "the settings of {} changed: their earlier results were dropped and are redone",
            dropped
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let mut state = State {
        spec_sha256: hash,
        name: spec.name.clone(),
        rungs: hashes,
        complete: false,
    };
    state.save(&state_path)?;

    let spec_text = toml::to_string(spec).map_err(|e| Error::Resume(e.to_string()))?;
    crate::atomic_write(&dir.join(SPEC_COPY), spec_text.as_bytes())?;
    let done: HashSet<(String, String)> = previous
        .iter()
        .map(|r| (r.rung.clone(), r.id.clone()))
        .collect();
    let examples = read_dataset(&spec.dataset)?;
    let total = examples.len() * rungs.len();
    let todo = rungs
        .iter()
        .flat_map(|r| examples.iter().map(move |e| (r.name.clone(), e.id.clone())))
        .filter(|k| !done.contains(k))
        .count();
    let mut outcome = RunOutcome {
        dir: dir.clone(),
        complete: todo == 0,
        resumed: total - todo,
        written: 0,
    };
    if todo > 0 {
        run_missing(
            spec,
            &examples,
            &rungs,
            &done,
            &results_path,
            &timings_path,
            obs,
            &mut outcome,
        )?;
    }
    if outcome.complete {
        state.complete = true;
        state.save(&state_path)?;
        crate::report::write_reports(&dir, spec)?;
    }
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
fn run_missing(
    spec: &EvalSpec,
    examples: &[Example],
    rungs: &[Rung],
    done: &HashSet<(String, String)>,
    results_path: &Path,
    timings_path: &Path,
    obs: &mut dyn Observer,
    outcome: &mut RunOutcome,
) -> Result<()> {
    let load = load_options(&spec.model)?;
    let needs_adapters = rungs.iter().any(|r| r.adapter.is_some());
    let hook = needs_adapters.then(|| Arc::new(LoraHook::all_linear()));
    let model = match &hook {
        Some(h) => {
            TextModel::load_with_hook(&ModelFormat::resolve(&spec.model.path)?, &load, h.as_ref())?
        }
        None => TextModel::load(&spec.model.path, &load)?,
    };
    obs.loaded(&format!("model {}", spec.model.path));
    let embedder = match &spec.embedder {
        Some(e) => Some(EmbeddingModel::load(&e.path, &load_options(e)?)?),
        None => None,
    };
    let shots = match &spec.examples {
        Some(e) => read_examples(e)?,
        None => Vec::new(),
    };
    let needs = |s: Select| {
        rungs
            .iter()
            .any(|r| r.few_shot.as_ref().is_some_and(|f| f.select == s))
    };
    let embed_all = |texts: Vec<&str>| -> Result<Vec<Vec<f32>>> {
        let e = embedder.as_ref().ok_or_else(|| Error::Config {
            field: "embedder".into(),
            reason: "retrieved examples need an embedding model".into(),
        })?;
        Ok(e.embed_all(&texts, 32)?.into_iter().map(unit).collect())
    };
    let shot_q = if needs(Select::Question) {
        embed_all(shots.iter().map(|s| s.question.as_str()).collect())?
    } else {
        Vec::new()
    };
    let shot_a = if needs(Select::Hyde) {
        embed_all(shots.iter().map(|s| s.answer.as_str()).collect())?
    } else {
        Vec::new()
    };
    let max_k = rungs
        .iter()
        .filter_map(|r| r.few_shot.as_ref().map(|f| f.k))
        .max()
        .unwrap_or(0)
        .min(shots.len());
    let fixed = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
        rand::seq::index::sample(&mut rng, shots.len(), max_k).into_vec()
    };
    let llm = Llm::new(&model);
    let mut ctx = Ctx {
        spec,
        model: &model,
        hook: hook.as_deref(),
        llm: &llm,
        embedder: embedder.as_ref(),
        shots: &shots,
        shot_q,
        shot_a,
        fixed,
        stores: BTreeMap::new(),
        adapters: BTreeMap::new(),
        installed: None,
    };
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| io_err(p, e))
    };
    let mut results = open(results_path)?;
    let mut timings = open(timings_path)?;
    for (ri, rung) in rungs.iter().enumerate() {
        let already = examples
            .iter()
            .filter(|e| done.contains(&(rung.name.clone(), e.id.clone())))
            .count();
        obs.rung_started(rung, ri, rungs.len(), examples.len(), already);
        if already == examples.len() {
            continue;
        }
        ctx.use_adapter(rung.adapter.as_ref())?;
        for (i, ex) in examples.iter().enumerate() {
            if done.contains(&(rung.name.clone(), ex.id.clone())) {
                continue;
            }
            let t0 = Instant::now();
            let mut rec = ctx.answer(rung, ex, i)?;
            let seconds = t0.elapsed().as_secs_f64();
            let primary = spec.primary_metric();
            if rec.correct.is_none() {
                rec.correct = rec.scores.get(&primary).map(|&v| v >= 0.5);
            }
            if rec.correct == Some(false) && rec.error_class.is_none() {
                rec.error_class = Some(match spec.task {
                    Task::Sql => "wrong result".into(),
                    Task::Qa => "wrong answer".into(),
                    Task::Rag => classify_rag(&rec, rung.retrieval.is_some()),
                });
            }
            if rec.correct == Some(true) {
                rec.error_class = None;
            }
            let line = serde_json::to_string(&rec).unwrap_or_default();
            results
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|_| results.sync_data())
                .map_err(|e| io_err(results_path, e))?;
            let t = serde_json::to_string(&Timing {
                rung: rung.name.clone(),
                id: ex.id.clone(),
                seconds,
            })
            .unwrap_or_default();
            timings
                .write_all(format!("{t}\n").as_bytes())
                .map_err(|e| io_err(timings_path, e))?;
            outcome.written += 1;
            if obs.example_done(&rec).is_break() {
                outcome.complete = false;
                return Ok(());
            }
        }
    }
    outcome.complete = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Feedback, SelfCorrect};

    fn rung(temperature: f32) -> Rung {
        Rung {
            name: "r".into(),
            system: String::new(),
            template: String::new(),
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
