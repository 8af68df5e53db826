//! The load-time hook that wraps a model's projections with LoRA layers and installs,
//! swaps or clears adapters in their slots; the trainable factors of an adapter.

use candle_core::{DType, Tensor, Var};
use flywheel_models::{Linear, LinearHook, Projection};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use super::layer::{DropoutSeed, LoraLinear, LoraPair, Slot};
use super::routing::{HostPair, RoutedAdapter};
use crate::config::{split_module_name, LoraConfig, ALL_LINEAR};
use crate::{fnv1a, splitmix};
use crate::{Error, Result};

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
