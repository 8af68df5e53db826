//! Fused training kernels with hand-written backward passes (CPU, f32): RMSNorm with a frozen
//! weight, rotate-half RoPE, softmax with an additive mask, the SwiGLU activation and summed cross-entropy. Each replaces a chain of
//! element-wise autograd nodes (and the gradients candle would build for constant tables) with
//! one forward loop and one backward loop. Tests check them against the differentiable
//! compositions they replace.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

/// The values of a contiguous CPU f32 storage, or an error naming `what`.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: needs a contiguous f32 input"),
    }
}

/// A tensor's f32 elements on the host in logical order: borrowed from the storage when the
/// tensor is a contiguous CPU f32 tensor (the usual case in a backward pass), copied otherwise.
pub(crate) enum HostF32<'a> {
    /// A read guard on the storage and the element range.
    Borrowed(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    /// A copy.
    Owned(Vec<f32>),
}

impl std::ops::Deref for HostF32<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Self::Borrowed(guard, range) => match &**guard {
                candle_core::Storage::Cpu(CpuStorage::F32(v)) => &v[range.clone()],
                // `host_f32` only borrows CPU f32 storage.
                _ => &[],
            },
            Self::Owned(v) => v,
        }
    }
}

/// The elements of `t` as f32 without a copy where possible (see [`HostF32`]).
pub(crate) fn host_f32(t: &Tensor) -> candle_core::Result<HostF32<'_>> {
    let (guard, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(CpuStorage::F32(_)), Some((a, b))) =
        (&*guard, layout.contiguous_offsets())
    {
        return Ok(HostF32::Borrowed(guard, a..b));
    }
    drop(guard);
    let dtype = candle_core::DType::F32;
    Ok(HostF32::Owned(
        t.detach()
            .to_dtype(dtype)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    ))
}

