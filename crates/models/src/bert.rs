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
        let cfg: BertConfig = serde_json::from_str(config_json).map_err(|e| Error::Config {
            file: config_file.to_string(),
            field: e
                .to_string()
                .split('`')
                .nth(1)
                .unwrap_or("(json)")
                .to_string(),
            reason: e.to_string(),
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
        Ok(Self {
            model,
            pooling,
            hidden: cfg.hidden_size,
        })
    }

    /// Width of the sentence vectors.
    pub fn dim(&self) -> usize {
        self.hidden
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
