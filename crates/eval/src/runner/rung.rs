//! Answering one question with one rung: the run's shared context (model, embedder, examples,
//! stores, adapters), prompt rendering and generation, document retrieval, few-shot selection,
//! scoring and judging.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flywheel_api::{ChatMessage, GenerateRequest, Grammar, NullSink, SamplingParams};
use flywheel_peft::{with_routing, Adapter, LoraHook, Routing};
use flywheel_rag::answer::{build_context, source_label};
use flywheel_rag::eval::{is_gold, EvalQuestion};
use flywheel_rag::{DenseIndex, Llm, Mode, SearchOptions, Searcher, Store};
use flywheel_runtime::{EmbeddingModel, TextModel};

use super::correct::FirstAnswer;
use super::prompt::{group_of, nearest, nearest_by, render_user, unit, Schemas};
use super::SQL_TIMEOUT;
use crate::data::{Example, Shot};
use crate::judge::Judge;
use crate::metrics::{self, normalize_sql};
use crate::records::{ContextRef, ErrorClass, ResultRecord};
use crate::spec::{Constrain, EvalSpec, Rung, Select, Task, Vote};
use crate::sql::{mask_question, skeleton_similarity, sql_skeleton};
use crate::{Error, Result};

/// Most rows read from a voted sample (results longer than this compare by their first rows).
const VOTE_MAX_ROWS: usize = 10_000;

/// Everything a run holds while it works.
pub(super) struct Ctx<'a> {
    /// The spec.
    pub(super) spec: &'a EvalSpec,
    /// The model every rung answers with.
    pub(super) model: &'a TextModel,
    /// The LoRA hook adapters are installed on (when a rung has one).
    pub(super) hook: Option<&'a LoraHook>,
    /// The model's retrieval and judge jobs.
    pub(super) llm: &'a Llm<'a>,
    /// The embedding model (retrieved examples, document retrieval).
    pub(super) embedder: Option<&'a EmbeddingModel>,
    /// The example store.
    pub(super) shots: &'a [Shot],
    /// Embedded example questions (question-retrieved few-shot).
    pub(super) shot_q: Vec<Vec<f32>>,
    /// Embedded example answers (HyDE few-shot).
    pub(super) shot_a: Vec<Vec<f32>>,
    /// Embedded example questions with their schema words masked (skeleton few-shot).
    pub(super) shot_masked: Vec<Vec<f32>>,
    /// SQL skeletons of the example answers (skeleton few-shot).
    pub(super) shot_skel: Vec<Vec<String>>,
    /// The fixed few-shot examples, most that any rung shows.
    pub(super) fixed: Vec<usize>,
    /// Document stores opened so far.
    pub(super) stores: BTreeMap<PathBuf, (Store, DenseIndex)>,
    /// Adapters loaded so far.
    pub(super) adapters: BTreeMap<PathBuf, Adapter>,
    /// The adapter installed now.
    pub(super) installed: Option<PathBuf>,
    /// Database schemas read so far.
    pub(super) schemas: Schemas,
}

/// Passages for the prompt `(n, source, text)`, their references, and gold flags of every hit.
type Retrieved = (Vec<(usize, String, String)>, Vec<ContextRef>, Vec<bool>);

/// One generation: the rendered prompt, the output and their token counts.
pub(super) struct Generated {
    /// The rendered prompt.
    pub(super) prompt: String,
    /// The model's output.
    pub(super) text: String,
    /// Tokens of the prompt.
    pub(super) prompt_tokens: usize,
    /// Tokens generated.
    pub(super) completion_tokens: usize,
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

    fn generate(
        &self,
        messages: &[ChatMessage],
        rung: &Rung,
        index: usize,
        grammar: Option<&Grammar>,
    ) -> Result<Generated> {
        let mut sampling = rung.sampling.clone();
        sampling.seed = rung.sampling.seed.wrapping_add(index as u64);
        self.generate_with(messages, rung, sampling, grammar)
    }

