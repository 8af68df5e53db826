//! The decoder's configuration: the architectures flywheel implements, Hugging Face
//! `config.json` and GGUF metadata read into one resolved [`DecoderConfig`].

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;
use std::collections::HashMap;

use crate::layers::Llama3RopeScaling;
use crate::{Error, Result};

/// The decoder families flywheel implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, SmolLM2.
    Llama,
    /// Mistral (Llama layout; sliding-window attention is not applied).
    Mistral,
    /// Qwen2 / Qwen2.5 (bias on q/k/v).
    Qwen2,
}

impl Architecture {
    /// The names accepted in config.json `model_type` or GGUF `general.architecture`.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2";

    /// Parses a `model_type` / `general.architecture` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// RoPE scaling variants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x frequency-dependent scaling.
    Llama3(Llama3RopeScaling),
}

/// The resolved configuration a decoder is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// Architecture family.
    pub arch: Architecture,
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Bias on q/k/v projections.
    pub attention_bias: bool,
    /// Output head shares the embedding table.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as Hugging Face writes it (unknown keys are tolerated).
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    /// transformers 5 writes `rope_theta` and the scaling here instead.
    rope_parameters: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// `rope_scaling`, or transformers 5's `rope_parameters` (which also holds `rope_theta`).
#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// Token ids from a JSON value that is a number or an array of numbers (HF `eos_token_id`).
pub fn json_token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl DecoderConfig {
    /// Parses and validates a Hugging Face `config.json` (`file` is used in error messages).
    pub fn from_hf_json(json: &str, file: &str) -> Result<Self> {
        let cfg_err = |field: &str, reason: String| Error::Config {
            file: file.to_string(),
            field: field.to_string(),
            reason,
        };
        let raw: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::BadFile {
            file: file.to_string(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let arch_name = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| cfg_err("model_type", "missing".into()))?;
        let arch =
            Architecture::parse(&arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
                file: file.to_string(),
                arch: arch_name.clone(),
                supported: Architecture::SUPPORTED,
            })?;
        let hf: HfConfig = serde_json::from_value(raw).map_err(|e| {
            let msg = e.to_string();
            match msg.split('`').nth(1) {
                Some(field) => cfg_err(field, msg.clone()),
                None => Error::BadFile {
                    file: file.to_string(),
                    reason: msg,
                },
            }
        })?;
        let (scaling_key, scaling) = match (&hf.rope_scaling, &hf.rope_parameters) {
            (Some(s), _) => ("rope_scaling", Some(s)),
            (None, Some(p)) => ("rope_parameters", Some(p)),
            (None, None) => ("rope_scaling", None),
        };
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let kind = s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("");
                match kind {
                    "llama3" => Some(RopeScaling::Llama3(Llama3RopeScaling {
                        factor: s.factor.ok_or_else(|| {
                            cfg_err(&format!("{scaling_key}.factor"), "missing".into())
                        })?,
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .unwrap_or(8192),
                    })),
                    "default" | "" => None,
                    other => {
                        return Err(cfg_err(
                            &format!("{scaling_key}.rope_type"),
                            format!("`{other}` is not supported (supported: llama3)"),
                        ))
                    }
                }
            }
        };
        let cfg = Self {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf
                .rope_theta
                .or(hf.rope_parameters.as_ref().and_then(|p| p.rope_theta))
                .unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            attention_bias: hf.attention_bias.unwrap_or(arch == Architecture::Qwen2),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: json_token_ids(hf.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: json_token_ids(hf.eos_token_id.as_ref()),
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Reads the config from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(md: &HashMap<String, Value>, file: &str) -> Result<Self> {
        let cfg_err = |field: &str, reason: String| Error::Config {
            file: file.to_string(),
            field: field.to_string(),
            reason,
        };
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| cfg_err("general.architecture", "missing".into()))?;
        let arch =
            Architecture::parse(&arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
                file: file.to_string(),
                arch: arch_name.clone(),
                supported: Architecture::SUPPORTED,
            })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let get_u = |k: &str| -> Result<usize> {
            let full = key(k);
            md.get(&full)
                .ok_or_else(|| cfg_err(&full, "missing".into()))?
                .to_u64()
                .or_else(|_| md[&full].to_u32().map(u64::from))
                .map(|v| v as usize)
                .map_err(|e| cfg_err(&full, e.to_string()))
        };
        let get_f = |k: &str| -> Option<f64> {
            md.get(&key(k)).and_then(|v| v.to_f32().ok()).map(f64::from)
        };
        let hidden = get_u("embedding_length")?;
        let heads = get_u("attention.head_count")?;
        let vocab = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => get_u("vocab_size")?,
        };
        let head_dim = get_u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let u32_of = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let cfg = Self {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: get_u("feed_forward_length")?,
            num_layers: get_u("block_count")?,
            num_heads: heads,
            num_kv_heads: get_u("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling: None, // llama3 scaling arrives as the `rope_freqs` tensor in GGUF
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            attention_bias: arch == Architecture::Qwen2,
            tie_word_embeddings: false, // decided by the presence of `output.weight`
            bos_token_id: u32_of("tokenizer.ggml.bos_token_id"),
            eos_token_ids: u32_of("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// The config as a Hugging Face `config.json` (the keys [`DecoderConfig::from_hf_json`] reads).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let eos = if self.eos_token_ids.len() == 1 {
            serde_json::json!(self.eos_token_ids[0])
        } else {
            serde_json::json!(self.eos_token_ids)
        };
        let mut v = serde_json::json!({
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        });
        if self.arch == Architecture::Llama {
            v["attention_bias"] = serde_json::json!(self.attention_bias);
            v["mlp_bias"] = serde_json::json!(false);
        }
        if let Some(RopeScaling::Llama3(s)) = self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        v
    }

    /// Checks the dimensions are consistent; names the first bad field.
    pub fn validate(&self, file: &str) -> Result<()> {
        let err = |field: &str, reason: &str| {
            Err(Error::Config {
                file: file.to_string(),
                field: field.to_string(),
                reason: reason.to_string(),
            })
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return err(name, "must be > 0");
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return err("num_key_value_heads", "must divide num_attention_heads");
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return err("head_dim", "must be even and > 0");
        }
        Ok(())
    }

    /// Number of parameters implied by the config.
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = h * self.num_heads * self.head_dim;
        let kv = 2 * h * self.num_kv_heads * self.head_dim;
        let bias = if self.attention_bias {
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        } else {
            0
        };
        let layer = 2 * q + kv + bias + 3 * h * i + 2 * h;
        v * h + self.num_layers * layer + h + if self.tie_word_embeddings { 0 } else { v * h }
    }
}
