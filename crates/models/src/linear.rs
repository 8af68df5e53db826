//! The one linear layer of flywheel: `y = x·Wᵀ + b` with `W` dense (f32/bf16/f16) or quantized
//! (any GGUF block type candle implements: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K…Q8_K).
//!
//! On the CPU, Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K weights run through
//! flywheel-kernels (llama.cpp's arithmetic, so outputs agree with llama.cpp); other block types
//! and devices use candle's kernels.
//!
//! Models hold projections as `Arc<dyn Projection>`, built by a [`LinearHook`] at load time, so an
//! adapter layer (LoRA) can wrap any projection without the model file knowing about it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use flywheel_kernels::Layout;
use std::borrow::Cow;
use std::sync::Arc;

use crate::autograd::frozen::{FrozenTrainOp, FrozenWeight};
use crate::qmatmul::{kernel_matrix, kernel_type};
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
    pub(crate) weight: LinearWeight,
    qmatmul: Option<QMatMul>,
    pub(crate) bias: Option<Tensor>,
    pub(crate) in_dim: usize,
    pub(crate) out_dim: usize,
    /// How a quantized weight's blocks are laid out (ggml's, or repacked at load).
    pub(crate) layout: Layout,
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
            layout: Layout::Ggml,
        })
    }

    /// A quantized layer from an `(out, in)` quantized weight (ggml's layout) and an optional
    /// dense bias. When this holds the only reference to the weight and the CPU's decode
    /// kernels read repacked rows faster ([`crate::packed::preferred_layout`]), the weight is
    /// repacked and the original dropped; the results are the same bits either way.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let layout = if Arc::strong_count(&weight) == 1 {
            crate::packed::preferred_layout(&weight)
        } else {
            Layout::Ggml
        };
        Self::quantized_in(weight, bias, layout)
    }

    /// [`Linear::quantized`] with the weight kept in `layout` (repacked here for
    /// [`Layout::Rows4`]), whatever the CPU prefers. Errors if the type has no such layout.
    pub fn quantized_in(
        weight: Arc<QTensor>,
        bias: Option<Tensor>,
        layout: Layout,
    ) -> Result<Self> {
        let weight = match layout {
            Layout::Ggml => weight,
            Layout::Rows4 => Arc::new(crate::packed::repack(&weight)?),
        };
        Self::quantized_as(weight, bias, layout)
    }

    /// A quantized layer from a weight whose blocks are already in `layout`.
    pub(crate) fn quantized_as(
        weight: Arc<QTensor>,
        bias: Option<Tensor>,
        layout: Layout,
    ) -> Result<Self> {
        let (out_dim, in_dim) = weight.shape().dims2()?;
        let qmatmul = QMatMul::from_arc(weight.clone())?;
        Ok(Self {
            weight: LinearWeight::Quantized(weight),
            qmatmul: Some(qmatmul),
            bias,
            in_dim,
            out_dim,
            layout,
        })
    }

    /// How the quantized weight's blocks are laid out (ggml's for a dense layer).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The quantized weight as flywheel-kernels reads it: its type, blocks and layout. `None`
    /// for a dense weight, a type the kernels do not cover, or blocks not in host memory.
    pub(crate) fn kernel_matrix(&self) -> Option<flywheel_kernels::QMatrix<'_>> {
        let LinearWeight::Quantized(q) = &self.weight else {
            return None;
        };
        let Ok(Cow::Borrowed(data)) = q.data() else {
            return None;
        };
        kernel_matrix(q, data, self.layout)
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

    /// The weight as the low-rank training op sees it: quantized, or dense and not trainable.
    pub(crate) fn frozen_weight(&self) -> Option<FrozenWeight> {
        match &self.weight {
            LinearWeight::Quantized(q) => Some(FrozenWeight::Quantized(q.clone(), self.layout)),
            LinearWeight::Dense(w) if !w.track_op() => Some(FrozenWeight::Dense(w.clone())),
            LinearWeight::Dense(_) => None,
        }
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
        let choice = if reference_kernels() {
            KernelChoice::Candle
        } else {
            KernelChoice::Auto
        };
        self.forward_with(x, choice)
    }

    /// [`Linear::forward`] with an explicit kernel choice (tests compare the paths).
    pub fn forward_with(&self, x: &Tensor, choice: KernelChoice) -> Result<Tensor> {
        let y = match (&self.weight, &self.qmatmul) {
            // Prefill with K-quant weights on a CPU with AVX-512 VNNI: the integer GEMM, which
            // beats dequantizing to f32 there (BENCHMARKS.md); bit for bit the scalar kernels.
            (LinearWeight::Quantized(q), _)
                if choice == KernelChoice::Auto
                    && x.device().is_cpu()
                    && x.dtype() == DType::F32
                    && !crate::autograd::ops::training(x)
                    && positions_of(x) >= GEMM_MIN_ROWS
                    && self.layout == Layout::Ggml
                    && kernel_type(q.dtype()).is_some_and(flywheel_kernels::has_gemm_k)
                    && gemm_k_enabled()
                    && self.kernel_matrix().is_some() =>
            {
                let w = self.kernel_matrix().expect("checked by the guard");
                let dims = x.dims();
                let m: usize = dims[..dims.len() - 1].iter().product();
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; m * w.n];
                flywheel_kernels::gemm_k(w, &xs, m, &mut out);
                let mut shape = dims.to_vec();
                *shape.last_mut().expect("rank >= 1") = w.n;
                Tensor::from_vec(out, shape, x.device())?
            }
            // Training (the input carries a gradient), and prefill (many positions per
            // sequence): weights are dequantized a slab of rows at a time and multiplied with
            // the f32 GEMM, so the model never exists dense in memory. In prefill the slab's
            // dequantization is shared by enough rows to beat any per-row integer dot product;
            // in training the same op also gives the input's gradient.
            (LinearWeight::Quantized(q), _)
                if x.device().is_cpu()
                    && (crate::autograd::ops::training(x)
                        || (choice == KernelChoice::Auto
                            && x.dtype() == DType::F32
                            && positions_of(x) >= GEMM_MIN_ROWS)) =>
            {
                let xf = x.to_dtype(DType::F32)?.contiguous()?;
                xf.apply_op1(FrozenTrainOp {
                    weight: FrozenWeight::Quantized(q.clone(), self.layout),
                })?
                .to_dtype(x.dtype())?
            }
            // Training on a GPU: candle's quantized matmul has no backward pass, so the weight
            // is dequantized for this product (a constant of the graph: only `dx` flows back).
            (LinearWeight::Quantized(q), _)
                if !x.device().is_cpu() && x.track_op() && crate::autograd::ops::training(x) =>
            {
                matmul_t(x, &q.dequantize(x.device())?.to_dtype(x.dtype())?)?
            }
            // The integer kernels. A repacked weight takes them for any input dtype: candle's
            // path would unpack it on every call.
            (LinearWeight::Quantized(_), _)
                if choice != KernelChoice::Candle
                    && (x.dtype() == DType::F32 || self.layout != Layout::Ggml)
                    && x.device().is_cpu()
                    && self.kernel_matrix().is_some() =>
            {
                let path = if choice == KernelChoice::Scalar {
                    flywheel_kernels::Path::Scalar
                } else {
                    flywheel_kernels::Path::Auto
                };
                let xf = x.to_dtype(DType::F32)?;
                kernel_products(&[self], &xf, path)?
                    .pop()
                    .expect("one product")
                    .to_dtype(x.dtype())?
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
            // Training on a dense base: the weight is frozen, so only `dx` is computed in the
            // backward pass (candle's matmul would also build a full weight gradient).
            (LinearWeight::Dense(w), _)
                if crate::autograd::ops::training(x) && !w.track_op() && x.device().is_cpu() =>
            {
                let xc = x.contiguous()?;
                xc.apply_op1(FrozenTrainOp {
                    weight: FrozenWeight::Dense(w.clone()),
                })?
            }
            (LinearWeight::Dense(w), _) => matmul_t(x, w)?,
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

/// `x·Wᵀ` for `x` of shape `(…, in)` and a dense `(out, in)` `w`, through candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inp = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let (out, _) = w.dims2()?;
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = out;
    Ok(y.reshape(shape)?)
}

thread_local! {
    static REFERENCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PINNED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` with model work pinned to this thread: [`crate::on_pool`] inside `f` runs in place,
/// so the thread-local settings the caller made (kernel choice, LoRA routing) stay in effect.
pub fn pinned<R>(f: impl FnOnce() -> R) -> R {
    struct Unpin;
    impl Drop for Unpin {
        fn drop(&mut self) {
            PINNED.with(|p| p.set(p.get() - 1));
        }
    }
    PINNED.with(|p| p.set(p.get() + 1));
    let _unpin = Unpin;
    f()
}

/// Whether this thread is inside [`pinned`] or [`with_reference_kernels`].
pub(crate) fn is_pinned() -> bool {
    PINNED.with(|p| p.get() > 0) || REFERENCE.with(|r| r.get())
}

/// Runs `f` with every layer on this thread using candle's own kernels and ops (quantized
/// matmul, attention over concatenated tensors) instead of flywheel's: the reference path that
/// tests compare flywheel's kernels against.
pub fn with_reference_kernels<R>(f: impl FnOnce() -> R) -> R {
    with_thread_flag(&REFERENCE, f)
}

/// Runs `f` with the thread-local `flag` set, restoring its previous value afterwards (also
/// when `f` panics).
pub fn with_thread_flag<R>(
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    f: impl FnOnce() -> R,
) -> R {
    struct Reset(&'static std::thread::LocalKey<std::cell::Cell<bool>>, bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.1;
            self.0.with(|c| c.set(prev));
        }
    }
    let _reset = Reset(flag, flag.with(|c| c.replace(true)));
    f()
}

/// Whether [`with_reference_kernels`] is in effect on this thread.
pub fn reference_kernels() -> bool {
    REFERENCE.with(|r| r.get())
}

/// From this many positions per sequence on, quantized weights are dequantized tile by tile
/// and multiplied with the f32 GEMM (prefill); fewer use the integer kernels (decode, short
/// prompt tails). 16 is where the GEMM overtook the integer kernels for both default models
/// (BENCHMARKS.md). The choice looks at positions, not batch rows, so a sequence computes the
/// same way alone or in a batch of equal length.
pub const GEMM_MIN_ROWS: usize = 16;

/// Whether `FLYWHEEL_GEMM_K` allows the K-quant integer GEMM for prefill (unset, or anything
/// but `0`, `off`, `false`); off, K-quant prefill dequantizes to f32 like the other types.
pub fn gemm_k_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("FLYWHEEL_GEMM_K").ok().as_deref(),
            Some("0" | "off" | "false")
        )
    })
}

/// Positions per sequence: the second-to-last dimension (the rows of a 2-D input).
fn positions_of(x: &Tensor) -> usize {
    let d = x.dims();
    match d.len() {
        0 | 1 => 1,
        n => d[n - 2],
    }
}

/// Which kernel a quantized [`Linear`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// Prefill-sized inputs: the slab-dequantized f32 GEMM; otherwise flywheel-kernels where
    /// they cover the block type, else candle.
    Auto,
    /// flywheel-kernels' SIMD integer path where it covers the block type, whatever the rows.
    Kernels,
    /// flywheel-kernels' portable scalar path where it covers the block type.
    Scalar,
    /// Always candle's kernels (the reference oracle).
    Candle,
}

/// A layer that maps `(…, in)` to `(…, out)`: a plain [`Linear`], or a wrapper around one (LoRA).
pub trait Projection: Send + Sync + std::fmt::Debug {
    /// Applies the layer.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The base linear layer underneath any wrapper.
    fn base(&self) -> &Linear;
    /// The layer itself when it is a plain [`Linear`] (nothing wraps it), so several of them
    /// can run as one fused product ([`forward_many`]).
    fn plain(&self) -> Option<&Linear> {
        None
    }
    /// The base layer when, in the current state (this thread's adapter routing, the installed
    /// adapter), the projection adds nothing to it, so a caller may compute the base alone
    /// (the host decode step). `None` when it adds something or cannot tell.
    fn plain_now(&self) -> Option<&Linear> {
        self.plain()
    }
    /// Whether, in the current state, the host decode step may compute this projection for
    /// `rows` one-token rows as its base layer's product followed by [`Projection::add_host`].
    /// By default only when the projection adds nothing to its base.
    fn host_ready_now(&self, rows: usize) -> bool {
        let _ = rows;
        self.plain_now().is_some()
    }
    /// Adds to `out` (`rows` rows of the base's outputs, bias included) what the projection adds
    /// to its base for the one-token rows `x` (`rows` rows of the input), with the arithmetic its
    /// `forward` uses for them, so the host step equals the tensor path bit for bit. `false`
    /// when it cannot (its state changed since [`Projection::host_ready_now`]). By default it
    /// adds nothing.
    fn add_host(&self, x: &[f32], rows: usize, out: &mut [f32]) -> bool {
        let _ = (x, rows, out);
        true
    }
}

impl Projection for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
    fn base(&self) -> &Linear {
        self
    }
    fn plain(&self) -> Option<&Linear> {
        Some(self)
    }
}

/// Applies several projections to the same input. For decode-sized CPU f32 inputs on plain
/// quantized layers that flywheel-kernels covers (a layer's q/k/v, or gate/up), the input is
/// quantized once and all weight rows share one parallel section; each output equals that
/// projection's own `forward` bit for bit. Anything else runs the projections one by one.
pub fn forward_many(ps: &[&Arc<dyn Projection>], x: &Tensor) -> Result<Vec<Tensor>> {
    if let Some(fused) = fused_products(ps, x)? {
        return Ok(fused);
    }
    ps.iter().map(|p| p.forward(x)).collect()
}

fn fused_products(ps: &[&Arc<dyn Projection>], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    if ps.len() < 2
        || reference_kernels()
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || crate::autograd::ops::training(x)
        || positions_of(x) >= GEMM_MIN_ROWS
    {
        return Ok(None);
    }
    let mut layers: Vec<&Linear> = Vec::with_capacity(ps.len());
    for p in ps {
        let Some(l) = p.plain() else { return Ok(None) };
        if l.kernel_matrix().is_none() || layers.first().is_some_and(|f| f.in_dim != l.in_dim) {
            return Ok(None);
        }
        layers.push(l);
    }
    let outs = kernel_products(&layers, x, flywheel_kernels::Path::Auto)?;
    let mut result = Vec::with_capacity(outs.len());
    for (y, l) in outs.into_iter().zip(&layers) {
        result.push(match &l.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        });
    }
    Ok(Some(result))
}

/// `x·Wᵀ` (no bias) for each quantized layer through flywheel-kernels, all in one
/// [`flywheel_kernels::matmul_many`] call (the input quantized once). `x` is CPU f32 `(…, in)`;
/// every layer has a [`Linear::kernel_matrix`].
fn kernel_products(
    layers: &[&Linear],
    x: &Tensor,
    path: flywheel_kernels::Path,
) -> Result<Vec<Tensor>> {
    let dims = x.dims();
    let m: usize = dims[..dims.len() - 1].iter().product();
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut outs: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; m * l.out_dim]).collect();
    let mut products: Vec<flywheel_kernels::Product> = outs
        .iter_mut()
        .zip(layers)
        .map(|(out, l)| flywheel_kernels::Product {
            w: l.kernel_matrix().expect("checked by the caller"),
            out: &mut out[..],
        })
        .collect();
    flywheel_kernels::matmul_many(&mut products, &xs, m, path);
    drop(products);
    outs.into_iter()
        .zip(layers)
        .map(|(out, l)| {
            let mut shape = dims.to_vec();
            *shape.last_mut().expect("rank >= 1") = l.out_dim;
            Ok(Tensor::from_vec(out, shape, x.device())?)
        })
        .collect()
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
        // Odd sizes: 3·37 rows, 44 outputs; k = 768 = 3 K-quant blocks (candle panics on an odd
        // count of 32-element blocks for Q4_1).
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (44, 768), &dev)?;
        let x = (Tensor::randn(0f32, 1.0, (3, 37, 768), &dev)? * 4.0)?;
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            assert!(kernel_type(dt).is_some(), "{dt:?} has no flywheel kernel");
            let l = Linear::quantized(Arc::new(QTensor::quantize(&w, dt)?), None)?;
            let ours = l.forward_with(&x, KernelChoice::Kernels)?;
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
            // 37 positions take a prefill GEMM. K-quants on a CPU with AVX-512 VNNI (unless
            // FLYWHEEL_GEMM_K=0): the integer GEMM, the scalar kernels' bits.
            let gemm = l.forward_with(&x, KernelChoice::Auto)?;
            if flywheel_kernels::has_gemm_k(kernel_type(dt).expect("covered")) && gemm_k_enabled() {
                assert_eq!(
                    gemm.flatten_all()?.to_vec1::<f32>()?,
                    scalar.flatten_all()?.to_vec1::<f32>()?,
                    "{dt:?}: the integer GEMM is not the scalar kernels' result"
                );
                continue;
            }
            // Everything else: exactly x·dequant(W)ᵀ up to summation order.
            let wq = QTensor::quantize(&w, dt)?.dequantize(&dev)?;
            let reference = Linear::dense(wq, None)?.forward(&x)?;
            let d_ge = (&gemm - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d_ge <= 1e-5 * scale, "{dt:?}: gemm vs dense {d_ge}");
            let d_gk = (&gemm - &ours)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // The integer kernels also round activations to 8 bits; the GEMM does not.
            assert!(
                d_gk <= 2e-2 * scale,
                "{dt:?}: gemm vs kernels {d_gk} (scale {scale})"
            );
            // Below the threshold Auto is the integer kernel.
            let few = x.narrow(1, 0, 2)?;
            let a = l.forward_with(&few, KernelChoice::Auto)?;
            let k = l.forward_with(&few, KernelChoice::Kernels)?;
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                k.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn repacked_layers_agree_with_ggml_layers_in_every_path() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let (n, k) = (37, 64);
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let q = || -> anyhow::Result<Arc<QTensor>> { Ok(Arc::new(QTensor::quantize(&w, dt)?)) };
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            // `quantized` repacks what it alone holds, where this CPU prefers it.
            let prefers = flywheel_kernels::prefers_rows4(kernel_type(dt).expect("covered"))
                && crate::packed::repack_enabled();
            let auto = Linear::quantized(q()?, None)?;
            let want = if prefers { Layout::Rows4 } else { Layout::Ggml };
            assert_eq!(auto.layout(), want, "{dt:?}");
            let shared = q()?;
            let kept = shared.clone();
            assert_eq!(Linear::quantized(shared, None)?.layout(), Layout::Ggml);
            drop(kept);
            let g = Linear::quantized_in(q()?, Some(b.clone()), Layout::Ggml)?;
            let r = Linear::quantized_in(q()?, Some(b.clone()), Layout::Rows4)?;
            assert_eq!(r.layout(), Layout::Rows4);
            let bits = |t: Tensor| -> anyhow::Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            assert_eq!(
                bits(g.dense_weight(DType::F32)?)?,
                bits(r.dense_weight(DType::F32)?)?
            );
            for m in [1usize, 3, 20] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                for choice in [
                    KernelChoice::Auto,
                    KernelChoice::Kernels,
                    KernelChoice::Scalar,
                    KernelChoice::Candle,
                ] {
                    let (a, c) = (g.forward_with(&x, choice)?, r.forward_with(&x, choice)?);
                    assert_eq!(bits(a)?, bits(c)?, "{dt:?} m={m} {choice:?}");
                }
                // Training: the frozen op's output and the input's gradient.
                let xv = candle_core::Var::from_tensor(&x)?;
                let grad = |l: &Linear| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
                    let y = l.forward(xv.as_tensor())?;
                    let gs = (&y * &y)?.sum_all()?.backward()?;
                    let dx = gs.get(xv.as_tensor()).expect("x has a gradient").clone();
                    Ok((bits(y)?, bits(dx)?))
                };
                assert_eq!(grad(&g)?, grad(&r)?, "{dt:?} m={m} training");
            }
        }
        // K-quants have no repacked layout.
        let q4k = Arc::new(QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (8, 256), &dev)?,
            GgmlDType::Q4K,
        )?);
        assert!(Linear::quantized_in(q4k.clone(), None, Layout::Rows4).is_err());
        assert_eq!(Linear::quantized(q4k, None)?.layout(), Layout::Ggml);
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
