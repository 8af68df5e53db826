//! BERT-family sentence encoders (all-MiniLM-L6-v2, BGE, …): candle-transformers' BERT for the
//! encoder, plus the pooling a sentence-transformers folder declares and L2 normalisation.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use std::path::PathBuf;

use crate::{Error, Result};

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the non-padding tokens.
    Mean,
    /// The first (`[CLS]`) token's vector.
    Cls,
}

/// A BERT encoder with pooling.
pub struct SentenceEncoder {
    model: BertModel,
    packed: Option<crate::bert_packed::PackedBert>,
    pooling: Pooling,
    hidden: usize,
}

impl SentenceEncoder {
    /// Loads from a config.json text and safetensors files.
    pub fn load(
        config_json: &str,
        config_file: &str,
        files: &[PathBuf],
        pooling: Pooling,
        device: &candle_core::Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg: BertConfig = serde_json::from_str(config_json).map_err(|e| {
            let msg = e.to_string();
            match msg.split('`').nth(1) {
                Some(field) => Error::Config {
                    file: config_file.to_string(),
                    field: field.to_string(),
                    reason: msg.clone(),
                },
                None => Error::BadFile {
                    file: config_file.to_string(),
                    reason: format!("not valid JSON: {msg}"),
                },
            }
        })?;
        for f in files {
            // SAFETY: read-only mapping of a model file flywheel does not modify.
            #[allow(unsafe_code)]
            unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
                Error::BadFile {
                    file: f.display().to_string(),
                    reason: format!("not a readable safetensors file ({e})"),
                }
            })?;
        }
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? };
        let model = BertModel::load(vb, &cfg).map_err(|e| Error::BadFile {
            file: files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            reason: format!("cannot build the BERT encoder: {e}"),
        })?;
        let packed = if crate::bert_packed::usable(device, dtype) {
            let cfg_json: serde_json::Value =
                serde_json::from_str(config_json).map_err(|e| Error::BadFile {
                    file: config_file.to_string(),
                    reason: e.to_string(),
                })?;
            // SAFETY: as above.
            #[allow(unsafe_code)]
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, DType::F32, device)? };
            Some(crate::bert_packed::PackedBert::load(vb, &cfg_json)?)
        } else {
            None
        };
        Ok(Self {
            model,
            packed,
            pooling,
            hidden: cfg.hidden_size,
        })
    }

    /// Width of the sentence vectors.
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// Whether [`Self::embed_packed`] runs the packed CPU encoder (no padding).
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Pooled, L2-normalised vectors of unpadded sequences `(ids, type ids)` through the packed
    /// CPU encoder; `None` when this encoder runs on another device or dtype (use `forward`).
    pub fn embed_packed(&self, seqs: &[(&[u32], &[u32])]) -> Option<Result<Vec<Vec<f32>>>> {
        let packed = self.packed.as_ref()?;
        let h = self.hidden;
        Some(packed.forward(seqs).map(|x| {
            let mut out = Vec::with_capacity(seqs.len());
            let mut o = 0;
            for (ids, _) in seqs {
                let t = ids.len();
                let mut v = vec![0f32; h];
                match self.pooling {
                    Pooling::Cls => v.copy_from_slice(&x[o * h..(o + 1) * h]),
                    Pooling::Mean => {
                        for r in 0..t {
                            for (a, b) in v.iter_mut().zip(&x[(o + r) * h..(o + r + 1) * h]) {
                                *a += b;
                            }
                        }
                        v.iter_mut().for_each(|a| *a /= t.max(1) as f32);
                    }
                }
                let n = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|a| *a /= n);
                out.push(v);
                o += t;
            }
            out
        }))
    }

    /// `ids`, `type_ids`, `mask`: `(b, t)` u32 (mask 1 for real tokens). Returns unit vectors `(b, hidden)` f32.
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self
            .model
            .forward(ids, type_ids, Some(mask))?
            .to_dtype(DType::F32)?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, t, 1)
                let sum = hidden.broadcast_mul(&m)?.sum(1)?; // (b, h)
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?; // (b, 1)
                sum.broadcast_div(&count)?
            }
        };
        let norm = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?)
    }
}
