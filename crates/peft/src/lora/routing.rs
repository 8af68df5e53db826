//! Per-row adapters for batched serving: an adapter prepared for routing, its host copy, and
//! the thread-scoped routing the layers read.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::layer::LoraPair;

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
    pub(super) static ROUTING: std::cell::RefCell<Option<Arc<Routing>>> = const { std::cell::RefCell::new(None) };
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
