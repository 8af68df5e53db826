//! Sentence embeddings: a BERT-family folder (config.json, safetensors, tokenizer.json, and the
//! sentence-transformers side files `1_Pooling/config.json`, `sentence_bert_config.json`),
//! padded batches, the declared pooling, L2-normalised vectors.

use candle_core::Tensor;
use flywheel_models::bert::{Pooling, SentenceEncoder};
use std::path::Path;

use crate::load::{
    read_json_opt, read_text, safetensors_files, LoadOptions, ModelFormat, ModelInfo,
};
use crate::{Error, Result};

/// Tokens per packed CPU batch (large enough for efficient GEMMs, small enough for the cache).
const PACKED_TOKENS: usize = 2048;

/// A loaded sentence encoder.
pub struct EmbeddingModel {
    encoder: SentenceEncoder,
    tokenizer: tokenizers::Tokenizer,
    /// The same tokenizer without truncation, for [`EmbeddingModel::token_offsets`] (cloning
    /// the vocabulary on every call cost an index run 10% of its time).
    untruncated: tokenizers::Tokenizer,
    max_len: usize,
    device: candle_core::Device,
    info: ModelInfo,
}

impl EmbeddingModel {
    /// Loads a BERT-family folder (or hub id).
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = match ModelFormat::resolve(spec)? {
            ModelFormat::HfFolder(d) => d,
            ModelFormat::Gguf(p) => {
                return Err(Error::NotAModel {
                    path: p.display().to_string(),
                    reason: "embedding models load from a Hugging Face folder (config.json + safetensors), not GGUF".into(),
                })
            }
        };
        Self::load_dir(&dir, opts)
    }

    fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = read_text(&config_path)?;
        let cfg_json: serde_json::Value =
            serde_json::from_str(&config).map_err(|e| Error::BadJson {
                file: config_path.display().to_string(),
                reason: e.to_string(),
            })?;
        let model_type = cfg_json
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if !matches!(model_type, "bert" | "roberta" | "xlm-roberta") {
            return Err(Error::Model(
                flywheel_models::Error::UnsupportedArchitecture {
                    file: config_path.display().to_string(),
                    arch: model_type.to_string(),
                    supported: "bert (all-MiniLM, BGE, e5…)",
                },
            ));
        }
        let pooling_cfg = read_json_opt(&dir.join("1_Pooling/config.json"))?;
        let pooling = match pooling_cfg {
            Some(p) if p.get("pooling_mode_cls_token").and_then(|v| v.as_bool()) == Some(true) => {
                Pooling::Cls
            }
            _ => Pooling::Mean,
        };
        let st_cfg = read_json_opt(&dir.join("sentence_bert_config.json"))?;
        let max_pos = cfg_json
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .unwrap_or(512) as usize;
        let max_len = st_cfg
            .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
            .map(|v| v as usize)
            .unwrap_or(max_pos)
            .min(max_pos);
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer {
                file: tok_path.display().to_string(),
                reason: e.to_string(),
            })?;
        let mut untruncated = tokenizer.clone();
        untruncated.with_padding(None);
        untruncated
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                file: tok_path.display().to_string(),
                reason: e.to_string(),
            })?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer {
                file: tok_path.display().to_string(),
                reason: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        let files = safetensors_files(dir)?;
        let dtype = opts.resolved_dtype();
        let encoder = SentenceEncoder::load(
            &config,
            &config_path.display().to_string(),
            &files,
            pooling,
            &opts.device,
            dtype,
        )?;
        let params = flywheel_models::SafetensorsWeights::open(&files, &opts.device, dtype)?;
        let info = ModelInfo {
            path: dir.display().to_string(),
            format: "hf-folder".into(),
            architecture: format!(
                "{model_type} encoder ({pooling:?} pooling, max {max_len} tokens)"
            )
            .to_lowercase(),
            parameters: params.parameter_count(),
            tensor_types: params.dtypes(),
            hidden_size: encoder.dim(),
            layers: cfg_json
                .get("num_hidden_layers")
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as usize,
            heads: {
                let h = cfg_json
                    .get("num_attention_heads")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0) as usize;
                (h, h)
            },
            vocab_size: tokenizer.get_vocab_size(true),
            tokenizer: "tokenizer.json".into(),
            ..Default::default()
        };
        Ok(Self {
            encoder,
            tokenizer,
            untruncated,
            max_len,
            device: opts.device.clone(),
            info,
        })
    }

    /// What the model is.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The longest input in tokens (longer inputs are truncated).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokens the model reads for `text` (special tokens included, truncation applied).
    pub fn token_count(&self, text: &str) -> Result<usize> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer {
                file: "(encode)".into(),
                reason: e.to_string(),
            })?;
        Ok(enc.len())
    }

    /// Byte spans of the tokens of `text` (no special tokens, no truncation): what a chunker
    /// counts when it cuts text to the model's window.
    pub fn token_offsets(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let enc = self
            .untruncated
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                file: "(encode)".into(),
                reason: e.to_string(),
            })?;
        Ok(enc.get_offsets().to_vec())
    }

    fn encode_all(&self, texts: &[&str]) -> Result<Vec<tokenizers::Encoding>> {
        self.tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Tokenizer {
                file: "(encode)".into(),
                reason: e.to_string(),
            })
    }

    /// Embeds one batch (packed without padding on the CPU, padded elsewhere).
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let enc = self.encode_all(texts)?;
        let seqs: Vec<(&[u32], &[u32])> = enc
            .iter()
            .map(|e| (e.get_ids(), e.get_type_ids()))
            .collect();
        if let Some(r) = self.encoder.embed_packed(&seqs) {
            return Ok(r?);
        }
        self.padded(&enc)
    }

    /// Embeds one batch through candle's padded encoder, whatever the device (the packed CPU
    /// encoder is checked against it).
    pub fn embed_padded(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let enc = self.encode_all(texts)?;
        self.padded(&enc)
    }

    fn padded(&self, enc: &[tokenizers::Encoding]) -> Result<Vec<Vec<f32>>> {
        let t = enc.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let b = enc.len();
        let (mut ids, mut types, mut mask) =
            (vec![0u32; b * t], vec![0u32; b * t], vec![0u32; b * t]);
        for (i, e) in enc.iter().enumerate() {
            for (j, ((&id, &ty), &m)) in e
                .get_ids()
                .iter()
                .zip(e.get_type_ids())
                .zip(e.get_attention_mask())
                .enumerate()
            {
                ids[i * t + j] = id;
                types[i * t + j] = ty;
                mask[i * t + j] = m;
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let types = Tensor::from_vec(types, (b, t), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
        let out =
            flywheel_models::on_pool(&self.device, || self.encoder.forward(&ids, &types, &mask))?;
        Ok(out.to_vec2::<f32>()?)
    }

    /// Embeds any number of texts in batches of `batch_size`, grouping similar lengths to cut padding;
    /// vectors come back in input order.
    pub fn embed_all(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        if self.encoder.is_packed() {
            // No padding: group texts by total tokens so every GEMM is large.
            let enc = self.encode_all(texts)?;
            let mut out = Vec::with_capacity(texts.len());
            let mut start = 0;
            while start < enc.len() {
                let mut end = start;
                let mut tokens = 0;
                while end < enc.len() && (end == start || tokens + enc[end].len() <= PACKED_TOKENS)
                {
                    tokens += enc[end].len();
                    end += 1;
                }
                let seqs: Vec<(&[u32], &[u32])> = enc[start..end]
                    .iter()
                    .map(|e| (e.get_ids(), e.get_type_ids()))
                    .collect();
                // On a pool thread: one thread switch per batch, not per parallel section.
                let packed = flywheel_models::on_pool(&self.device, || {
                    self.encoder.embed_packed(&seqs).expect("packed encoder")
                });
                out.extend(packed?);
                start = end;
            }
            return Ok(out);
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            for (&i, v) in chunk.iter().zip(self.embed_batch(&batch)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}
