//! The LoRA trainer: next-token cross-entropy on the answer tokens, AdamW on the adapter
//! parameters only, warmup + cosine/linear/constant schedule, gradient accumulation and
//! clipping, periodic evaluation, atomic checkpoints with optimizer state, exact resume,
//! stop-on-request (Ctrl-C) with a checkpoint, and a stop with a clear message on NaN/inf loss.
//!
//! Run folder (`output.dir`): `adapter/` (PEFT layout + `flywheel_adapter.json`),
//! `checkpoints/step-NNNNNN/`, `metrics.jsonl`, `loss.svg`, `recipe.toml`, `summary.json`.
//!
//! Determinism: the data order of epoch `e` is a permutation seeded by `(seed, e)`, the step `s`
//! reads a fixed slice of that stream, and dropout masks are seeded by `(seed, micro-step)`, so
//! resuming from step `N` replays exactly what an uninterrupted run does after step `N`.

use candle_core::{DType, Device, Tensor, Var, D};
use flywheel_runtime::{LoadOptions, ModelFormat, TextModel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use flywheel_api::files::now_rfc3339;
use flywheel_api::lock::FolderLock;
use flywheel_peft::adapter::{read_safetensors, write_safetensors, AdapterRecord, RECORD_FILE};
use flywheel_peft::{fnv1a, LoraHook, TrainableAdapter};
use flywheel_runtime::load::model_sha;

use crate::data::{load_file, DataOptions, DataStats, Example};
use crate::recipe::Recipe;

mod checkpoint;
mod schedule;

use crate::{atomic_write, replace_dir, sha256_file, write_json_atomic, Error, Result};
pub use schedule::lr_at;
use schedule::{pack, shuffle};

/// Something the trainer reports while it runs.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Data is loaded and training is about to start (or resume at `start_step`).
    Started {
        /// Optimizer steps in the whole run.
        total_steps: usize,
        /// The step training starts from (0, or the resumed checkpoint's step).
        start_step: usize,
        /// Trainable parameters.
        trainable: usize,
        /// Training data counts.
        train: DataStats,
        /// Validation examples.
        valid_examples: usize,
    },
    /// An optimizer step finished.
    Step(StepMetrics),
    /// Validation loss at a step.
    Eval {
        /// The step.
        step: usize,
        /// Mean loss per answer token.
        loss: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// The step.
        step: usize,
        /// Its folder.
        path: PathBuf,
    },
}

/// Figures of one optimizer step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// 1-based step number.
    pub step: usize,
    /// Steps in the run.
    pub total_steps: usize,
    /// Mean loss per answer token.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (prompt + answer, no padding) in the step.
    pub tokens: usize,
    /// Tokens per second over the step.
    pub tokens_per_s: f64,
    /// Seconds since the run (or the resumed run) started.
    pub elapsed_s: f64,
}

/// Receives [`TrainEvent`]s (the CLI draws a progress bar from them).
pub trait TrainObserver {
    /// Called for each event.
    fn event(&mut self, e: &TrainEvent);
}

impl<F: FnMut(&TrainEvent)> TrainObserver for F {
    fn event(&mut self, e: &TrainEvent) {
        self(e)
    }
}

/// The outcome of [`Trainer::run`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: usize,
    /// Steps the run was planned for.
    pub total_steps: usize,
    /// Stopped early on request (a checkpoint was saved).
    pub interrupted: bool,
    /// Mean training loss over the last 10 steps.
    pub final_train_loss: Option<f64>,
    /// Last validation loss.
    pub final_eval_loss: Option<f64>,
    /// Answer tokens trained on.
    pub trained_tokens: usize,
    /// Training data counts.
    pub train_data: DataStats,
    /// Validation examples.
    pub valid_examples: usize,
    /// The adapter folder (written when the run completed).
    pub adapter_dir: Option<PathBuf>,
    /// The run folder.
    pub run_dir: PathBuf,
}

/// AdamW state for one parameter.
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// A LoRA training run.
pub struct Trainer {
    /// The run folder's lock, taken when the run starts writing (a dry run takes none): no
    /// other process writes the folder while this trainer lives.
    lock: Option<FolderLock>,
    recipe: Recipe,
    recipe_text: String,
    model: TextModel,
    hook: LoraHook,
    adapter: TrainableAdapter,
    moments: Vec<Moments>,
    train: Vec<Example>,
    train_stats: DataStats,
    valid: Vec<Example>,
    total_steps: usize,
    step: usize,
    trained_tokens: usize,
    recent_losses: Vec<f64>,
    last_eval: Option<f64>,
    run_dir: PathBuf,
    fingerprint: String,
    data_sha: BTreeMap<String, String>,
    base_sha: String,
    device: Device,
    stop: Arc<AtomicBool>,
}

