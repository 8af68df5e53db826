//! The LoRA layer: a projection with an optional low-rank update, from its slot or from the
//! per-row routing of the batch; the host-f32 update arithmetic and dropout.

use candle_core::{DType, Tensor};
use flywheel_models::linear::matmul_t;
use flywheel_models::{Linear, Projection};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::routing::{HostPair, RoutedAdapter, Routing, ROUTING};
use crate::{fnv1a, splitmix};

/// The two factors of one adapted projection and how to apply them.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `A`, `(r, in)`.
    pub a: Tensor,
    /// `B`, `(out, r)`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / √r`).
    pub scale: f64,
    /// Input dropout, applied only while training.
    pub dropout: f32,
    /// The same factors as host f32 for the per-position CPU arithmetic ([`add_update`]);
    /// present for fixed (inference) factors, absent for trainable ones.
    pub host: Option<Arc<HostPair>>,
}

/// Where an adapter for one projection lives; `None` means the base layer alone.
pub type Slot = Arc<RwLock<Option<LoraPair>>>;

/// Seeds dropout masks so training is reproducible and resumable.
#[derive(Debug, Default)]
pub struct DropoutSeed {
    base: AtomicU64,
    off: std::sync::atomic::AtomicBool,
}

impl DropoutSeed {
    /// Turns dropout off (evaluation) or back on (training).
    pub fn set_enabled(&self, on: bool) {
        self.off.store(!on, Ordering::Relaxed);
    }
    fn enabled(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }
    /// Sets the seed for the next forward pass (the trainer derives it from seed and step).
    pub fn set(&self, seed: u64) {
        self.base.store(seed, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.base.load(Ordering::Relaxed)
    }
}

/// A projection with an optional low-rank update.
#[derive(Debug)]
pub struct LoraLinear {
    base: Linear,
    slot: Slot,
    name: Arc<str>,
    salt: u64,
    seed: Arc<DropoutSeed>,
    /// This projection's factors stacked for the fused kernel, for the last set of adapters
    /// routed through it (serving batches keep their adapters for many steps).
    stacked: Mutex<Option<Arc<Stacked>>>,
}

/// One projection's factors of several adapters, stacked for [`flywheel_fused::lora_bgmv`]:
/// `A`s as `(G, r, in)` and `Bᵀ`s as `(G, r, out)`, lower ranks padded with zero rows.
#[derive(Debug)]
struct Stacked {
    /// The adapters, in stack order (held, so that their identity stays theirs).
    key: Vec<Arc<RoutedAdapter>>,
    down: Tensor,
    up: Tensor,
    scales: Tensor,
}

/// Routed batches of at most this many positions take the fused kernel on a GPU; longer
/// prefills take the grouped matmuls, which use the matrix units.
const FUSED_MAX_POSITIONS: usize = 512;

thread_local! {
    static FORCE_FUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with routed LoRA updates computed by the fused op on any device, the CPU included
/// (tests compare it with the CPU path; on a GPU it is the default for short batches).
#[doc(hidden)]
pub fn with_fused_routing<R>(f: impl FnOnce() -> R) -> R {
    flywheel_models::linear::with_thread_flag(&FORCE_FUSED, f)
}

impl LoraLinear {
    /// Wraps `base`; the update comes from `slot` at each call.
    pub fn new(base: Linear, slot: Slot, name: &str, seed: Arc<DropoutSeed>) -> Self {
        Self {
            base,
            slot,
            name: name.into(),
            salt: fnv1a(name.as_bytes()),
            seed,
            stacked: Mutex::new(None),
        }
    }
}

/// `scale · B·A·x` for inference factors, in `x`'s dtype.
fn low_rank(x: &Tensor, p: &LoraPair) -> flywheel_models::Result<Tensor> {
    let xa = x.to_dtype(p.a.dtype())?;
    let up = (matmul_t(&matmul_t(&xa, &p.a)?, &p.b)? * p.scale)?;
    Ok(up.to_dtype(x.dtype())?)
}

/// `out += scale · B·A·x` for one position, on host f32: `low_j = scale · (A_j · x)`, then
/// `out += low_j · Bᵀ_j` for `j` ascending (flywheel-kernels' dot and axpy). `out` holds the
/// base layer's output. A fixed order of operations, so the same bits whatever batch the
/// position arrives in and whichever path (tensor or host decode step) computes it.
pub fn add_update(h: &HostPair, x: &[f32], out: &mut [f32]) {
    let (inp, n) = (x.len(), out.len());
    for j in 0..h.r {
        let lj = h.scale * flywheel_kernels::dot_f32(x, &h.a[j * inp..(j + 1) * inp]);
        flywheel_kernels::axpy_f32(lj, &h.b_t[j * n..(j + 1) * n], out);
    }
}

/// `y + update` where `owner[i]` is the factors (if any) for position `i` of `x` (CPU f32),
/// each position computed alone with [`add_update`], positions in parallel.
fn add_positions(
    x: &Tensor,
    y: Tensor,
    inp: usize,
    owner: &[Option<&HostPair>],
) -> flywheel_models::Result<Tensor> {
    if owner.iter().all(Option::is_none) {
        return Ok(y);
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
    let out = ys.len() / owner.len().max(1);
    use rayon::prelude::*;
    ys.par_chunks_mut(out)
        .zip(xs.par_chunks(inp))
        .zip(owner.par_iter())
        .for_each(|((yv, xv), h)| {
            if let Some(h) = h {
                add_update(h, xv, yv);
            }
        });
    Ok(Tensor::from_vec(ys, y.shape(), y.device())?)
}

impl LoraLinear {
    /// Per-row adapters (serving): each group's rows of `x` (its first axis) get that group's
    /// update; rows in no group get the base alone. On the CPU every row is computed on its own
    /// with a fixed summation order, so a request's output never depends on its batch-mates.
    fn forward_routed(
        &self,
        x: &Tensor,
        y: Tensor,
        routing: &Routing,
    ) -> flywheel_models::Result<Tensor> {
        let rows = x.dim(0)?;
        let positions = x.elem_count() / self.base.in_dim().max(1);
        if FORCE_FUSED.with(|c| c.get())
            || (x.device().is_cuda() && positions <= FUSED_MAX_POSITIONS)
        {
            return self.forward_fused(x, y, routing);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 && y.dtype() == DType::F32 {
            let inp = self.base.in_dim();
            let per_row = x.elem_count() / rows.max(1) / inp;
            // Which adapter (if any) each token position uses.
            let mut owner: Vec<Option<&HostPair>> = vec![None; rows * per_row];
            for (adapter, idx) in &routing.groups {
                if let Some(h) = adapter.host.get(&*self.name) {
                    for &row in idx {
                        let at = row as usize * per_row;
                        owner[at..at + per_row].fill(Some(h));
                    }
                }
            }
            return add_positions(x, y, inp, &owner);
        }
        let mut y = y;
        for (adapter, idx) in &routing.groups {
            let Some(p) = adapter.pairs.get(&*self.name) else {
                continue;
            };
            if idx.len() == rows && idx.iter().enumerate().all(|(i, &r)| r as usize == i) {
                y = (y + low_rank(x, p)?)?;
                continue;
            }
            let ids = Tensor::from_slice(idx, idx.len(), x.device())?;
            let up = low_rank(&x.index_select(&ids, 0)?, p)?;
            y = y.index_add(&ids, &up, 0)?;
        }
        Ok(y)
    }
}

impl LoraLinear {
    /// [`Self::forward_routed`] as one fused op for all adapters of the batch.
    fn forward_fused(
        &self,
        x: &Tensor,
        y: Tensor,
        routing: &Routing,
    ) -> flywheel_models::Result<Tensor> {
        let present: Vec<(&Arc<RoutedAdapter>, &LoraPair, &Vec<u32>)> = routing
            .groups
            .iter()
            .filter_map(|(a, rows)| a.pairs.get(&*self.name).map(|p| (a, p, rows)))
            .collect();
        if present.is_empty() {
            return Ok(y);
        }
        let stacked = self.stacked_for(&present)?;
        let inp = self.base.in_dim();
        let rows = x.dim(0)?;
        let positions = x.elem_count() / inp;
        let per_row = positions / rows.max(1);
        let mut idx = vec![flywheel_fused::NO_ADAPTER; positions];
        for (g, (_, _, rows)) in present.iter().enumerate() {
            for &row in rows.iter() {
                let at = row as usize * per_row;
                idx[at..at + per_row].fill(g as u32);
            }
        }
        let idx = Tensor::from_vec(idx, positions, x.device())?;
        let z = x
            .reshape((positions, inp))?
            .to_dtype(stacked.down.dtype())?;
        let delta =
            flywheel_fused::lora_bgmv(&z, &stacked.down, &stacked.up, &stacked.scales, &idx)?
                .to_dtype(y.dtype())?
                .reshape(y.shape())?;
        Ok((y + delta)?)
    }

    /// The stacked factors for `present`'s adapters, reused while the batch keeps them.
    fn stacked_for(
        &self,
        present: &[(&Arc<RoutedAdapter>, &LoraPair, &Vec<u32>)],
    ) -> flywheel_models::Result<Arc<Stacked>> {
        let mut cache = self.stacked.lock().expect("stack cache poisoned");
        if let Some(s) = cache.as_ref() {
            if s.key.len() == present.len()
                && s.key
                    .iter()
                    .zip(present)
                    .all(|(k, (a, _, _))| Arc::ptr_eq(k, a))
            {
                return Ok(s.clone());
            }
        }
        let rank = present
            .iter()
            .map(|(_, p, _)| p.a.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let dtype = present[0].1.a.dtype();
        let pad = |t: &Tensor| -> candle_core::Result<Tensor> {
            let t = t.to_dtype(dtype)?;
            let r = t.dim(0)?;
            if r == rank {
                Ok(t)
            } else {
                t.pad_with_zeros(0, 0, rank - r)
            }
        };
        let (mut downs, mut ups, mut scales) = (vec![], vec![], vec![]);
        for (_, p, _) in present {
            downs.push(pad(&p.a)?);
            ups.push(pad(&p.b.t()?)?);
            scales.push(p.scale as f32);
        }
        let device = present[0].1.a.device();
        let s = Arc::new(Stacked {
            key: present.iter().map(|(a, _, _)| Arc::clone(a)).collect(),
            down: Tensor::stack(&downs, 0)?.contiguous()?,
            up: Tensor::stack(&ups, 0)?.contiguous()?,
            scales: Tensor::from_vec(scales, present.len(), device)?,
        });
        *cache = Some(s.clone());
        Ok(s)
    }
}

impl Projection for LoraLinear {
    fn forward(&self, x: &Tensor) -> flywheel_models::Result<Tensor> {
        if let Some(routing) = ROUTING.with(|r| r.borrow().clone()) {
            let y = self.base.forward(x)?;
            return self.forward_routed(x, y, &routing);
        }
        let guard = self.slot.read().expect("adapter slot poisoned");
        let Some(p) = guard.as_ref() else {
            return self.base.forward(x);
        };
        let training = p.a.track_op();
        if let Some(h) = p.host.as_deref().filter(|_| !training) {
            // Fixed factors, a few positions on the CPU (decode): each position alone, as the
            // host decode step computes it ([`Projection::add_host`]).
            let inp = self.base.in_dim();
            let positions = x.elem_count() / inp.max(1);
            if x.device().is_cpu()
                && x.dtype() == DType::F32
                && positions < flywheel_models::linear::GEMM_MIN_ROWS
            {
                let y = self.base.forward(x)?;
                if y.dtype() == DType::F32 {
                    return add_positions(x, y, inp, &vec![Some(h); positions]);
                }
            }
        }
        let grad = flywheel_models::autograd::ops::grad_enabled();
        // Inside a checkpointed block's forward pass the factors are used detached (no graph);
        // the block's recomputation in the backward pass uses them as variables.
        let (a, b) = if grad {
            (p.a.clone(), p.b.clone())
        } else {
            (p.a.detach(), p.b.detach())
        };
        let mask = (training && p.dropout > 0.0 && self.seed.enabled())
            .then(|| dropout_mask(x.dims(), p.dropout, self.seed.get() ^ self.salt));
        if training && grad {
            // One graph node for base + update (flywheel_models::autograd::low_rank) where it applies.
            if let Some(y) = flywheel_models::autograd::low_rank::low_rank_train_forward(
                &self.base,
                x,
                &a,
                &b,
                p.scale,
                mask.clone(),
            )? {
                return Ok(y);
            }
        }
        let y = self.base.forward(x)?;
        let xa = x.to_dtype(a.dtype())?;
        let xa = match mask {
            Some(mask) => {
                let mask = Tensor::from_vec(mask, xa.dims(), xa.device())?.to_dtype(xa.dtype())?;
                (xa * mask)?
            }
            None => xa,
        };
        let low = matmul_t(&xa, &a)?;
        let up = (matmul_t(&low, &b)? * p.scale)?;
        Ok((y + up.to_dtype(x.dtype())?)?)
    }

    fn base(&self) -> &Linear {
        &self.base
    }

    fn plain_now(&self) -> Option<&Linear> {
        let routed = ROUTING.with(|r| {
            r.borrow().as_ref().map(|routing| {
                routing.groups.iter().any(|(a, rows)| {
                    !rows.is_empty()
                        && (a.host.contains_key(&*self.name) || a.pairs.contains_key(&*self.name))
                })
            })
        });
        let adds = match routed {
            Some(any) => any,
            None => self.slot.read().map_or(true, |g| g.is_some()),
        };
        (!adds).then_some(&self.base)
    }

    fn host_ready_now(&self, rows: usize) -> bool {
        if let Some(routed) = ROUTING.with(|r| r.borrow().clone()) {
            // The routed CPU path computes every position alone, whatever the batch.
            return !FORCE_FUSED.with(|c| c.get())
                && routed.groups.iter().all(|(a, idx)| {
                    idx.is_empty()
                        || a.host.contains_key(&*self.name)
                        || !a.pairs.contains_key(&*self.name)
                });
        }
        match &*self.slot.read().expect("adapter slot poisoned") {
            None => true,
            // The tensor path takes the same per-position arithmetic below GEMM_MIN_ROWS.
            Some(p) => {
                p.host.is_some() && !p.a.track_op() && rows < flywheel_models::linear::GEMM_MIN_ROWS
            }
        }
    }

    fn add_host(&self, x: &[f32], rows: usize, out: &mut [f32]) -> bool {
        let (inp, n) = (self.base.in_dim(), self.base.out_dim());
        if x.len() != rows * inp || out.len() != rows * n {
            return false;
        }
        let at = |i: usize| (&x[i * inp..(i + 1) * inp], i * n..(i + 1) * n);
        if let Some(routed) = ROUTING.with(|r| r.borrow().clone()) {
            for i in 0..rows {
                // As in `forward_routed`: the last group listing the row that adapts this module.
                let h = routed
                    .groups
                    .iter()
                    .rev()
                    .filter(|(_, idx)| idx.contains(&(i as u32)))
                    .find_map(|(a, _)| a.host.get(&*self.name));
                if let Some(h) = h {
                    let (xv, o) = at(i);
                    add_update(h, xv, &mut out[o]);
                }
            }
            return true;
        }
        match &*self.slot.read().expect("adapter slot poisoned") {
            None => true,
            Some(p) => match p.host.as_deref() {
                Some(h) if !p.a.track_op() => {
                    for i in 0..rows {
                        let (xv, o) = at(i);
                        add_update(h, xv, &mut out[o]);
                    }
                    true
                }
                _ => false,
            },
        }
    }
}

/// Inverted-dropout mask: 0 with probability `p`, else `1/(1-p)`, from a SplitMix stream.
fn dropout_mask(dims: &[usize], p: f32, seed: u64) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let keep = 1.0 / (1.0 - p);
    let mut s = seed;
    (0..n)
        .map(|_| {
            let u = (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
            if u < p {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::with_routing;
    use super::*;
    use candle_core::Var;
    use std::collections::BTreeMap;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| (splitmix(&mut s) >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A fixed adapter's forward over a few CPU positions is its base plus [`add_update`] per
    /// position, bit for bit what [`Projection::add_host`] adds in the host decode step, routed
    /// or installed; trainable factors and batches of GEMM size decline the host step.
    #[test]
    fn fixed_factors_forward_with_the_host_arithmetic() -> anyhow::Result<()> {
        let (out, inp, r, m) = (48, 40, 5, 3);
        let dev = candle_core::Device::Cpu;
        let w = Tensor::from_vec(values(out * inp, 1), (out, inp), &dev)?;
        let bias = Tensor::from_vec(values(out, 2), out, &dev)?;
        let base = Linear::dense(w, Some(bias))?;
        let a = Tensor::from_vec(values(r * inp, 3), (r, inp), &dev)?;
        let b = Tensor::from_vec(values(out * r, 4), (out, r), &dev)?;
        let host = Arc::new(HostPair {
            a: a.flatten_all()?.to_vec1()?,
            b_t: b.t()?.contiguous()?.flatten_all()?.to_vec1()?,
            r,
            scale: 1.4,
        });
        let pair = LoraPair {
            a: a.clone(),
            b: b.clone(),
            scale: 1.4f32 as f64,
            dropout: 0.0,
            host: Some(host.clone()),
        };
        let slot: Slot = Arc::new(RwLock::new(Some(pair.clone())));
        let name = "model.layers.0.self_attn.q_proj";
        let l = LoraLinear::new(base.clone(), slot.clone(), name, Arc::default());
        let xs = values(m * inp, 5);
        let x = Tensor::from_vec(xs.clone(), (1, m, inp), &dev)?;
        let y0 = base.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let got = l.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(l.host_ready_now(m));
        let mut host_out = y0.clone();
        assert!(l.add_host(&xs, m, &mut host_out));
        assert_eq!(bits(&got), bits(&host_out));
        // The test can fail: candle's matmuls give other bits, and the update is not nothing.
        let candle = (base.forward(&x)? + (matmul_t(&matmul_t(&x, &a)?, &b)? * pair.scale)?)?;
        let candle = candle.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(bits(&candle), bits(&got));
        let moved = got
            .iter()
            .zip(&y0)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(moved > 0.1, "{moved}");
        // Batches of GEMM size take candle's matmuls, so the host step declines them.
        assert!(!l.host_ready_now(flywheel_models::linear::GEMM_MIN_ROWS));

        // Routed to the middle row only: the other rows get the base alone, in both paths.
        let routed = Arc::new(RoutedAdapter {
            pairs: BTreeMap::from([(name.to_string(), pair.clone())]),
            host: BTreeMap::from([(name.to_string(), host)]),
            parameters: 0,
            rank: r,
        });
        let rows = Tensor::from_vec(xs.clone(), (m, 1, inp), &dev)?;
        let routing = Routing {
            groups: vec![(routed, vec![1])],
        };
        let (via_tensor, via_host) = with_routing(routing, || -> anyhow::Result<_> {
            assert!(
                l.host_ready_now(64),
                "the routed path has no GEMM threshold"
            );
            let t = l.forward(&rows)?.flatten_all()?.to_vec1::<f32>()?;
            let mut h = y0.clone();
            assert!(l.add_host(&xs, m, &mut h));
            Ok((t, h))
        })?;
        assert_eq!(bits(&via_tensor), bits(&via_host));
        assert_eq!(bits(&via_tensor[..out]), bits(&y0[..out]));
        assert_eq!(bits(&via_tensor[out..2 * out]), bits(&got[out..2 * out]));
        assert_eq!(bits(&via_tensor[2 * out..]), bits(&y0[2 * out..]));

        // Trainable factors: the host step declines.
        let var = Var::from_tensor(&a)?;
        *slot.write().unwrap() = Some(LoraPair {
            a: var.as_tensor().clone(),
            ..pair
        });
        assert!(!l.host_ready_now(1));
        assert!(!l.add_host(&xs, m, &mut y0.clone()));
        // Nothing installed: the base alone, which the host step computes without help.
        *slot.write().unwrap() = None;
        assert!(l.host_ready_now(1));
        let mut plain = y0.clone();
        assert!(l.add_host(&xs, m, &mut plain));
        assert_eq!(bits(&plain), bits(&y0));
        Ok(())
    }

    #[test]
    fn dropout_mask_keeps_expected_fraction() {
        let m = dropout_mask(&[100, 100], 0.25, 7);
        let zeros = m.iter().filter(|&&v| v == 0.0).count() as f64 / 1e4;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        assert_eq!(m, dropout_mask(&[100, 100], 0.25, 7));
    }
}
