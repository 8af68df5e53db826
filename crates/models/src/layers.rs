//! Layers shared by every decoder architecture: RMSNorm, rotary embeddings, grouped-query
//! attention over a KV cache, and the gated MLP. Written once; architectures only wire them.

use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

use crate::linear::Projection;
use crate::weights::Weights;
use crate::Result;

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

/// Keys and values of one layer for the tokens seen so far: `(b, kv_heads, seq, head_dim)`.
///
/// On the CPU in f32 (inference) they live in host buffers preallocated with spare room, so a new
/// token is written in place (no concatenation per token) and the one-token decode step reads
/// them directly ([`Attention`]'s fused path). Elsewhere (GPUs, half precision, training with
/// gradients) they are tensors concatenated per call.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    pub(crate) host: Option<HostKv>,
}

impl LayerCache {
    /// Keeps the first `len` positions.
    pub(crate) fn truncate(&mut self, len: usize) -> Result<()> {
        if let Some(h) = &mut self.host {
            h.len = h.len.min(len);
        }
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            self.k = Some(k.narrow(2, 0, len)?.contiguous()?);
            self.v = Some(v.narrow(2, 0, len)?.contiguous()?);
        }
        Ok(())
    }

    /// Whether no positions are held as tensors (the host buffers, if any, hold them all).
    pub(crate) fn is_host_only(&self) -> bool {
        self.k.is_none()
    }

    /// Whether keys/values of this dtype and device go to host buffers: CPU, f32, no gradient,
    /// and the cache has not started as tensors.
    fn host_eligible(&self, k: &Tensor) -> bool {
        self.k.is_none()
            && crate::autograd::ops::applicable(k)
            && !crate::autograd::ops::training(k)
    }

    /// The host buffers for `b` rows of `heads × dim`, created on first use; `None` when this
    /// cache holds tensors.
    pub(crate) fn host_mut(&mut self, b: usize, heads: usize, dim: usize) -> Option<&mut HostKv> {
        if self.k.is_some() {
            return None;
        }
        let h = self.host.get_or_insert_with(|| HostKv::new(b, heads, dim));
        (h.b == b && h.heads == heads && h.dim == dim).then_some(h)
    }

    /// Appends new keys/values and returns the whole cached sequence.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, heads, t, dim) = k.dims4()?;
        if self.host_eligible(k) {
            if let Some(h) = self.host_mut(b, heads, dim) {
                let kv = k.flatten_all()?.to_vec1::<f32>()?;
                let vv = v.flatten_all()?.to_vec1::<f32>()?;
                h.reserve(t);
                for r in 0..b {
                    for hd in 0..heads {
                        let src = ((r * heads + hd) * t) * dim;
                        let dst = h.at(r, hd, h.len);
                        h.k[dst..dst + t * dim].copy_from_slice(&kv[src..src + t * dim]);
                        h.v[dst..dst + t * dim].copy_from_slice(&vv[src..src + t * dim]);
                    }
                }
                h.len += t;
                return h.to_tensors(k.device());
            }
        }
        if let Some(h) = self.host.take() {
            // A cache that started on the host continues as tensors (a gradient appeared).
            let (pk, pv) = h.to_tensors(k.device())?;
            self.k = Some(pk);
            self.v = Some(pv);
        }
        let (k, v) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (
                Tensor::cat(&[pk, k], 2)?.contiguous()?,
                Tensor::cat(&[pv, v], 2)?.contiguous()?,
            ),
            _ => (k.contiguous()?, v.contiguous()?),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }
}

/// The host KV buffers of one layer that a one-token step writes: one per row (single-row
/// caches) or one holding every row. Each exists already.
pub(crate) trait HostLayer {
    /// How many buffers.
    fn buffers(&self) -> usize;
    /// Buffer `c`.
    fn buffer(&mut self, c: usize) -> &mut HostKv;
}

impl HostLayer for [&mut LayerCache] {
    fn buffers(&self) -> usize {
        self.len()
    }
    fn buffer(&mut self, c: usize) -> &mut HostKv {
        self[c]
            .host
            .as_mut()
            .expect("host buffers are created first")
    }
}

