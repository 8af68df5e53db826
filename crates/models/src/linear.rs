//! The one linear layer of flywheel: `y = x·Wᵀ + b` with `W` dense (f32/bf16/f16) or quantized
//! (any GGUF block type candle implements: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K…Q8_K).
//!
//! On the CPU, Q4_0 / Q4_1 / Q8_0 weights run through flywheel-kernels (llama.cpp's arithmetic,
//! so outputs agree with llama.cpp); other block types and devices use candle's kernels.
//!
//! Models hold projections as `Arc<dyn Projection>`, built by a [`LinearHook`] at load time, so an
//! adapter layer (LoRA) can wrap any projection without the model file knowing about it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

use crate::Result;

/// The stored weight of a [`Linear`].
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense `(out, in)` matrix in the compute dtype.
    Dense(Tensor),
    /// A quantized `(out, in)` matrix; stays quantized in memory.
    Quantized(Arc<QTensor>),
}

/// A linear layer whose weight is dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    qmatmul: Option<QMatMul>,
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// A dense layer from an `(out, in)` weight and an optional `(out,)` bias.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            qmatmul: None,
            bias,
            in_dim,
            out_dim,
        })
    }

    /// A quantized layer from an `(out, in)` quantized weight and an optional dense bias.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.shape().dims2()?;
        let qmatmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self {
            weight: LinearWeight::Quantized(weight),
            qmatmul: Some(qmatmul),
            bias,
            in_dim,
            out_dim,
        })
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The stored weight.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The GGUF block type when quantized, `None` when dense.
    pub fn quant_type(&self) -> Option<GgmlDType> {
        match &self.weight {
            LinearWeight::Quantized(q) => Some(q.dtype()),
            LinearWeight::Dense(_) => None,
        }
    }

    /// The weight as a dense `(out, in)` tensor of `dtype` (dequantizing if needed).
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(dtype)?,
            LinearWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
        })
    }

    /// `x·Wᵀ + b` for `x` of shape `(…, in)`; the result has `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, KernelChoice::Auto)
    }

    /// [`Linear::forward`] with an explicit kernel choice (tests compare the paths).
    pub fn forward_with(&self, x: &Tensor, choice: KernelChoice) -> Result<Tensor> {
        let y = match (&self.weight, &self.qmatmul) {
            (LinearWeight::Quantized(q), _)
                if choice != KernelChoice::Candle
                    && x.dtype() == DType::F32
                    && x.device().is_cpu()
                    && kernel_type(q.dtype()).is_some() =>
            {
                let ty = kernel_type(q.dtype()).expect("checked in the guard");
                let dims = x.dims();
                let m: usize = dims[..dims.len() - 1].iter().product();
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let data = q.data()?;
                let mut out = vec![0f32; m * self.out_dim];
                let path = if choice == KernelChoice::Scalar {
                    flywheel_kernels::Path::Scalar
                } else {
                    flywheel_kernels::Path::Auto
                };
                flywheel_kernels::matmul(
                    flywheel_kernels::QMatrix {
                        ty,
                        data: &data,
                        n: self.out_dim,
                        k: self.in_dim,
                    },
                    &xs,
                    m,
                    &mut out,
                    path,
                );
                let mut shape = dims.to_vec();
                *shape.last_mut().expect("rank >= 1") = self.out_dim;
                Tensor::from_vec(out, shape, x.device())?
            }
            (LinearWeight::Quantized(_), Some(qmm)) => {
                // Quantized kernels take f32 activations.
                if x.dtype() == DType::F32 {
                    qmm.forward(&x.contiguous()?)?
                } else {
                    qmm.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                        .to_dtype(x.dtype())?
                }
            }
            (LinearWeight::Dense(w), _) => {
                let dims = x.dims();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let x2 = x.reshape((rows, self.in_dim))?;
                let y = x2.matmul(&w.t()?)?;
                let mut out = dims.to_vec();
                *out.last_mut().expect("rank >= 1") = self.out_dim;
                y.reshape(out)?
            }
            (LinearWeight::Quantized(_), None) => {
                unreachable!("quantized Linear always has a QMatMul")
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// Which kernel a quantized [`Linear`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// flywheel-kernels where they cover the block type, else candle.
    Auto,
    /// flywheel-kernels' portable scalar path where it covers the block type.
    Scalar,
    /// Always candle's kernels (the reference oracle).
    Candle,
}

fn kernel_type(t: GgmlDType) -> Option<flywheel_kernels::BlockType> {
    match t {
        GgmlDType::Q4_0 => Some(flywheel_kernels::BlockType::Q4_0),
        GgmlDType::Q4_1 => Some(flywheel_kernels::BlockType::Q4_1),
        GgmlDType::Q8_0 => Some(flywheel_kernels::BlockType::Q8_0),
        _ => None,
    }
}

/// A layer that maps `(…, in)` to `(…, out)`: a plain [`Linear`], or a wrapper around one (LoRA).
pub trait Projection: Send + Sync + std::fmt::Debug {
    /// Applies the layer.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The base linear layer underneath any wrapper.
    fn base(&self) -> &Linear;
}

impl Projection for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
    fn base(&self) -> &Linear {
        self
    }
}

/// Decides, at load time, what wraps each projection of a model (identity by default).
pub trait LinearHook {
    /// Wraps the base layer loaded for the projection named `name` (Hugging Face naming,
    /// e.g. `model.layers.3.self_attn.q_proj`).
    fn wrap(&self, name: &str, base: Linear) -> Result<Arc<dyn Projection>>;
}

/// The identity hook: projections are plain [`Linear`] layers.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHook;

impl LinearHook for NoHook {
    fn wrap(&self, _name: &str, base: Linear) -> Result<Arc<dyn Projection>> {
        Ok(Arc::new(base))
    }
}

/// A token embedding table, dense or quantized.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// A dense `(vocab, hidden)` table.
    Dense(Tensor),
    /// A quantized `(vocab, hidden)` table; rows are dequantized on lookup.
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// Looks up `ids` of any shape; returns `ids.shape + (hidden,)` in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(1)?);
                w.index_select(&ids.flatten_all()?, 0)?
                    .reshape(dims)?
                    .to_dtype(dtype)?
            }
            Embedding::Quantized(q) => q.embedding(ids)?.to_dtype(dtype)?,
        })
    }

    /// The table as a linear layer `hidden → vocab` (tied output head).
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Embedding::Dense(w) => Linear::dense(w.clone(), None),
            Embedding::Quantized(q) => Linear::quantized(q.clone(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dense_matches_hand_computed_values() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // W = [[1,2],[3,4],[5,6]] (out=3, in=2), b = [1,0,-1], x = [[1,1]]
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
        let b = Tensor::new(&[1f32, 0., -1.], &dev)?;
        let lin = Linear::dense(w, Some(b))?;
        let x = Tensor::new(&[[[1f32, 1.]]], &dev)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[1, 1, 3]);
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![4., 7., 10.]);
        Ok(())
    }

    #[test]
    fn flywheel_kernels_agree_with_candle_on_ggml_blocks() -> anyhow::Result<()> {
        // Odd sizes: 3·37 rows, 44 outputs; k = 128 (candle panics on an odd block count for Q4_1).
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (44, 128), &dev)?;
        let x = (Tensor::randn(0f32, 1.0, (3, 37, 128), &dev)? * 4.0)?;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let l = Linear::quantized(Arc::new(QTensor::quantize(&w, dt)?), None)?;
            let ours = l.forward_with(&x, KernelChoice::Auto)?;
            let scalar = l.forward_with(&x, KernelChoice::Scalar)?;
            let candle = l.forward_with(&x, KernelChoice::Candle)?;
            let scale = candle.abs()?.max_all()?.to_scalar::<f32>()?;
            let d_sc = (&ours - &scalar)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let d_ca = (&ours - &candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d_sc <= 1e-4 * scale, "{dt:?}: simd vs scalar {d_sc}");
            // candle rounds the Q8_1 sum term twice in f16 and rounds ties away from zero; the
            // products still agree to well under a percent of the output scale.
            assert!(
                d_ca <= 5e-3 * scale,
                "{dt:?}: ours vs candle {d_ca} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn quantized_q8_0_is_close_to_dense() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev)?;
        let dense = Linear::dense(w.clone(), None)?.forward(&x)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        let ql = Linear::quantized(q, None)?;
        assert_eq!(ql.quant_type(), Some(GgmlDType::Q8_0));
        let quant = ql.forward(&x)?;
        // Weights and activations are both quantized to 8 bits: expect ~1% relative RMS error.
        let rms = |t: &Tensor| -> anyhow::Result<f32> {
            Ok(t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?)
        };
        let rel = rms(&(&dense - &quant)?)? / rms(&dense)?;
        assert!(rel < 0.02, "relative RMS error {rel}");
        // A wrong weight (rows shifted) is far off, so the bound above means something.
        let shifted = Linear::quantized(
            Arc::new(QTensor::quantize(&w.roll(1, 0)?, GgmlDType::Q8_0)?),
            None,
        )?;
        let far = rms(&(&dense - shifted.forward(&x)?)?)? / rms(&dense)?;
        assert!(far > 0.5, "shifted weights should differ: {far}");
        Ok(())
    }
}
