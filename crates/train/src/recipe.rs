//! The training recipe: a TOML file with `model`, `data`, `lora`, `optimizer`, `schedule`,
//! `batch`, `eval`, `checkpoint` and `output` sections. Every field has a default (documented in
//! `recipes/README.md`); unknown keys are rejected with the key's name and line; values are
//! validated with the offending `section.key` in the message. Relative paths resolve against
//! the directory the command runs in.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::data::Overlong;
use crate::{Error, Result};
use flywheel_peft::LoraConfig;

/// A whole recipe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// The base model.
    pub model: ModelSection,
    /// Training and validation data.
    pub data: DataSection,
    /// The adapter's shape.
    pub lora: LoraConfig,
    /// AdamW settings.
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule.
    pub schedule: ScheduleSection,
    /// Batch size, accumulation, length of training.
    pub batch: BatchSection,
    /// Evaluation cadence.
    pub eval: EvalSection,
    /// Checkpoint cadence and retention.
    pub checkpoint: CheckpointSection,
    /// Where results go.
    pub output: OutputSection,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// GGUF file, Hugging Face folder or hub id.
    pub path: String,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    pub dtype: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training JSONL file.
    pub train: PathBuf,
    /// Validation JSONL file (optional).
    pub valid: Option<PathBuf>,
    /// Fraction of the training examples held out for validation when `valid` is not given.
    pub valid_split: f64,
    /// Render prompt/completion and alpaca records with the model's chat template.
    pub chat: bool,
    /// System prompt for prompt/completion and alpaca records rendered as chat.
    pub system: Option<String>,
    /// Compute loss on prompt tokens too.
    pub train_on_inputs: bool,
    /// Longest training sequence in tokens.
    pub max_seq_len: usize,
    /// `drop` or `truncate` longer examples.
    pub overlong: Overlong,
    /// Concatenate short examples into sequences of up to `max_seq_len` tokens.
    pub packing: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            valid: None,
            valid_split: 0.0,
            chat: true,
            system: None,
            train_on_inputs: false,
            max_seq_len: 1024,
            overlong: Overlong::Drop,
            packing: false,
        }
    }
}

/// `[optimizer]` (AdamW on the adapter parameters only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// Peak learning rate.
    pub lr: f64,
    /// `(beta1, beta2)`.
    pub betas: [f64; 2],
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub max_grad_norm: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

/// Shape of the learning-rate curve after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Half-cosine from the peak to `min_lr_ratio · lr`.
    #[default]
    Cosine,
    /// Straight line from the peak to `min_lr_ratio · lr`.
    Linear,
    /// The peak, held.
    Constant,
}

/// `[schedule]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// `cosine`, `linear` or `constant`.
    pub kind: ScheduleKind,
    /// Linear warmup steps from 0 to the peak.
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
        }
    }
}

/// `[batch]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSection {
    /// Sequences per forward pass.
    pub size: usize,
    /// Forward passes per optimizer step.
    pub grad_accum: usize,
    /// Passes over the training data (used when `max_steps` is 0).
    pub epochs: f64,
    /// Optimizer steps in total (0: from `epochs`).
    pub max_steps: usize,
    /// Seed for initialisation, shuffling and dropout.
    pub seed: u64,
    /// Recompute each block in the backward pass instead of keeping its activations: much less
    /// memory for about one extra forward pass (CPU, f32).
    pub gradient_checkpointing: bool,
}

impl Default for BatchSection {
    fn default() -> Self {
        Self {
            size: 4,
            grad_accum: 1,
            epochs: 1.0,
            max_steps: 0,
            seed: 42,
            gradient_checkpointing: false,
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate validation loss every N steps (0: only at the end).
    pub every: usize,
    /// Sequences per evaluation forward pass.
    pub batch_size: usize,
    /// Evaluate on at most this many validation examples (0: all).
    pub max_examples: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 50,
            batch_size: 8,
            max_examples: 0,
        }
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save a checkpoint every N steps (0: only at the end and on Ctrl-C).
    pub every: usize,
    /// Checkpoints kept (older ones are deleted).
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 100,
            keep: 2,
        }
    }
}

/// `[output]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// The run folder: `adapter/`, `checkpoints/`, `metrics.jsonl`, `loss.svg`, `recipe.toml`.
    pub dir: PathBuf,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/lora"),
        }
    }
}