/// Host keys and values, `(b, heads, cap, dim)` each, the first `len` positions in use.
/// Capacity grows by doubling, so appending is amortised O(1) and usually allocates nothing.
#[derive(Debug)]
pub(crate) struct HostKv {
    b: usize,
    heads: usize,
    dim: usize,
    pub(crate) len: usize,
    cap: usize,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

impl Clone for HostKv {
    /// A copy holds only the positions in use (prefix caches keep many of them).
    fn clone(&self) -> Self {
        let mut c = HostKv::new(self.b, self.heads, self.dim);
        c.grow_to(self, self.len);
        c.len = self.len;
        c
    }
}

impl HostKv {
    fn new(b: usize, heads: usize, dim: usize) -> Self {
        Self {
            b,
            heads,
            dim,
            len: 0,
            cap: 0,
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Offset of position `p` of head `h` in row `r`.
    pub(crate) fn at(&self, r: usize, h: usize, p: usize) -> usize {
        ((r * self.heads + h) * self.cap + p) * self.dim
    }

    /// Makes room for `extra` more positions.
    pub(crate) fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need > self.cap {
            let cap = need.max(self.cap * 2).max(64);
            let old = std::mem::replace(self, HostKv::new(self.b, self.heads, self.dim));
            self.grow_to(&old, cap);
            self.len = old.len;
        }
    }

    /// Makes room for exactly `extra` more positions (no doubling) when there is less.
    pub(crate) fn reserve_exact(&mut self, extra: usize) {
        let need = self.len + extra;
        if need > self.cap {
            let old = std::mem::replace(self, HostKv::new(self.b, self.heads, self.dim));
            self.grow_to(&old, need);
            self.len = old.len;
        }
    }

    /// Whether the buffers hold `b` rows of `heads × dim`.
    pub(crate) fn fits(&self, b: usize, heads: usize, dim: usize) -> bool {
        (self.b, self.heads, self.dim) == (b, heads, dim)
    }

    /// Allocates `cap` positions and copies `from`'s positions in use.
    fn grow_to(&mut self, from: &HostKv, cap: usize) {
        self.cap = cap;
        let n = self.b * self.heads * cap * self.dim;
        self.k = vec![0f32; n];
        self.v = vec![0f32; n];
        let used = from.len * self.dim;
        for r in 0..self.b {
            for h in 0..self.heads {
                let (s, d) = (from.at(r, h, 0), self.at(r, h, 0));
                self.k[d..d + used].copy_from_slice(&from.k[s..s + used]);
                self.v[d..d + used].copy_from_slice(&from.v[s..s + used]);
            }
        }
    }

    /// The positions in use as `(b, heads, len, dim)` tensors (a copy).
    fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let used = self.len * self.dim;
        let mut k = Vec::with_capacity(self.b * self.heads * used);
        let mut v = Vec::with_capacity(self.b * self.heads * used);
        for r in 0..self.b {
            for h in 0..self.heads {
                let s = self.at(r, h, 0);
                k.extend_from_slice(&self.k[s..s + used]);
                v.extend_from_slice(&self.v[s..s + used]);
            }
        }
        let shape = (self.b, self.heads, self.len, self.dim);
        Ok((
            Tensor::from_vec(k, shape, device)?,
            Tensor::from_vec(v, shape, device)?,
        ))
    }
}

/// One query row's attention over row `r` of a host cache: for each query head, scores against
/// every cached key of its KV group, a softmax, and the weighted sum of values into `out`
/// (`heads × dim`). Heads run in parallel when the cache is long enough to pay for it; each head
/// computes the same way either way, so results do not depend on the thread count.
pub(crate) fn attend_row(
    q: &[f32],
    h: &HostKv,
    r: usize,
    group: usize,
    scale: f32,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let (d, len) = (h.dim, h.len);
    let head = |hq: usize, o: &mut [f32]| {
        let base = h.at(r, hq / group, 0);
        let span = base..base + len * d;
        flywheel_kernels::attention_head_within(
            &q[hq * d..(hq + 1) * d],
            &h.k[span.clone()],
            &h.v[span],
            scale,
            o,
            h.cap,
        );
    };
    if len * out.len() >= 1 << 17 {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each(|(hq, o)| head(hq, o));
    } else {
        for (hq, o) in out.chunks_mut(d).enumerate() {
            head(hq, o);
        }
    }
}

/// Runs `f` on a contiguous CPU f32 tensor's elements without copying them.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let o = layout.start_offset();
            Some(f(&v[o..o + t.elem_count()]))
        }
        _ => None,
    }
}