thread_local! {
    static UNTRACKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static CHECKPOINT_GRADS: std::cell::RefCell<Vec<candle_core::backprop::GradStore>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` in the forward pass of a checkpointed block: trainable parameters are used detached
/// (no graph is built) while layers keep their training numerics.
pub fn untracked<R>(f: impl FnOnce() -> R) -> R {
    let prev = UNTRACKED.with(|u| u.replace(true));
    let r = f();
    UNTRACKED.with(|u| u.set(prev));
    r
}

/// False inside [`untracked`].
pub fn grad_enabled() -> bool {
    !UNTRACKED.with(|u| u.get())
}

/// Whether layers should compute with training numerics: the input carries a gradient, or a
/// checkpointed block is running its forward pass.
pub fn training(x: &Tensor) -> bool {
    x.track_op() || !grad_enabled()
}

/// Stores the parameter gradients found while recomputing a checkpointed block.
pub fn push_checkpoint_grads(store: candle_core::backprop::GradStore) {
    CHECKPOINT_GRADS.with(|c| c.borrow_mut().push(store));
}

/// Takes the parameter gradients that checkpointed blocks produced on this thread since the last
/// call; the trainer adds them to the ones of the outer backward pass.
pub fn take_checkpoint_grads() -> Vec<candle_core::backprop::GradStore> {
    CHECKPOINT_GRADS.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// Whether the fused training ops can run on `x`.
pub fn applicable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// RMSNorm over the last dimension with a frozen weight.
#[derive(Debug, Clone)]
pub struct RmsNormOp {
    /// The weight, `(dim,)`.
    pub weight: Vec<f32>,
    /// Epsilon added to the mean square.
    pub eps: f32,
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "flywheel-rms-norm-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let d = self.weight.len();
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((o, v), w) in yr.iter_mut().zip(xr).zip(&self.weight) {
                *o = v * inv * w;
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = host_f32(arg)?;
        let g = host_f32(grad)?;
        let d = self.weight.len();
        let mut dx = vec![0f32; x.len()];
        for ((xr, gr), dr) in x
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            // dx = inv·(w∘g) − x·inv³·Σ(w∘g∘x)/d
            let dot: f32 = xr
                .iter()
                .zip(gr)
                .zip(&self.weight)
                .map(|((x, g), w)| x * g * w)
                .sum();
            let k = dot * inv * inv * inv / d as f32;
            for (((o, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(&self.weight) {
                *o = inv * w * g - x * k;
            }
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Rotate-half RoPE on `(b, h, t, d)` with tables `(t, d/2)` or `(b, t, d/2)`.
#[derive(Debug, Clone)]
pub struct RopeOp {
    /// Cosines.
    pub cos: Vec<f32>,
    /// Sines.
    pub sin: Vec<f32>,
    /// The tables have a batch dimension.
    pub per_row: bool,
}

impl RopeOp {
    fn apply(&self, x: &[f32], dims: &[usize], sign: f32) -> candle_core::Result<Vec<f32>> {
        let [b, h, t, d] = dims else {
            candle_core::bail!("rope: expected a rank-4 input, got {dims:?}")
        };
        let (b, h, t, d) = (*b, *h, *t, *d);
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let row = ((bi * h + hi) * t + ti) * d;
                    let tab = if self.per_row {
                        (bi * t + ti) * half
                    } else {
                        ti * half
                    };
                    for i in 0..half {
                        let (c, s) = (self.cos[tab + i], sign * self.sin[tab + i]);
                        let (x1, x2) = (x[row + i], x[row + half + i]);
                        y[row + i] = x1 * c - x2 * s;
                        y[row + half + i] = x2 * c + x1 * s;
                    }
                }
            }
        }
        Ok(y)
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "flywheel-rope-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let y = self.apply(x, l.shape().dims(), 1.0)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The rotation is orthogonal: its transpose rotates by the negated angle.
        let g = host_f32(grad)?;
        let dx = self.apply(&g, arg.dims(), -1.0)?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `softmax(x + mask)` over the last dimension of `(b, h, t, s)`; `mask` is `(b, 1, t, s)`.
#[derive(Debug, Clone)]
pub struct MaskedSoftmaxOp {
    /// The additive mask, or none.
    pub mask: Option<Vec<f32>>,
}

impl CustomOp1 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "flywheel-masked-softmax-train"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, self.name())?;
        let dims = l.shape().dims();
        let [b, h, t, s] = dims else {
            candle_core::bail!("masked softmax: expected a rank-4 input, got {dims:?}")
        };
        let (h, t, s) = (*h, *t, *s);
        let mut y = vec![0f32; x.len()];
        // Rows are independent, so splitting them over threads changes no result.
        use rayon::prelude::*;
        let rows = x.par_chunks_exact(s).zip(y.par_chunks_exact_mut(s));
        rows.enumerate().for_each(|(r, (xr, yr))| {
            let bi = r / (h * t);
            let ti = r % t;
            let m = self
                .mask
                .as_ref()
                .map(|m| &m[(bi * t + ti) * s..(bi * t + ti + 1) * s]);
            match m {
                Some(m) => {
                    for ((o, x), m) in yr.iter_mut().zip(xr).zip(m) {
                        *o = x + m;
                    }
                }
                None => yr.copy_from_slice(xr),
            }
            crate::cpu::softmax(yr);
        });
        let _ = b;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let y = host_f32(res)?;
        let g = host_f32(grad)?;
        let s = *arg.dims().last().expect("rank 4");
        let mut dx = vec![0f32; y.len()];
        use rayon::prelude::*;
        y.par_chunks_exact(s)
            .zip(g.par_chunks_exact(s))
            .zip(dx.par_chunks_exact_mut(s))
            .for_each(|((yr, gr), dr)| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((o, y), g) in dr.iter_mut().zip(yr).zip(gr) {
                    *o = y * (g - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Summed cross-entropy `Σᵢ (logsumexp(xᵢ) − xᵢ[tᵢ])` over the rows of `(n, v)` logits as one
/// node. Composed from candle ops it is six nodes over the `(n, v)` logits (about 20 MB a step
/// for a 49k vocabulary), each with its own zero-filled gradient buffer; here the forward pass
/// is one parallel pass and the backward pass writes `g·(softmax(xᵢ) − onehot(tᵢ))` in
/// another. Rows are independent and the row losses are summed in order, so the result does
/// not depend on the thread count.
#[derive(Debug, Clone)]
pub struct CrossEntropySumOp {
    /// The target id of each row.
    pub targets: Vec<u32>,
}

impl CrossEntropySumOp {
    /// `(max, log Σ exp(x − max))` of one row.
    fn row_stats(x: &[f32]) -> (f32, f32) {
        let mut out = [0f32; 2];
        row_lse(x, &mut out);
        (out[0], out[1])
    }

    fn check(&self, dims: &[usize]) -> candle_core::Result<(usize, usize)> {
        let &[n, v] = dims else {
            candle_core::bail!("cross-entropy: expected (rows, vocab) logits, got {dims:?}")
        };
        if self.targets.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", self.targets.len());
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {t} outside a vocabulary of {v}");
        }
        Ok((n, v))
    }
}

impl CustomOp1 for CrossEntropySumOp {
    fn name(&self) -> &'static str {
        "flywheel-cross-entropy-sum"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, self.name())?;
        let (_, v) = self.check(l.shape().dims())?;
        use rayon::prelude::*;
        let rows: Vec<f32> = x
            .par_chunks_exact(v.max(1))
            .zip(self.targets.par_iter())
            .map(|(xr, &t)| {
                let (max, lse) = Self::row_stats(xr);
                lse - (xr[t as usize] - max)
            })
            .collect();
        let total: f32 = rows.iter().sum();
        Ok((CpuStorage::F32(vec![total]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, v) = self.check(arg.dims())?;
        let x = host_f32(arg)?;
        let g = host_f32(grad)?[0];
        let mut dx = vec![0f32; x.len()];
        use rayon::prelude::*;
        dx.par_chunks_exact_mut(v.max(1))
            .zip(x.par_chunks_exact(v.max(1)))
            .zip(self.targets.par_iter())
            .for_each(|((dr, xr), &t)| {
                let (max, lse) = Self::row_stats(xr);
                scaled_exp_row(dr, xr, max + lse, g);
                dr[t as usize] -= g;
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `silu(g) ⊙ u`, the gated MLP's activation, as one node: one pass forward and one pass
/// backward (`dg = grad·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = grad·silu(g)`) instead of candle's
/// silu, product and their backward chains. Element-wise, so splitting the work over threads
/// changes no result; small inputs (decode) stay on the calling thread.
#[derive(Debug, Clone, Copy)]
pub struct SwiGluOp {
    /// Forward with the vectorised `exp_fast` (training). Off, the forward computes candle's
    /// `silu(g)·u` bit for bit with libm's `exp` (generation, whose greedy tokens are tested
    /// against the reference path and llama.cpp). The backward always uses `exp_fast`.
    pub fast_exp: bool,
}

impl SwiGluOp {
    /// Elements per parallel task; inputs smaller than this run on the calling thread.
    const CHUNK: usize = 1 << 14;
}

/// `y = silu(g)·u`, in parallel chunks of [`SwiGluOp::CHUNK`] when the input is larger: with
/// `exp_fast` when `fast` (training), otherwise candle's `silu(g)·u` bit for bit (generation).
pub(crate) fn swiglu_into(y: &mut [f32], g: &[f32], u: &[f32], fast: bool) {
    let body = |(yc, (gc, uc)): (&mut [f32], (&[f32], &[f32]))| {
        if fast {
            swiglu_chunk(yc, gc, uc)
        } else {
            for ((o, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    };
    if g.len() <= SwiGluOp::CHUNK {
        body((y, (g, u)));
    } else {
        use rayon::prelude::*;
        let c = SwiGluOp::CHUNK;
        y.par_chunks_mut(c)
            .zip(g.par_chunks(c).zip(u.par_chunks(c)))
            .for_each(body);
    }
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "flywheel-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, self.name())?;
        let u = contiguous_f32(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let mut y = vec![0f32; g.len()];
        swiglu_into(&mut y, g, u, self.fast_exp);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (host_f32(gate)?, host_f32(up)?, host_f32(grad)?);
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        use rayon::prelude::*;
        let c = Self::CHUNK;
        dg.par_chunks_mut(c)
            .zip(du.par_chunks_mut(c))
            .zip(g.par_chunks(c).zip(u.par_chunks(c)).zip(dy.par_chunks(c)))
            .for_each(|((dgc, duc), ((gc, uc), yc))| swiglu_grad_chunk(dgc, duc, gc, uc, yc));
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
}

use crate::cpu::{exp_fast, multiversion};

multiversion! {
/// `out = [max, ln Σ exp(x − max)]` of one row (cross-entropy), eight lanes at a time.
fn row_lse(x: &[f32], out: &mut [f32; 2]) {
    let m = crate::cpu::max8(x);
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += exp_fast(c[k] - m);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| exp_fast(v - m)).sum();
    out[0] = m;
    out[1] = (acc.iter().sum::<f32>() + tail).ln();
}
}

multiversion! {
/// `d = g·exp(x − shift)` over one row (the cross-entropy's softmax term).
fn scaled_exp_row(d: &mut [f32], x: &[f32], shift: f32, g: f32) {
    for (o, v) in d.iter_mut().zip(x) {
        *o = g * exp_fast(v - shift);
    }
}
}

multiversion! {
/// `y = silu(g)·u` over a chunk.
fn swiglu_chunk(y: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + exp_fast(-g)) * u;
    }
}
}

multiversion! {
/// The SwiGLU backward over a chunk: `dg = d·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = d·g·σ(g)`.
fn swiglu_grad_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
    for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d) {
        let s = 1.0 / (1.0 + exp_fast(-g));
        *dg = d * u * s * (1.0 + g * (1.0 - s));
        *du = d * g * s;
    }
}
}

/// Host copy of a tensor as f32 (tables and masks for the ops above).
pub fn to_host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn grads_match(
        x0: &Tensor,
        fused: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        reference: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> anyhow::Result<()> {
        let r = Tensor::randn(0f32, 1.0, x0.dims(), &Device::Cpu)?;
        let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
            let v = Var::from_tensor(x0)?;
            let y = f(v.as_tensor())?;
            let loss = (&y * &r)?.sum_all()?;
            let g = loss.backward()?;
            Ok((
                y.flatten_all()?.to_vec1::<f32>()?,
                g.get(v.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f32>()?,
            ))
        };
        let (yf, gf) = run(&fused)?;
        let (yr, gr) = run(&reference)?;
        let md = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(md(&yf, &yr) < 1e-5, "forward differs: {}", md(&yf, &yr));
        assert!(md(&gf, &gr) < 1e-4, "backward differs: {}", md(&gf, &gr));
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_composition() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 5, 24), &dev)?;
        let w = Tensor::randn(1f32, 0.3, 24, &dev)?;
        let op = RmsNormOp {
            weight: to_host(&w)?,
            eps: 1e-5,
        };
        grads_match(
            &x,
            |x| x.apply_op1(op.clone()),
            |x| {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?.broadcast_mul(&w)
            },
        )
    }

    #[test]
    fn rope_matches_the_composition() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), &dev)?;
        for per_row in [false, true] {
            let shape: Vec<usize> = if per_row { vec![2, 7, 4] } else { vec![7, 4] };
            let ang = Tensor::randn(0f32, 2.0, shape.as_slice(), &dev)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            let op = RopeOp {
                cos: to_host(&cos)?,
                sin: to_host(&sin)?,
                per_row,
            };
            grads_match(
                &x,
                |x| x.apply_op1(op.clone()),
                |x| {
                    let c = Tensor::cat(&[&cos, &cos], D::Minus1)?;
                    let s = Tensor::cat(&[&sin, &sin], D::Minus1)?;
                    let (c, s) = if per_row {
                        (c.unsqueeze(1)?, s.unsqueeze(1)?)
                    } else {
                        (c.unsqueeze(0)?.unsqueeze(0)?, s.unsqueeze(0)?.unsqueeze(0)?)
                    };
                    let x1 = x.narrow(D::Minus1, 0, 4)?;
                    let x2 = x.narrow(D::Minus1, 4, 4)?;
                    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                    x.broadcast_mul(&c)? + rot.broadcast_mul(&s)?
                },
            )?;
        }
        Ok(())
    }

    #[test]
    fn swiglu_matches_the_composition() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // One shape below the parallel threshold (decode) and one above it (prefill, training),
        // each with the exact and the fast forward.
        for (rows, fast_exp) in [(1usize, false), (1, true), (40, false), (40, true)] {
            let shape = (rows, 1000);
            let g0 = Tensor::randn(0f32, 3.0, shape, &dev)?;
            let u0 = Tensor::randn(0f32, 1.0, shape, &dev)?;
            let w = Tensor::randn(0f32, 1.0, shape, &dev)?;
            let run = |fused: bool| -> anyhow::Result<Vec<Vec<f32>>> {
                let (g, u) = (Var::from_tensor(&g0)?, Var::from_tensor(&u0)?);
                let y = if fused {
                    let op = SwiGluOp { fast_exp };
                    g.as_tensor().apply_op2(u.as_tensor(), op)?
                } else {
                    (candle_nn::ops::silu(g.as_tensor())? * u.as_tensor())?
                };
                let grads = (&y * &w)?.sum_all()?.backward()?;
                let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                Ok(vec![
                    flat(&y)?,
                    flat(grads.get(g.as_tensor()).expect("dg"))?,
                    flat(grads.get(u.as_tensor()).expect("du"))?,
                ])
            };
            let (fused, composed) = (run(true)?, run(false)?);
            if !fast_exp {
                assert_eq!(
                    fused[0], composed[0],
                    "the exact forward is candle's silu(g)·u"
                );
            }
            for (what, (a, b)) in ["y", "dg", "du"].iter().zip(fused.iter().zip(&composed)) {
                let md = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(md < 1e-5, "{what} differs by {md} ({rows} rows)");
            }
        }
        let bad = Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?;
        let other = Tensor::zeros((3, 2), candle_core::DType::F32, &dev)?;
        let op = SwiGluOp { fast_exp: true };
        assert!(bad.apply_op2(&other, op).is_err());
        Ok(())
    }

    #[test]
    fn cross_entropy_matches_the_composition() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (5, 37);
        let x0 = Tensor::randn(0f32, 3.0, (n, v), &dev)?;
        let targets: Vec<u32> = vec![0, 36, 7, 7, 20];
        let op = CrossEntropySumOp {
            targets: targets.clone(),
        };
        let t = Tensor::from_vec(targets, (n, 1), &dev)?;
        let run = |fused: bool| -> anyhow::Result<(f32, Vec<f32>)> {
            let x = Var::from_tensor(&x0)?;
            let loss = if fused {
                x.as_tensor().apply_op1(op.clone())?
            } else {
                let max = x.max_keepdim(D::Minus1)?.detach();
                let shifted = x.broadcast_sub(&max)?;
                let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
                (lse - shifted.gather(&t, D::Minus1)?)?.sum_all()?
            };
            let g = (&loss * 1.5)?.backward()?;
            let gx = g.get(x.as_tensor()).expect("grad").flatten_all()?;
            Ok((loss.to_scalar::<f32>()?, gx.to_vec1::<f32>()?))
        };
        let (lf, gf) = run(true)?;
        let (lr, gr) = run(false)?;
        assert!((lf - lr).abs() < 1e-4 * lr.abs(), "loss {lf} vs {lr}");
        let md = gf
            .iter()
            .zip(&gr)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(md < 1e-5, "gradient differs by {md}");
        let bad = CrossEntropySumOp {
            targets: vec![0, 1, 2, 3, 37],
        };
        let err = x0.apply_op1(bad).unwrap_err().to_string();
        assert!(err.contains("target 37"), "{err}");
        Ok(())
    }

    #[test]
    fn masked_softmax_matches_the_composition() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 3, 4, 6), &dev)?;
        let mut m = vec![0f32; 2 * 4 * 6];
        for (i, v) in m.iter_mut().enumerate() {
            if (i % 6) > (i / 6) % 4 + 2 {
                *v = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(m.clone(), (2, 1, 4, 6), &dev)?;
        let op = MaskedSoftmaxOp { mask: Some(m) };
        grads_match(
            &x,
            |x| x.apply_op1(op.clone()),
            |x| candle_nn::ops::softmax(&x.broadcast_add(&mask)?, D::Minus1),
        )
    }
}
