//! The KV cache of one layer: tensors, or host buffers with spare room that a new token is
//! written into in place, and the one-row attention the host paths share.

use candle_core::{Device, Tensor};

use crate::Result;

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
