//! The LoRA layer and the load-time hook that puts it around a model's projections.
//!
//! `y = base(x) + scale · B·A·dropout(x)` with `scale = alpha / r` (or `alpha / √r` with rsLoRA).
//! The model code never sees LoRA: [`LoraHook`] wraps the projections it is asked about when the
//! model is built, each wrapper holding a *slot* whose adapter can be installed, swapped or
//! cleared at run time without reloading the base model.

mod hook;
mod layer;
mod routing;

pub use crate::config::{split_module_name, LoraConfig, TargetModules, ALL_LINEAR};
pub use hook::{LoraHook, TrainableAdapter};
pub use layer::{add_update, with_fused_routing, DropoutSeed, LoraLinear, LoraPair, Slot};
pub use routing::{with_routing, HostPair, RoutedAdapter, Routing};
