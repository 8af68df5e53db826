//! The ladder runner: loads the model once, runs every rung over every question, scores each
//! answer, and appends one line per (rung, question) to `results.jsonl` (timings go to
//! `timings.jsonl`, so the results file is identical whenever the spec is). An interrupted run
//! resumes where its results file ends; a torn last line is dropped.
//!
//! - `rung`: answering and scoring one question with one rung (the run's shared context).
//! - `correct`: self-correction of SQL answers from execution feedback.
//! - `prompt`: the rung's user message and its few-shot examples (nearest neighbours).
//! - `export`: training data whose prompts are built the way a rung builds them
//!   ([`make_training_data`]).
//!
//! The record types and file names live in [`crate::records`]; they are re-exported here under
//! their old paths.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_peft::LoraHook;
use flywheel_rag::Llm;
use flywheel_runtime::{EmbeddingModel, LoadOptions, ModelFormat, TextModel};
use rand::SeedableRng;

use crate::data::{read_dataset, read_examples, Example};
use crate::metrics::SqlErrorClass;
use crate::records::{write_jsonl, ErrorClass, State};
use crate::spec::{EvalSpec, ModelSpec, Rung, Select, Task};
use crate::{io_err, Error, Result};
use prompt::unit;
use rung::{classify_rag, Ctx};

mod correct;
mod export;
mod prompt;
mod rung;

pub use crate::metrics::normalize_sql;
pub use crate::records::{
    read_jsonl_repair, rung_hash, spec_hash, Attempt, ContextRef, ResultRecord, Timing,
    RESULTS_FILE, SPEC_COPY, STATE_FILE, TIMINGS_FILE,
};
pub use export::make_training_data;

/// How long one SQL query may run before it counts as a timeout.
pub const SQL_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Runs (or resumes) the spec; writes the reports when every result is in.
pub fn run(spec: &EvalSpec, opts: &RunOptions, obs: &mut dyn Observer) -> Result<RunOutcome> {
    let dir = spec.output_dir();
    // One process per run folder: a second `eval run` on it is refused, naming the first.
    let _lock = flywheel_api::lock::FolderLock::folder(&dir)?;
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
    // Skeleton few-shot: each example's question masked with its own database's names (the
    // `[examples] group` field names the database, as `dataset.db_id` does), and its SQL's
    // skeleton.
    let (shot_masked, shot_skel) = if needs(Select::Skeleton) {
        let mut names: HashMap<String, Vec<String>> = HashMap::new();
        let masked: Vec<String> = shots
            .iter()
            .map(|s| {
                let db_names = s.group.as_ref().map_or(&[][..], |g| {
                    names.entry(g.clone()).or_insert_with(|| {
                        let path = spec
                            .dataset
                            .db_dir
                            .as_ref()
                            .map(|d| d.join(format!("{g}.sqlite")));
                        path.filter(|p| p.is_file())
                            .and_then(|p| crate::metrics::open_read_only(&p).ok())
                            .and_then(|c| crate::sql::DbSchema::read(&c, 0).ok())
                            .map(|s| s.names())
                            .unwrap_or_default()
                    })
                });
                crate::sql::mask_question(&s.question, db_names)
            })
            .collect();
        (
            embed_all(masked.iter().map(String::as_str).collect())?,
            shots
                .iter()
                .map(|s| crate::sql::sql_skeleton(&s.answer))
                .collect(),
        )
    } else {
        (Vec::new(), Vec::new())
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
        shot_masked,
        shot_skel,
        fixed,
        stores: BTreeMap::new(),
        adapters: BTreeMap::new(),
        installed: None,
        schemas: Default::default(),
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
                    Task::Sql => ErrorClass::Sql(SqlErrorClass::WrongResult),
                    Task::Qa => ErrorClass::WrongAnswer,
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