impl Recipe {
    /// Parses and validates a recipe file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates recipe text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let r: Recipe = toml::from_str(text).map_err(|e| Error::Recipe {
            path: origin.to_string(),
            reason: e.to_string().trim_end().to_string(),
        })?;
        r.validate().map_err(|e| match e {
            Error::Config { field, reason } => Error::Recipe {
                path: origin.to_string(),
                reason: format!("`{field}`: {reason}"),
            },
            other => other,
        })?;
        Ok(r)
    }

    /// Checks every value; the error names `section.key`.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| {
            Err(Error::Config {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.model.path.trim().is_empty() {
            return bad("model.path", "is required");
        }
        if !matches!(self.model.dtype.as_str(), "f32" | "bf16" | "f16") {
            return bad("model.dtype", "must be f32, bf16 or f16");
        }
        if self.data.train.as_os_str().is_empty() {
            return bad("data.train", "is required");
        }
        if !(0.0..0.9).contains(&self.data.valid_split) {
            return bad("data.valid_split", "must be in [0, 0.9)");
        }
        if self.data.valid.is_some() && self.data.valid_split > 0.0 {
            return bad(
                "data.valid_split",
                "give either data.valid or data.valid_split, not both",
            );
        }
        if self.data.max_seq_len < 8 {
            return bad("data.max_seq_len", "must be at least 8");
        }
        self.lora.validate("lora")?;
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optimizer.lr", "must be > 0");
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad("optimizer.betas", "each must be in [0, 1)");
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return bad("optimizer.eps", "must be > 0");
        }
        if o.weight_decay < 0.0 {
            return bad("optimizer.weight_decay", "must be >= 0");
        }
        if o.max_grad_norm < 0.0 {
            return bad(
                "optimizer.max_grad_norm",
                "must be >= 0 (0 disables clipping)",
            );
        }
        if !(0.0..1.0).contains(&self.schedule.warmup_ratio) {
            return bad("schedule.warmup_ratio", "must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.schedule.min_lr_ratio) {
            return bad("schedule.min_lr_ratio", "must be in [0, 1]");
        }
        if self.batch.size == 0 {
            return bad("batch.size", "must be at least 1");
        }
        if self.batch.grad_accum == 0 {
            return bad("batch.grad_accum", "must be at least 1");
        }
        if self.batch.max_steps == 0 && (self.batch.epochs.is_nan() || self.batch.epochs <= 0.0) {
            return bad("batch.epochs", "must be > 0 when batch.max_steps is 0");
        }
        if self.eval.batch_size == 0 {
            return bad("eval.batch_size", "must be at least 1");
        }
        if self.checkpoint.keep == 0 {
            return bad("checkpoint.keep", "must be at least 1");
        }
        if self.output.dir.as_os_str().is_empty() {
            return bad("output.dir", "is required");
        }
        Ok(())
    }

    /// The recipe as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\npath = \"m.gguf\"\n[data]\ntrain = \"t.jsonl\"\n";

    #[test]
    fn defaults_fill_a_minimal_recipe() {
        let r = Recipe::parse(MINIMAL, "r.toml").unwrap();
        assert_eq!(r.lora.r, 8);
        assert_eq!(r.optimizer.lr, 2e-4);
        assert_eq!(r.batch.size, 4);
        assert!(r.data.chat);
        // Round-trips through TOML.
        assert_eq!(Recipe::parse(&r.to_toml(), "again").unwrap(), r);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Recipe::parse(&format!("{MINIMAL}[lora]\nrank = 4\n"), "r.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml") && e.contains("rank"), "{e}");
        let e = Recipe::parse(&format!("{MINIMAL}[optimiser]\nlr = 1\n"), "r.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("optimiser"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (extra, field) in [
            ("[optimizer]\nlr = -1.0\n", "optimizer.lr"),
            ("[lora]\nr = 0\n", "lora.r"),
            (
                "[lora]\ntarget_modules = [\"qkv\"]\n",
                "lora.target_modules",
            ),
            ("[batch]\nsize = 0\n", "batch.size"),
            ("[schedule]\nkind = \"step\"\n", "kind"),
        ] {
            let e = Recipe::parse(&format!("{MINIMAL}{extra}"), "r.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
    }
}