    /// The request for `messages` under the rung's limits and stop strings, and its prompt's
    /// token count.
    fn request(
        &self,
        messages: &[ChatMessage],
        rung: &Rung,
        sampling: SamplingParams,
        grammar: Option<&Grammar>,
    ) -> Result<(GenerateRequest, usize)> {
        let prompt = self.render(messages)?;
        let n = self.model.encode_prompt(&prompt)?.len();
        let window = self.model.model().config().max_position_embeddings;
        if n + 1 >= window {
            return Err(Error::Runtime(flywheel_runtime::Error::PromptTooLong {
                tokens: n,
                context: window,
            }));
        }
        let mut req = GenerateRequest::new(prompt, rung.max_tokens.min(window - n - 1));
        req.sampling = sampling;
        req.stop = rung.stop.clone();
        req.grammar = grammar.cloned();
        Ok((req, n))
    }

    /// [`Self::generate`] with the given sampling settings (seed included).
    pub(super) fn generate_with(
        &self,
        messages: &[ChatMessage],
        rung: &Rung,
        sampling: SamplingParams,
        grammar: Option<&Grammar>,
    ) -> Result<Generated> {
        let (req, n) = self.request(messages, rung, sampling, grammar)?;
        let prompt = req.prompt.clone();
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
    pub(super) fn use_adapter(&mut self, adapter: Option<&PathBuf>) -> Result<()> {
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
    pub(super) fn answer(
        &mut self,
        rung: &Rung,
        ex: &Example,
        index: usize,
    ) -> Result<ResultRecord> {
        let mut rec = ResultRecord {
            rung: rung.name.clone(),
            id: ex.id.clone(),
            question: ex.question.clone(),
            reference: ex.reference.clone(),
            prompt: String::new(),
            output: String::new(),
            prediction: String::new(),
            attempts: Vec::new(),
            votes: Vec::new(),
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
                rec.error_class = Some(ErrorClass::Generation);
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
        let schema = self.schemas.text(self.spec, rung, ex)?;
        let grammar = match rung.constrain {
            Some(Constrain::Sql) => Some(self.schemas.grammar(ex)?),
            None => None,
        };
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
                    let draft = self.draft(rung, ex, &context, &schema, index, &grammar, rec)?;
                    let v = self.embed(if draft.is_empty() {
                        &ex.question
                    } else {
                        &draft
                    })?;
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
                Select::Skeleton => {
                    let draft = self.draft(rung, ex, &context, &schema, index, &grammar, rec)?;
                    let names = self.schemas.get(ex, 0)?.names();
                    let q = self.embed(&mask_question(&ex.question, &names))?;
                    let skel = sql_skeleton(&draft);
                    let g = group_of(self.spec, ex);
                    nearest_by(self.shots, fs.k, &ex.question, g.as_deref(), |i| {
                        let masked: f32 =
                            q.iter().zip(&self.shot_masked[i]).map(|(a, b)| a * b).sum();
                        masked + skeleton_similarity(&skel, &self.shot_skel[i]) as f32
                    })
                }
            };
            rec.examples = shots
                .iter()
                .map(|&i| self.shots[i].question.clone())
                .collect();
        }
        let user = render_user(rung, ex, self.shots, &shots, &context, &schema)?;
        let messages = vec![
            ChatMessage::new("system", &rung.system),
            ChatMessage::new("user", &user),
        ];
        if is_sql {
            let db = ex.db.clone().unwrap_or_default();
            let conn = metrics::open_read_only(&db).map_err(|reason| Error::Io {
                path: db.display().to_string(),
                reason,
            })?;
            let (mut output, mut sql) = match &rung.vote {
                Some(v) => self.vote(rung, v, &messages, grammar.as_ref(), index, &conn, rec)?,
                None => {
                    let g = self.generate(&messages, rung, index, grammar.as_ref())?;
                    rec.prompt = g.prompt;
                    rec.prompt_tokens += g.prompt_tokens;
                    rec.completion_tokens += g.completion_tokens;
                    let sql = metrics::extract_sql(&g.text);
                    (g.text, sql)
                }
            };
            if let Some(sc) = &rung.self_correct {
                let first = FirstAnswer {
                    user,
                    messages,
                    prompt: rec.prompt.clone(),
                    output,
                    sql,
                    grammar,
                };
                (output, sql) = self.self_correct(rung, sc, &conn, index, first, rec)?;
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
                    rec.error_class = o.error_class.map(ErrorClass::Sql);
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
            let g = self.generate(&messages, rung, index, None)?;
            rec.prompt = g.prompt;
            rec.prompt_tokens += g.prompt_tokens;
            rec.completion_tokens += g.completion_tokens;
            let output = g.text;
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
                let first = flywheel_rag::metrics::first_relevant(&gold_flags, usize::MAX);
                rec.scores
                    .insert("recall_at_k".into(), f64::from(u8::from(first.is_some())));
                rec.scores
                    .insert("mrr".into(), first.map_or(0.0, |r| 1.0 / r as f64));
            }
            if self.spec.task == Task::Rag {
                self.judge(ex, &context, rec)?;
            }
        }
        Ok(())
    }

    /// A draft answer without examples (HyDE and skeleton selection), recorded in `rec`: the
    /// SQL of a SQL task, the trimmed text otherwise.
    #[allow(clippy::too_many_arguments)]
    fn draft(
        &self,
        rung: &Rung,
        ex: &Example,
        context: &[(usize, String, String)],
        schema: &str,
        index: usize,
        grammar: &Option<Grammar>,
        rec: &mut ResultRecord,
    ) -> Result<String> {
        let user = render_user(rung, ex, self.shots, &[], context, schema)?;
        let g = self.generate(
            &[
                ChatMessage::new("system", &rung.system),
                ChatMessage::new("user", user),
            ],
            rung,
            index,
            grammar.as_ref(),
        )?;
        rec.prompt_tokens += g.prompt_tokens;
        rec.completion_tokens += g.completion_tokens;
        let draft = if self.spec.task == Task::Sql {
            metrics::extract_sql(&g.text)
        } else {
            g.text.trim().to_string()
        };
        rec.draft = Some(draft.clone());
        Ok(draft)
    }

    /// Execution voting: `v.n` samples from one prefill, each run read-only, the vote recorded
    /// in `rec`; returns the winner's output and SQL.
    #[allow(clippy::too_many_arguments)]
    fn vote(
        &self,
        rung: &Rung,
        v: &Vote,
        messages: &[ChatMessage],
        grammar: Option<&Grammar>,
        index: usize,
        conn: &rusqlite::Connection,
        rec: &mut ResultRecord,
    ) -> Result<(String, String)> {
        // The rung's sampling (penalties, top-k, min-p) at the vote's temperature and top-p.
        let sampling = SamplingParams {
            temperature: v.temperature,
            top_p: v.top_p,
            ..rung.sampling.clone()
        };
        let (req, n) = self.request(messages, rung, sampling, grammar)?;
        // Seeds fixed by the rung, the question and the sample.
        let seeds: Vec<u64> = (0..v.n as u64)
            .map(|k| {
                rung.sampling
                    .seed
                    .wrapping_add(index as u64)
                    .wrapping_add(k << 40)
            })
            .collect();
        let s = self.model.generate_samples(&req, &seeds)?;
        let runs = crate::sql::run_samples(conn, &s.outputs, SQL_TIMEOUT, VOTE_MAX_ROWS);
        let outcome = crate::sql::vote(&runs);
        rec.prompt = req.prompt;
        rec.prompt_tokens += n;
        rec.completion_tokens += s
            .outputs
            .iter()
            .map(|o| o.usage.completion_tokens)
            .sum::<usize>();
        let w = outcome.winner;
        rec.votes = outcome.samples;
        Ok((s.outputs[w].text.clone(), runs[w].0.clone()))
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

/// The error class of a wrong RAG answer: not retrieved, retrieved but unfaithful, or
/// retrieved and still wrong (or no retrieval at all).
pub(super) fn classify_rag(rec: &ResultRecord, had_retrieval: bool) -> ErrorClass {
    if !had_retrieval {
        return ErrorClass::NoRetrieval;
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
        ErrorClass::NotRetrieved
    } else if rec.scores.get("faithfulness").is_some_and(|&f| f < 0.5) {
        ErrorClass::Unfaithful
    } else {
        ErrorClass::RetrievedWrong
    }
}