impl Trainer {
    /// Loads the base model with LoRA layers, reads the data and prepares the optimizer.
    /// With `resume`, continues from the newest checkpoint in the run folder.
    pub fn new(recipe: Recipe, resume: bool) -> Result<Self> {
        recipe.validate()?;
        let device = flywheel_runtime::parse_device(&recipe.model.device)?;
        let dtype = flywheel_runtime::parse_dtype(&recipe.model.dtype)?;
        let fmt = ModelFormat::resolve(&recipe.model.path)?;
        let hook = LoraHook::for_config(&recipe.lora);
        let opts = LoadOptions {
            device: device.clone(),
            dtype: Some(dtype),
        };
        let model = TextModel::load_with_hook(&fmt, &opts, &hook)?;
        model.model().set_training(true);
        model
            .model()
            .set_gradient_checkpointing(recipe.batch.gradient_checkpointing);
        let adapter = hook.init_trainable(&recipe.lora, recipe.batch.seed, dtype, &device)?;
        let base_sha = model_sha(fmt.path())?;

        let data_opts = DataOptions {
            chat: recipe.data.chat,
            system: recipe.data.system.clone(),
            train_on_inputs: recipe.data.train_on_inputs,
            max_seq_len: recipe.data.max_seq_len,
            overlong: recipe.data.overlong,
        };
        let mut data_sha = BTreeMap::new();
        data_sha.insert(
            recipe.data.train.display().to_string(),
            sha256_file(&recipe.data.train)?,
        );
        let (mut train, mut train_stats, _) = load_file(&recipe.data.train, &model, &data_opts)?;
        let mut valid = match &recipe.data.valid {
            Some(p) => {
                data_sha.insert(p.display().to_string(), sha256_file(p)?);
                load_file(p, &model, &data_opts)?.0
            }
            None if recipe.data.valid_split > 0.0 => {
                let mut idx: Vec<usize> = (0..train.len()).collect();
                shuffle(&mut idx, recipe.batch.seed ^ 0x05EE_D0F5_A11D);
                let n_valid = ((train.len() as f64) * recipe.data.valid_split).round() as usize;
                let n_valid = n_valid.clamp(1, train.len().saturating_sub(1).max(1));
                let held: std::collections::HashSet<usize> =
                    idx[..n_valid].iter().copied().collect();
                let mut tr = Vec::new();
                let mut va = Vec::new();
                for (i, e) in train.into_iter().enumerate() {
                    if held.contains(&i) {
                        va.push(e);
                    } else {
                        tr.push(e);
                    }
                }
                train = tr;
                va
            }
            None => Vec::new(),
        };
        if recipe.eval.max_examples > 0 {
            valid.truncate(recipe.eval.max_examples);
        }
        if recipe.data.packing {
            train = pack(train, recipe.data.max_seq_len, recipe.batch.seed);
        }
        if train.is_empty() {
            return Err(Error::Data {
                path: recipe.data.train.display().to_string(),
                line: 0,
                reason: format!(
                    "no training example left ({} dropped as longer than data.max_seq_len = {})",
                    train_stats.dropped_overlong, recipe.data.max_seq_len
                ),
            });
        }
        train_stats.kept = train.len();
        let per_step = recipe.batch.size * recipe.batch.grad_accum;
        let total_steps = if recipe.batch.max_steps > 0 {
            recipe.batch.max_steps
        } else {
            ((recipe.batch.epochs * train.len() as f64) / per_step as f64)
                .ceil()
                .max(1.0) as usize
        };
        let moments = adapter
            .vars()
            .iter()
            .map(|v| -> Result<Moments> {
                Ok(Moments {
                    m: v.zeros_like()?,
                    v: v.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let fingerprint = fingerprint(&recipe, &data_sha, &base_sha);
        let mut t = Self {
            lock: None,
            recipe_text: recipe.to_toml(),
            run_dir: recipe.output.dir.clone(),
            recipe,
            model,
            hook,
            adapter,
            moments,
            train,
            train_stats,
            valid,
            total_steps,
            step: 0,
            trained_tokens: 0,
            recent_losses: Vec::new(),
            last_eval: None,
            fingerprint,
            data_sha,
            base_sha,
            device,
            stop: Arc::new(AtomicBool::new(false)),
        };
        if resume {
            t.resume()?;
        } else if t.checkpoints()?.last().is_some() {
            return Err(Error::Checkpoint {
                path: t.run_dir.join("checkpoints").display().to_string(),
                reason: "the run folder already has checkpoints; pass --resume to continue it, or choose another output.dir".into(),
            });
        } else if let Some(f) = ["metrics.jsonl", "summary.json", "adapter"]
            .iter()
            .find(|f| t.run_dir.join(f).exists())
        {
            return Err(Error::Checkpoint {
                path: t.run_dir.display().to_string(),
                reason: format!(
                    "the run folder holds another run's files ({f}); pass --resume to continue that run, or choose another output.dir"
                ),
            });
        }
        Ok(t)
    }

    /// A flag that, once set (Ctrl-C), makes the run save a checkpoint and return.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The model being trained.
    pub fn model(&self) -> &TextModel {
        &self.model
    }

    /// The trainable adapter.
    pub fn adapter(&self) -> &TrainableAdapter {
        &self.adapter
    }

    /// The hook holding the adapter slots.
    pub fn hook(&self) -> &LoraHook {
        &self.hook
    }

    /// Steps planned for the run.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// Steps done so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Counts from loading the training data.
    pub fn data_stats(&self) -> &DataStats {
        &self.train_stats
    }

    /// Validation examples.
    pub fn valid_count(&self) -> usize {
        self.valid.len()
    }

    /// Training examples (after splitting and packing).
    pub fn train_examples(&self) -> &[Example] {
        &self.train
    }

    /// Runs until `total_steps`, or until `stop_at` steps when given (tests), or a stop request.
    pub fn run(
        &mut self,
        observer: &mut dyn TrainObserver,
        stop_at: Option<usize>,
    ) -> Result<TrainSummary> {
        if self.lock.is_none() {
            // One process per run folder; what a killed run left half-written goes.
            self.lock = Some(FolderLock::folder(&self.run_dir)?);
            self.remove_partial_checkpoints()?;
        }
        atomic_write(
            &self.run_dir.join("recipe.toml"),
            self.recipe_text.as_bytes(),
        )?;
        observer.event(&TrainEvent::Started {
            total_steps: self.total_steps,
            start_step: self.step,
            trainable: self.adapter.parameter_count(),
            train: self.train_stats.clone(),
            valid_examples: self.valid.len(),
        });
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        let started = Instant::now();
        let end = stop_at.unwrap_or(self.total_steps).min(self.total_steps);
        let mut interrupted = false;
        while self.step < end {
            let t0 = Instant::now();
            // The whole step (forward, backward, update) on a pool thread: candle's parallel ops
            // then run without a thread switch each (see `flywheel_models::on_pool`).
            let device = self.device.clone();
            let m = flywheel_models::on_pool(&device, || self.train_step())?;
            let m = StepMetrics {
                tokens_per_s: m.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
                ..m
            };
            writeln!(
                metrics,
                "{}",
                serde_json::json!({"step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm, "tokens": m.tokens, "tokens_per_s": m.tokens_per_s, "elapsed_s": m.elapsed_s})
            )
            .map_err(|e| Error::io(&metrics_path, e))?;
            observer.event(&TrainEvent::Step(m));
            let every_eval = self.recipe.eval.every;
            if !self.valid.is_empty()
                && ((every_eval > 0 && self.step.is_multiple_of(every_eval))
                    || self.step == self.total_steps)
            {
                let loss = self.eval_loss()?;
                self.last_eval = Some(loss);
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": self.step, "eval_loss": loss})
                )
                .map_err(|e| Error::io(&metrics_path, e))?;
                observer.event(&TrainEvent::Eval {
                    step: self.step,
                    loss,
                });
            }
            metrics.flush().map_err(|e| Error::io(&metrics_path, e))?;
            let stop = self.stop.load(Ordering::Relaxed);
            let every_ckpt = self.recipe.checkpoint.every;
            if stop
                || (every_ckpt > 0 && self.step.is_multiple_of(every_ckpt))
                || self.step == self.total_steps
                || self.step == end
            {
                let path = self.save_checkpoint()?;
                observer.event(&TrainEvent::Checkpoint {
                    step: self.step,
                    path,
                });
            }
            if stop {
                interrupted = true;
                break;
            }
        }
        self.write_plot()?;
        let adapter_dir = if self.step == self.total_steps {
            Some(self.save_adapter()?)
        } else {
            None
        };
        let summary = TrainSummary {
            steps: self.step,
            total_steps: self.total_steps,
            interrupted,
            final_train_loss: self.mean_recent(),
            final_eval_loss: self.last_eval,
            trained_tokens: self.trained_tokens,
            train_data: self.train_stats.clone(),
            valid_examples: self.valid.len(),
            adapter_dir,
            run_dir: self.run_dir.clone(),
        };
        write_json_atomic(&self.run_dir.join("summary.json"), &summary)?;
        Ok(summary)
    }

    fn mean_recent(&self) -> Option<f64> {
        (!self.recent_losses.is_empty())
            .then(|| self.recent_losses.iter().sum::<f64>() / self.recent_losses.len() as f64)
    }

    /// The examples of micro-batch `micro` (global index over the whole run).
    fn micro_batch(&self, micro: usize) -> Vec<&Example> {
        let n = self.train.len();
        let size = self.recipe.batch.size;
        // A batch spans at most a few epochs: shuffle each epoch's order once.
        let mut orders: Vec<(usize, Vec<usize>)> = Vec::new();
        (0..size)
            .map(|i| {
                let g = micro * size + i;
                let epoch = g / n;
                if !orders.iter().any(|(e, _)| *e == epoch) {
                    let mut order: Vec<usize> = (0..n).collect();
                    shuffle(
                        &mut order,
                        self.recipe.batch.seed.wrapping_add(epoch as u64),
                    );
                    orders.push((epoch, order));
                }
                let order = &orders.iter().find(|(e, _)| *e == epoch).expect("added").1;
                &self.train[order[g % n]]
            })
            .collect()
    }

    /// The learning rate at 0-based step `s`.
    pub fn lr_at(&self, s: usize) -> f64 {
        lr_at(&self.recipe, self.total_steps, s)
    }

    /// One optimizer step over `grad_accum` micro-batches.
    fn train_step(&mut self) -> Result<StepMetrics> {
        let accum = self.recipe.batch.grad_accum;
        let micros: Vec<usize> = (0..accum).map(|j| self.step * accum + j).collect();
        let batches: Vec<Vec<Example>> = micros
            .iter()
            .map(|&m| self.micro_batch(m).into_iter().cloned().collect())
            .collect();
        let targets: usize = batches
            .iter()
            .flat_map(|b| b.iter().map(Example::target_count))
            .sum();
        let tokens: usize = batches
            .iter()
            .flat_map(|b| b.iter().map(|e| e.ids.len()))
            .sum();
        let vars: Vec<Var> = self.adapter.vars().into_iter().cloned().collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        for (micro, batch) in micros.iter().zip(&batches) {
            self.hook
                .dropout_seed()
                .set(self.recipe.batch.seed ^ fnv1a(&(*micro as u64).to_le_bytes()));
            let refs: Vec<&Example> = batch.iter().collect();
            let nll = batch_nll(&self.model, &refs, &self.device)?;
            loss_sum += nll.to_scalar::<f32>()? as f64;
            let scaled = (nll / targets.max(1) as f64)?;
            let _stale = flywheel_models::autograd::ops::take_checkpoint_grads();
            let store = scaled.backward()?;
            // Checkpointed blocks hand in the gradients of their recomputation separately.
            let mut stores = flywheel_models::autograd::ops::take_checkpoint_grads();
            stores.push(store);
            for store in &stores {
                for (g, v) in grads.iter_mut().zip(&vars) {
                    if let Some(new) = store.get(v.as_tensor()) {
                        *g = Some(match g.take() {
                            Some(acc) => (acc + new)?,
                            None => new.clone(),
                        });
                    }
                }
            }
        }
        let loss = loss_sum / targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                step: self.step + 1,
                value: loss,
            });
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let mut sq = 0f64;
        for g in &grads {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                step: self.step + 1,
                value: grad_norm,
            });
        }
        let max_norm = self.recipe.optimizer.max_grad_norm;
        let clip = if max_norm > 0.0 && grad_norm > max_norm {
            max_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = self.lr_at(self.step);
        let o = &self.recipe.optimizer;
        let t = (self.step + 1) as i32;
        let (b1, b2) = (o.betas[0], o.betas[1]);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for ((v, g), mo) in vars.iter().zip(&grads).zip(self.moments.iter_mut()) {
            let g = (g * clip)?;
            mo.m = ((&mo.m * b1)? + (&g * (1.0 - b1))?)?;
            mo.v = ((&mo.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&mo.v / c2)?.sqrt()? + o.eps)?;
            let update = ((&mo.m / c1)? / denom)?;
            let decayed = (v.as_tensor() * (1.0 - lr * o.weight_decay))?;
            v.set(&(decayed - (update * lr)?)?.detach())?;
        }
        self.step += 1;
        self.trained_tokens += targets;
        self.recent_losses.push(loss);
        if self.recent_losses.len() > 10 {
            self.recent_losses.remove(0);
        }
        Ok(StepMetrics {
            step: self.step,
            total_steps: self.total_steps,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
        })
    }

    /// Mean validation loss per answer token.
    pub fn eval_loss(&self) -> Result<f64> {
        self.hook.dropout_seed().set_enabled(false);
        let r = flywheel_models::on_pool(&self.device, || self.eval_loss_inner());
        self.hook.dropout_seed().set_enabled(true);
        r
    }

    fn eval_loss_inner(&self) -> Result<f64> {
        let mut nll = 0f64;
        let mut n = 0usize;
        for chunk in self.valid.chunks(self.recipe.eval.batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            nll += batch_nll(&self.model, &refs, &self.device)?
                .detach()
                .to_scalar::<f32>()? as f64;
            n += chunk.iter().map(Example::target_count).sum::<usize>();
        }
        Ok(nll / n.max(1) as f64)
    }

    fn save_adapter(&self) -> Result<PathBuf> {
        let dir = self.run_dir.join("adapter");
        let tmp = self.run_dir.join(".adapter.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        self.adapter
            .snapshot(&dir.display().to_string())?
            .save(&tmp, &self.recipe.model.path)?;
        let record = AdapterRecord {
            flywheel_version: env!("CARGO_PKG_VERSION").to_string(),
            base_model: self.recipe.model.path.clone(),
            base_model_sha256: self.base_sha.clone(),
            recipe: self.recipe_text.clone(),
            data_sha256: self.data_sha.clone(),
            steps: self.step,
            trained_tokens: self.trained_tokens,
            final_train_loss: self.mean_recent(),
            final_eval_loss: self.last_eval,
            overlong_examples: self.train_stats.dropped_overlong + self.train_stats.truncated,
            created: now_rfc3339(),
        };
        write_json_atomic(&tmp.join(RECORD_FILE), &record)?;
        replace_dir(&tmp, &dir)?;
        Ok(dir)
    }

    fn write_plot(&self) -> Result<()> {
        let mpath = self.run_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&mpath).unwrap_or_default();
        let mut train = Vec::new();
        let mut eval = Vec::new();
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                continue;
            };
            let step = v.get("step").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
            if let Some(x) = v.get("loss").and_then(|x| x.as_f64()) {
                train.push((step, x));
            }
            if let Some(x) = v.get("eval_loss").and_then(|x| x.as_f64()) {
                eval.push((step, x));
            }
        }
        let title = format!(
            "LoRA r={} on {}",
            self.recipe.lora.r, self.recipe.model.path
        );
        atomic_write(
            &self.run_dir.join("loss.svg"),
            crate::plot::loss_svg(&title, &train, &eval).as_bytes(),
        )
    }
}

