//! Grouped-query self-attention over a KV cache: the tensor path, the fused one-token decode
//! path over host buffers, and the host prefill path.

use candle_core::{DType, Tensor, D};
use std::sync::Arc;

use super::{attend_row, HostLayer, LayerCache, PositionTables, Rope};
use crate::linear::Projection;
use crate::Result;

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
