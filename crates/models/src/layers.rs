//! Layers shared by every decoder architecture: RMSNorm, rotary embeddings, grouped-query
//! attention over a KV cache, and the gated MLP. Written once; architectures only wire them.

use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

use crate::linear::Projection;
use crate::weights::Weights;
use crate::Result;

mod attention;
mod cache;
pub use attention::Attention;
pub use cache::LayerCache;
pub(crate) use cache::{attend_row, with_cpu_f32, HostKv, HostLayer};

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) · w`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
}

impl RmsNorm {
    /// Loads `name.weight` of shape `(dim,)`.
    pub fn load(w: &dyn Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(&format!("{name}.weight"), &[dim])?,
            eps,
        })
    }

    /// Normalises over the last dimension. A fused kernel at inference; differentiable ops when
    /// the input carries a gradient (training).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::autograd::ops::training(x) && crate::autograd::ops::applicable(x) {
            let op = crate::autograd::ops::RmsNormOp {
                weight: crate::autograd::ops::to_host(&self.weight)?,
                eps: self.eps as f32,
            };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        if x.track_op() {
            let dtype = x.dtype();
            let xf = x.to_dtype(DType::F32)?;
            let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = xf
                .broadcast_div(&(ms + self.eps)?.sqrt()?)?
                .to_dtype(dtype)?;
            return Ok(normed.broadcast_mul(&self.weight.to_dtype(dtype)?)?);
        }
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps as f32,
        )?)
    }
}

/// Llama 3's frequency-dependent RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall scaling factor.
    pub factor: f64,
    /// Wavelengths longer than `original_max / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original_max / high_freq_factor` are left alone.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// Precomputed rotary embedding tables (`cos`, `sin` of shape `(max_pos, head_dim/2)`),
/// applied in the half-split ("rotate_half") layout of Hugging Face checkpoints.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Builds tables for `max_pos` positions. `freq_divisors` (one per frequency) divides the
    /// inverse frequencies, as GGUF's `rope_freqs` tensor does.
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_pos: usize,
        llama3: Option<Llama3RopeScaling>,
        freq_divisors: Option<&[f32]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        if let Some(s) = llama3 {
            let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen < high_wavelen {
                    // high frequency: unchanged
                } else if wavelen > low_wavelen {
                    *f /= s.factor;
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        if let Some(div) = freq_divisors {
            for (f, d) in inv_freq.iter_mut().zip(div) {
                *f /= *d as f64;
            }
        }
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_pos, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_pos, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` of shape `(b, heads, t, head_dim)`; `positions` is `(b, t)` u32.
    pub fn apply(&self, x: &Tensor, positions: &PositionTables) -> Result<Tensor> {
        let (cos, sin) = match positions {
            PositionTables::Shared(start, len) => (
                self.cos.narrow(0, *start, *len)?,
                self.sin.narrow(0, *start, *len)?,
            ),
            PositionTables::PerRow(pos) => {
                let (b, t) = pos.dims2()?;
                let flat = pos.flatten_all()?;
                (
                    self.cos.index_select(&flat, 0)?.reshape((b, t, ()))?,
                    self.sin.index_select(&flat, 0)?.reshape((b, t, ()))?,
                )
            }
        };
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        if crate::autograd::ops::training(x) && crate::autograd::ops::applicable(x) {
            let op = crate::autograd::ops::RopeOp {
                cos: crate::autograd::ops::to_host(&cos)?,
                sin: crate::autograd::ops::to_host(&sin)?,
                per_row: cos.rank() == 3,
            };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        if x.track_op() {
            return rope_differentiable(x, &cos, &sin);
        }
        Ok(candle_nn::rotary_emb::rope(
            &x.contiguous()?,
            &cos.contiguous()?,
            &sin.contiguous()?,
        )?)
    }

    /// Rotates `heads` vectors of `head_dim` in place at position `pos` (host f32 tables only;
    /// `false` when the tables live elsewhere or `pos` is out of range).
    pub(crate) fn rotate_host(&self, x: &mut [f32], head_dim: usize, pos: usize) -> bool {
        let half = head_dim / 2;
        if pos >= self.max_positions() {
            return false;
        }
        with_cpu_f32(&self.cos, |cos| {
            with_cpu_f32(&self.sin, |sin| {
                let (c, s) = (
                    &cos[pos * half..(pos + 1) * half],
                    &sin[pos * half..(pos + 1) * half],
                );
                for v in x.chunks_exact_mut(head_dim) {
                    let (a, b) = v.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * c[i] - x2 * s[i];
                        b[i] = x2 * c[i] + x1 * s[i];
                    }
                }
            })
        })
        .flatten()
        .is_some()
    }

    /// The longest position the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }
}

/// Rotate-half RoPE from differentiable ops; `cos`/`sin` are `(t, d/2)` or `(b, t, d/2)`.
fn rope_differentiable(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    // (t, d) -> (1, 1, t, d); (b, t, d) -> (b, 1, t, d)
    let (cos, sin) = if cos.rank() == 2 {
        (
            cos.unsqueeze(0)?.unsqueeze(0)?,
            sin.unsqueeze(0)?.unsqueeze(0)?,
        )
    } else {
        (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
    };
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// Which rotary positions a forward pass uses.
#[derive(Debug, Clone)]
pub enum PositionTables {
    /// Every row uses positions `start .. start + len`.
    Shared(usize, usize),
    /// Row-specific positions, `(b, t)` u32 (left-padded batches).
    PerRow(Tensor),
}

/// The gated (SwiGLU) feed-forward block: `down(silu(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate: Arc<dyn Projection>,
    pub(crate) up: Arc<dyn Projection>,
    pub(crate) down: Arc<dyn Projection>,
}

impl Mlp {
    /// Builds the block from its projections.
    pub fn new(
        gate: Arc<dyn Projection>,
        up: Arc<dyn Projection>,
        down: Arc<dyn Projection>,
    ) -> Self {
        Self { gate, up, down }
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = crate::linear::forward_many(&[&self.gate, &self.up], x)?;
        let act = if crate::autograd::ops::applicable(&gu[0]) && gu[0].dtype() == gu[1].dtype() {
            let op = crate::autograd::ops::SwiGluOp {
                fast_exp: crate::autograd::ops::training(&gu[0]),
            };
            gu[0].contiguous()?.apply_op2(&gu[1].contiguous()?, op)?
        } else {
            (candle_nn::ops::silu(&gu[0])? * &gu[1])?
        };
        self.down.forward(&act)
    }
}

/// Puts the last dimension's maximum first: argmax helper for greedy tests.
pub fn argmax_last(x: &Tensor) -> Result<Vec<u32>> {
    Ok(x.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_leaves_high_frequencies_and_scales_low_ones() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = Rope::new(64, 500000.0, 4, None, None, DType::F32, &dev)?;
        let scaled = Rope::new(64, 500000.0, 4, Some(s), None, DType::F32, &dev)?;
        // Position 1: the angle equals the inverse frequency.
        let a = plain.sin.get(1)?.to_vec1::<f32>()?;
        let b = scaled.sin.get(1)?.to_vec1::<f32>()?;
        assert!(
            (a[0] - b[0]).abs() < 1e-7,
            "highest frequency must be unchanged"
        );
        let last = a.len() - 1;
        let ratio = (b[last] as f64).asin() / (a[last] as f64).asin();
        assert!(
            (ratio - 1.0 / 8.0).abs() < 1e-3,
            "lowest frequency scaled by 1/8, got {ratio}"
        );
        Ok(())
    }
}