/// Summed next-token negative log-likelihood over the answer tokens of `batch` (a scalar that
/// carries gradients to the adapter).
pub fn batch_nll(model: &TextModel, batch: &[&Example], device: &Device) -> Result<Tensor> {
    let t = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let b = batch.len();
    let pad = model
        .model()
        .config()
        .eos_token_ids
        .first()
        .copied()
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (r, e) in batch.iter().enumerate() {
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(pad, t - e.ids.len()));
        for p in 0..e.ids.len().saturating_sub(1) {
            if e.loss[p + 1] {
                rows.push((r * t + p) as u32);
                targets.push(e.ids[p + 1]);
            }
        }
    }
    if rows.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, device)?);
    }
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let mut cache = model.model().new_cache(vec![0; b]);
    let logits = model.model().forward_rows(&ids, &mut cache, &rows)?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let op = flywheel_models::autograd::ops::CrossEntropySumOp { targets };
        return Ok(logits.contiguous()?.apply_op1(op)?);
    }
    let n = targets.len();
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets, D::Minus1)?;
    Ok((lse - picked)?.sum_all()?)
}

/// Identifies a run: what must not change between a checkpoint and `--resume`.
fn fingerprint(r: &Recipe, data: &BTreeMap<String, String>, base: &str) -> String {
    let key = serde_json::json!({
        "model": r.model, "data": r.data, "lora": r.lora, "optimizer": r.optimizer,
        "schedule": r.schedule, "batch": r.batch, "data_sha": data, "base_sha": base,
    });
    format!("{:016x}", fnv1a(key.to_string().as_bytes()))
}
