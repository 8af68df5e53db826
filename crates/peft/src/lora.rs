//! The LoRA layer and the load-time hook that puts it around a model's projections.
//!
//! `y = base(x) + scale · B·A·dropout(x)` with `scale = alpha / r` (or `alpha / √r` with rsLoRA).
//! The model code never sees LoRA: [`LoraHook`] wraps the projections it is asked about when the
//! model is built, each wrapper holding a *slot* whose adapter can be installed, swapped or
//! cleared at run time without reloading the base model.

use candle_core::{DType, Tensor, Var};
use flywheel_models::linear::matmul_t;
use flywheel_models::{Linear, LinearHook, Projection};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::{Error, Result};

/// The projections of a Llama-family block, in PEFT's names.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which modules get an adapter: a list of leaf names, or PEFT's `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Leaf names such as `q_proj`, or the single word `all-linear`.
    Names(Vec<String>),
    /// `"all-linear"` or a single leaf name.
    One(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

impl TargetModules {
    /// The leaf names this selects.
    pub fn leaves(&self) -> Vec<String> {
        let list: Vec<String> = match self {
            TargetModules::Names(v) => v.clone(),
            TargetModules::One(s) => vec![s.clone()],
        };
        if list.iter().any(|s| s == "all-linear") {
            return ALL_LINEAR.iter().map(|s| s.to_string()).collect();
        }
        list
    }
}

/// The shape of an adapter: which modules, what rank and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank `r` of the update `B·A`.
    pub r: usize,
    /// `alpha`; the update is scaled by `alpha / r` (`alpha / √r` with `use_rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// Rank-stabilised scaling `alpha / √r`.
    pub use_rslora: bool,
    /// Modules to adapt: names from `q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj`,
    /// or `"all-linear"`.
    pub target_modules: TargetModules,
    /// Only these layer indices get adapters (all layers when empty).
    pub layers_to_transform: Vec<usize>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::default(),
            layers_to_transform: Vec::new(),
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B·A·x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks ranges and names; errors name the field (prefixed by `section`).
    pub fn validate(&self, section: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Error::Config {
            field: format!("{section}.{field}"),
            reason,
        };
        if self.r == 0 {
            return Err(bad("r", "must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad("alpha", format!("must be > 0, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        let leaves = self.target_modules.leaves();
        if leaves.is_empty() {
            return Err(bad("target_modules", "names no module".into()));
        }
        for l in &leaves {
            if !ALL_LINEAR.contains(&l.as_str()) {
                return Err(bad(
                    "target_modules",
                    format!(
                        "unknown module `{l}` (expected one of {} or \"all-linear\")",
                        ALL_LINEAR.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the projection `name` (e.g. `model.layers.3.self_attn.q_proj`) gets an adapter.
    pub fn selects(&self, name: &str) -> bool {
        let Some((layer, leaf)) = split_module_name(name) else {
            return false;
        };
        self.target_modules.leaves().iter().any(|l| l == leaf)
            && (self.layers_to_transform.is_empty() || self.layers_to_transform.contains(&layer))
    }
}

/// `model.layers.3.self_attn.q_proj` → `(3, "q_proj")`; `None` for names outside the blocks.
pub fn split_module_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let leaf = tail.rsplit('.').next()?;
    Some((idx.parse().ok()?, leaf))
}

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
        let grad = flywheel_models::train_ops::grad_enabled();
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
            // One graph node for base + update (flywheel_models::low_rank) where it applies.
            if let Some(y) = flywheel_models::low_rank::low_rank_train_forward(
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

/// SplitMix64 step.
pub(crate) fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a hash (stable across runs and platforms).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// An adapter prepared for serving: its factors by module name, checked against the model.
/// Immutable once built; requests hold it by `Arc`, so replacing an adapter under the same
/// name never changes a request already running.
#[derive(Debug)]
pub struct RoutedAdapter {
    /// The factors of each adapted module.
    pub pairs: BTreeMap<String, LoraPair>,
    /// The same factors as host f32 (shared with `pairs`), for the CPU path.
    pub host: BTreeMap<String, Arc<HostPair>>,
    /// Trainable parameters (A and B elements).
    pub parameters: usize,
    /// The largest rank among the modules.
    pub rank: usize,
}

/// One module's factors in host memory.
#[derive(Debug)]
pub struct HostPair {
    /// `A`, `(r, in)` row-major.
    pub a: Vec<f32>,
    /// `Bᵀ`, `(r, out)` row-major.
    pub b_t: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `alpha / r` (or `alpha / √r`).
    pub scale: f32,
}

/// Which rows of the next forward passes use which adapter (see [`with_routing`]).
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// Each adapter with the batch rows (first axis) it applies to.
    pub groups: Vec<(Arc<RoutedAdapter>, Vec<u32>)>,
}

thread_local! {
    static ROUTING: std::cell::RefCell<Option<Arc<Routing>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with per-row adapters: while it runs, every [`LoraLinear`] on this thread applies
/// `routing` instead of its slot. Rows in no group use the base weights alone.
pub fn with_routing<R>(routing: Routing, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<Routing>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            ROUTING.with(|r| *r.borrow_mut() = prev);
        }
    }
    let prev = ROUTING.with(|r| r.borrow_mut().replace(Arc::new(routing)));
    let _reset = Reset(prev);
    // The routing is this thread's: model work inside stays here.
    flywheel_models::pinned(f)
}

/// Wraps the projections `selector` picks with [`LoraLinear`] and remembers their slots.
pub struct LoraHook {
    selector: Box<dyn Fn(&str) -> bool + Send + Sync>,
    slots: Mutex<BTreeMap<String, (Slot, usize, usize)>>,
    seed: Arc<DropoutSeed>,
}

impl std::fmt::Debug for LoraHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraHook")
            .field("slots", &self.slot_names())
            .finish()
    }
}

impl LoraHook {
    /// A hook wrapping the modules `cfg` selects.
    pub fn for_config(cfg: &LoraConfig) -> Self {
        let cfg = cfg.clone();
        Self::with_selector(move |name| cfg.selects(name))
    }

    /// A hook wrapping every block projection (a server that swaps adapters of any shape).
    pub fn all_linear() -> Self {
        Self::with_selector(|name| {
            split_module_name(name).is_some_and(|(_, leaf)| ALL_LINEAR.contains(&leaf))
        })
    }

    /// A hook wrapping the projections for which `f` says yes.
    pub fn with_selector(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            selector: Box::new(f),
            slots: Mutex::new(BTreeMap::new()),
            seed: Arc::new(DropoutSeed::default()),
        }
    }

    /// The names of the wrapped projections, sorted.
    pub fn slot_names(&self) -> Vec<String> {
        self.slots
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// The dropout seed shared by every wrapped layer.
    pub fn dropout_seed(&self) -> &Arc<DropoutSeed> {
        &self.seed
    }

    /// Creates trainable factors for every wrapped projection: `A` Kaiming-uniform (PEFT's
    /// `a = √5`, i.e. bound `1/√in`), `B` zero; returns them by module name.
    pub fn init_trainable(
        &self,
        cfg: &LoraConfig,
        seed: u64,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<TrainableAdapter> {
        let slots = self.slots.lock().expect("poisoned");
        let mut params = BTreeMap::new();
        for (name, (slot, out, inp)) in slots.iter() {
            let mut s = seed ^ fnv1a(name.as_bytes());
            let bound = 1.0 / (*inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.r * inp)
                .map(|_| {
                    let u = (splitmix(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect();
            let a =
                Var::from_tensor(&Tensor::from_vec(a, (cfg.r, *inp), device)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&Tensor::zeros((*out, cfg.r), dtype, device)?)?;
            *slot.write().expect("poisoned") = Some(LoraPair {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: cfg.scale(),
                dropout: cfg.dropout,
                host: None,
            });
            params.insert(name.clone(), (a, b));
        }
        if params.is_empty() {
            return Err(Error::Config {
                field: "lora.target_modules".into(),
                reason: "selects no projection of this model".into(),
            });
        }
        Ok(TrainableAdapter {
            params,
            config: cfg.clone(),
        })
    }

    /// Checks `adapter` against the wrapped projections (every module present, every shape
    /// fitting) and prepares it for per-row serving, factors in `dtype`.
    pub fn prepare(
        &self,
        adapter: &crate::adapter::Adapter,
        dtype: DType,
    ) -> Result<RoutedAdapter> {
        let slots = self.slots.lock().expect("poisoned");
        let mut pairs = BTreeMap::new();
        let mut host = BTreeMap::new();
        let (mut parameters, mut rank) = (0, 0);
        for (name, (a, b)) in &adapter.weights {
            let Some((_, out, inp)) = slots.get(name) else {
                return Err(Error::Adapter {
                    path: adapter.origin.clone(),
                    reason: format!("adapts `{name}`, which this model does not have"),
                });
            };
            let (r, ain) = a.dims2()?;
            let (bout, br) = b.dims2()?;
            if ain != *inp || bout != *out || br != r {
                return Err(Error::Adapter {
                    path: adapter.origin.clone(),
                    reason: format!(
                        "`{name}`: lora_A {:?} / lora_B {:?} do not fit this model's {out}x{inp} projection",
                        a.dims(),
                        b.dims()
                    ),
                });
            }
            parameters += a.elem_count() + b.elem_count();
            rank = rank.max(r);
            let h = Arc::new(HostPair {
                a: a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                b_t: b
                    .to_dtype(DType::F32)?
                    .t()?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
                r,
                scale: adapter.scale_for(r) as f32,
            });
            host.insert(name.clone(), h.clone());
            pairs.insert(
                name.clone(),
                LoraPair {
                    a: a.to_dtype(dtype)?,
                    b: b.to_dtype(dtype)?,
                    scale: adapter.scale_for(r),
                    dropout: 0.0,
                    host: Some(h),
                },
            );
        }
        if pairs.is_empty() {
            return Err(Error::Adapter {
                path: adapter.origin.clone(),
                reason: "has no LoRA weights".into(),
            });
        }
        Ok(RoutedAdapter {
            pairs,
            host,
            parameters,
            rank,
        })
    }

    /// Installs fixed (inference) factors; every module of the adapter must be wrapped.
    pub fn install(&self, adapter: &crate::adapter::Adapter) -> Result<()> {
        let dtype = adapter
            .weights
            .values()
            .next()
            .map(|(a, _)| a.dtype())
            .unwrap_or(DType::F32);
        let prepared = self.prepare(adapter, dtype)?;
        let slots = self.slots.lock().expect("poisoned");
        for (name, (slot, _, _)) in slots.iter() {
            *slot.write().expect("poisoned") = prepared.pairs.get(name).cloned();
        }
        Ok(())
    }

    /// Removes every adapter: the model computes with its base weights alone.
    pub fn clear(&self) {
        for (slot, _, _) in self.slots.lock().expect("poisoned").values() {
            *slot.write().expect("poisoned") = None;
        }
    }

    /// The installed pair of each wrapped module (`None` where no adapter is installed).
    pub fn installed(&self) -> BTreeMap<String, Option<LoraPair>> {
        self.slots
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(k, (s, _, _))| (k.clone(), s.read().expect("poisoned").clone()))
            .collect()
    }
}

impl LinearHook for LoraHook {
    fn wrap(&self, name: &str, base: Linear) -> flywheel_models::Result<Arc<dyn Projection>> {
        if !(self.selector)(name) {
            return Ok(Arc::new(base));
        }
        let slot: Slot = Arc::new(RwLock::new(None));
        self.slots.lock().expect("poisoned").insert(
            name.to_string(),
            (slot.clone(), base.out_dim(), base.in_dim()),
        );
        Ok(Arc::new(LoraLinear::new(
            base,
            slot,
            name,
            self.seed.clone(),
        )))
    }
}

/// The trainable factors of an adapter, by module name.
#[derive(Debug)]
pub struct TrainableAdapter {
    /// `(A, B)` per module.
    pub params: BTreeMap<String, (Var, Var)>,
    /// The shape they were made with.
    pub config: LoraConfig,
}

impl TrainableAdapter {
    /// Every trainable variable in a fixed order (module name, then A before B).
    pub fn vars(&self) -> Vec<&Var> {
        self.params.values().flat_map(|(a, b)| [a, b]).collect()
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// A frozen copy for saving.
    pub fn snapshot(&self, origin: &str) -> Result<crate::adapter::Adapter> {
        let mut weights = BTreeMap::new();
        for (name, (a, b)) in &self.params {
            weights.insert(
                name.clone(),
                (
                    a.as_tensor().detach().to_dtype(DType::F32)?,
                    b.as_tensor().detach().to_dtype(DType::F32)?,
                ),
            );
        }
        Ok(crate::adapter::Adapter {
            config: self.config.clone(),
            weights,
            base_model: None,
            origin: origin.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_selection() {
        assert_eq!(
            split_module_name("model.layers.12.mlp.down_proj"),
            Some((12, "down_proj"))
        );
        assert_eq!(split_module_name("lm_head"), None);
        let cfg = LoraConfig {
            target_modules: TargetModules::One("all-linear".into()),
            layers_to_transform: vec![1],
            ..Default::default()
        };
        assert!(cfg.selects("model.layers.1.mlp.up_proj"));
        assert!(!cfg.selects("model.layers.0.mlp.up_proj"));
        assert!(!cfg.selects("lm_head"));
        let bad = LoraConfig {
            target_modules: TargetModules::Names(vec!["qproj".into()]),
            ..Default::default()
        };
        let e = bad.validate("lora").unwrap_err().to_string();
        assert!(
            e.contains("lora.target_modules") && e.contains("qproj"),
            "{e}"
        );
    }

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