/// Grouped-query self-attention (`n_kv_heads` divides `n_heads`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q_proj: Arc<dyn Projection>,
    pub(crate) k_proj: Arc<dyn Projection>,
    pub(crate) v_proj: Arc<dyn Projection>,
    pub(crate) o_proj: Arc<dyn Projection>,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    /// Builds attention from its four projections.
    pub fn new(
        projections: [Arc<dyn Projection>; 4],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let [q_proj, k_proj, v_proj, o_proj] = projections;
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    /// `x`: `(b, t, hidden)`; `mask`: additive `(b, 1, t, seq)` or none for an unpadded single token.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &PositionTables,
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if let (1, None, PositionTables::Shared(start, 1)) = (t, mask, positions) {
            let pos = vec![*start; b];
            if let Some(out) = self.decode_host(x, rope, &pos, &mut [cache])? {
                return Ok(out);
            }
        }
        let qkv = crate::linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        if let (true, PositionTables::Shared(start, _)) = (t > 1, positions) {
            // Every row sits at the same positions (no padding), so the mask is causal.
            if let Some(out) = self.prefill_host(x, &qkv, rope, *start, cache)? {
                return Ok(out);
            }
        }
        let [q, k, v]: [Tensor; 3] = qkv
            .try_into()
            .map_err(|_| candle_core::Error::Msg("three projections".into()))?;
        let q = q
            .reshape((b, t, self.n_heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b, t, self.n_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b, t, self.n_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let q = rope.apply(&q, positions)?;
        let k = rope.apply(&k, positions)?;
        let (k, v) = cache.append(&k, &v)?;
        let seq = k.dim(2)?;
        // GQA without copying K/V: fold the query heads of each group into the row axis.
        let group = self.n_heads / self.n_kv_heads;
        let q = q.reshape((b, self.n_kv_heads, group * t, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        if crate::autograd::ops::training(&scores) && crate::autograd::ops::applicable(&scores) {
            // Training: one fused masked softmax (the folded GQA layout is (b, heads, t, seq) in
            // memory), without autograd nodes for the constant mask.
            let op = crate::autograd::ops::MaskedSoftmaxOp {
                mask: mask.map(crate::autograd::ops::to_host).transpose()?,
            };
            let probs = scores
                .reshape((b, self.n_heads, t, seq))?
                .contiguous()?
                .apply_op1(op)?
                .reshape((b, self.n_kv_heads, group * t, seq))?;
            return self.finish(&probs, &v, b, t);
        }
        let scores = match mask {
            Some(m) => {
                let s = scores.reshape((b, self.n_heads, t, seq))?;
                s.broadcast_add(&m.to_dtype(s.dtype())?)?.reshape((
                    b,
                    self.n_kv_heads,
                    group * t,
                    seq,
                ))?
            }
            None => scores,
        };
        let scores = scores.to_dtype(DType::F32)?;
        let probs = if scores.track_op() {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        }
        .to_dtype(v.dtype())?;
        self.finish(&probs, &v, b, t)
    }

    /// One new token for each of `b` independent sequences (continuous batching): `x` is
    /// `(b, 1, hidden)`; row `i` sits at position `positions[i]` and attends over its own cache.
    /// The projections run once for the whole batch; attention runs per row. Row `i` computes
    /// exactly what a batch of that row alone computes.
    pub fn forward_decode(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &[usize],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if t != 1 || positions.len() != b || caches.len() != b {
            return Err(candle_core::Error::Msg(format!(
                "decode step: {b} rows of {t} tokens, {} positions, {} caches",
                positions.len(),
                caches.len()
            ))
            .into());
        }
        if let Some(out) = self.decode_host(x, rope, positions, caches)? {
            return Ok(out);
        }
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, self.n_heads, 1, self.head_dim))?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, self.n_kv_heads, 1, self.head_dim))?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, self.n_kv_heads, 1, self.head_dim))?;
        let group = self.n_heads / self.n_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let pos = PositionTables::Shared(positions[i], 1);
            let qi = rope.apply(&q.narrow(0, i, 1)?, &pos)?;
            let ki = rope.apply(&k.narrow(0, i, 1)?, &pos)?;
            let (kc, vc) = cache.append(&ki, &v.narrow(0, i, 1)?)?;
            let qi = qi.reshape((1, self.n_kv_heads, group, self.head_dim))?;
            let scores = (qi.matmul(&kc.t()?)? * scale)?.to_dtype(DType::F32)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vc.dtype())?;
            outs.push(
                probs
                    .matmul(&vc)?
                    .reshape((1, 1, self.n_heads * self.head_dim))?,
            );
        }
        self.o_proj.forward(&Tensor::cat(&outs, 0)?)
    }

    /// The one-token step on host buffers (CPU, f32, no gradient): projections, RoPE on the
    /// host, the new keys/values written in place, and per head one pass of `q·K`, softmax and
    /// `Σ p·V` over the cache. `x` is `(b, 1, hidden)`; row `i` sits at `positions[i]` and is
    /// row `i` of a single `b`-row cache, or the only row of `caches[i]`. Returns `None`, having
    /// changed nothing, when the caches or tensors do not qualify.
    fn decode_host(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &[usize],
        caches: &mut [&mut LayerCache],
    ) -> Result<Option<Tensor>> {
        let (b, _, _) = x.dims3()?;
        let per_cache = match caches.len() {
            n if n == b => 1,
            1 => b,
            _ => return Ok(None),
        };
        if !crate::autograd::ops::applicable(x)
            || crate::linear::reference_kernels()
            || crate::autograd::ops::training(x)
            || positions.len() != b
            || positions.iter().any(|&p| p >= rope.max_positions())
        {
            return Ok(None);
        }
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        for c in caches.iter_mut() {
            if c.host_mut(per_cache, nkv, d).is_none() {
                return Ok(None);
            }
        }
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let qkv = crate::linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let mut q = host(&qkv[0])?;
        let mut k = host(&qkv[1])?;
        let v = host(&qkv[2])?;
        let mut out = vec![0f32; b * nh * d];
        self.attend_host(rope, positions, &mut q, &mut k, &v, caches, &mut out)?;
        let out = Tensor::from_vec(out, (b, 1, nh * d), x.device())?;
        Ok(Some(self.o_proj.forward(&out)?))
    }

    /// The one-token step after the q/k/v projections (`b` rows of `heads × dim` in `q`, of
    /// `kv_heads × dim` in `k` and `v`), on host KV buffers that exist and fit: RoPE at each
    /// row's position, the new keys and values written in place, then attention per row into
    /// `out` (`b × heads·dim`). Row `i` is the only row of buffer `i` when there is one buffer
    /// per row, else row `i` of the one buffer. Allocates nothing once the buffers have room.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_host(
        &self,
        rope: &Rope,
        positions: &[usize],
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        kv: &mut (impl HostLayer + ?Sized),
        out: &mut [f32],
    ) -> Result<()> {
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let b = positions.len();
        for (i, &p) in positions.iter().enumerate() {
            let ok = rope.rotate_host(&mut q[i * nh * d..(i + 1) * nh * d], d, p)
                && rope.rotate_host(&mut k[i * nkv * d..(i + 1) * nkv * d], d, p);
            if !ok {
                return Err(candle_core::Error::Msg(
                    "rotary tables are not host f32 tables".into(),
                )
                .into());
            }
        }
        // Row i → (buffer, row in that buffer).
        let per_row = kv.buffers() == b;
        let slot = |i: usize| if per_row { (i, 0) } else { (0, i) };
        for c in 0..kv.buffers() {
            kv.buffer(c).reserve(1);
        }
        for i in 0..b {
            let (c, r) = slot(i);
            let h = kv.buffer(c);
            for hd in 0..nkv {
                let at = h.at(r, hd, h.len);
                let src = (i * nkv + hd) * d;
                h.k[at..at + d].copy_from_slice(&k[src..src + d]);
                h.v[at..at + d].copy_from_slice(&v[src..src + d]);
            }
        }
        for c in 0..kv.buffers() {
            kv.buffer(c).len += 1;
        }
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        for (i, o) in out.chunks_exact_mut(nh * d).enumerate() {
            let (c, r) = slot(i);
            let h = kv.buffer(c);
            attend_row(&q[i * nh * d..(i + 1) * nh * d], h, r, nh / nkv, scale, o);
        }
        Ok(())
    }

    /// Several tokens per row at positions `start..start + t`, every row at the same positions
    /// (no padding, so the mask is causal), on host buffers (CPU, f32, no gradient): projections,
    /// RoPE on the host, the keys/values written into the cache in place, then per block of
    /// query positions and head two small GEMMs around a causal softmax over the cache prefix the
    /// block may see. No `t × seq` score tensors are built. Returns `None`, having changed
    /// nothing, when the cache or tensors do not qualify.
    /// `qkv` holds the three projections of `x`; a projection that carries a gradient (a
    /// trainable adapter) keeps the differentiable path.
    fn prefill_host(
        &self,
        x: &Tensor,
        qkv: &[Tensor],
        rope: &Rope,
        start: usize,
        cache: &mut LayerCache,
    ) -> Result<Option<Tensor>> {
        use crate::cpu::small_gemm;
        use rayon::prelude::*;
        let (b, t, _) = x.dims3()?;
        if !crate::autograd::ops::applicable(x)
            || crate::linear::reference_kernels()
            || crate::autograd::ops::training(x)
            || qkv.iter().any(crate::autograd::ops::training)
            || start + t > rope.max_positions()
        {
            return Ok(None);
        }
        let (nh, nkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        match cache.host_mut(b, nkv, d) {
            Some(h) if h.len == start => {}
            _ => return Ok(None),
        }
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let mut q = host(&qkv[0])?;
        let mut k = host(&qkv[1])?;
        let v = host(&qkv[2])?;
        for (i, (qr, kr)) in q
            .chunks_exact_mut(nh * d)
            .zip(k.chunks_exact_mut(nkv * d))
            .enumerate()
        {
            let p = start + i % t;
            if !(rope.rotate_host(qr, d, p) && rope.rotate_host(kr, d, p)) {
                return Err(candle_core::Error::Msg(
                    "rotary tables are not host f32 tables".into(),
                )
                .into());
            }
        }
        let h = cache.host.as_mut().expect("checked above");
        h.reserve(t);
        for r in 0..b {
            for s in 0..t {
                for hd in 0..nkv {
                    let at = h.at(r, hd, start + s);
                    let src = ((r * t + s) * nkv + hd) * d;
                    h.k[at..at + d].copy_from_slice(&k[src..src + d]);
                    h.v[at..at + d].copy_from_slice(&v[src..src + d]);
                }
            }
        }
        h.len += t;
        let h = &*h;
        let (group, scale) = (nh / nkv, 1.0 / (d as f32).sqrt());
        // Tasks of (row, query head, block of query positions), a fixed split whatever the thread
        // count: scores = scale·Q·Kᵀ over the keys the block's last position may see, a causal
        // softmax per query, then P·V, each a small single-threaded GEMM.
        // (Unit tests use blocks of 8 so that their short prompts cross block boundaries.)
        const BLOCK: usize = if cfg!(test) { 8 } else { 64 };
        let tasks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|r| {
                (0..nh).flat_map(move |hq| (0..t).step_by(BLOCK).map(move |s0| (r, hq, s0)))
            })
            .collect();
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map_init(Vec::new, |scores: &mut Vec<f32>, &(r, hq, s0)| {
                let m = BLOCK.min(t - s0);
                let seen = start + s0 + m;
                scores.clear();
                scores.resize(m * seen, 0.0);
                let kv = h.at(r, hq / group, 0);
                let mut ctx = vec![0f32; m * d];
                let qp = q[((r * t + s0) * nh + hq) * d..].as_ptr();
                // SAFETY: every pointer/stride pair stays inside its buffer: q holds `m` rows of
                // stride `nh·d` from `qp`, the cache `seen` positions of `d` from `kv`, scores
                // `m × seen`, ctx `m × d`; the destinations alias nothing.
                #[allow(unsafe_code)]
                unsafe {
                    let kp = h.k[kv..].as_ptr();
                    small_gemm(
                        (m, seen, d),
                        scores.as_mut_ptr(),
                        seen,
                        qp,
                        nh * d,
                        kp,
                        (1, d),
                        scale,
                    );
                    for (i, row) in scores.chunks_exact_mut(seen).enumerate() {
                        let valid = start + s0 + i + 1;
                        crate::cpu::softmax(&mut row[..valid]);
                        row[valid..].fill(0.0);
                    }
                    let vp = h.v[kv..].as_ptr();
                    small_gemm(
                        (m, d, seen),
                        ctx.as_mut_ptr(),
                        d,
                        scores.as_ptr(),
                        seen,
                        vp,
                        (d, 1),
                        1.0,
                    );
                }
                ctx
            })
            .collect();
        let mut out = vec![0f32; b * t * nh * d];
        for (&(r, hq, s0), ctx) in tasks.iter().zip(&blocks) {
            for (i, c) in ctx.chunks_exact(d).enumerate() {
                let at = ((r * t + s0 + i) * nh + hq) * d;
                out[at..at + d].copy_from_slice(c);
            }
        }
        let out = Tensor::from_vec(out, (b, t, nh * d), x.device())?;
        Ok(Some(self.o_proj.forward(&out)?))
    }

    /// `probs·v`, heads merged back, output projection.
    fn finish(&self, probs: &Tensor, v: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let out = probs.matmul(v)?; // (b, kv, group*t, d)
        let out = out
            .reshape((b, self.n_heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
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
