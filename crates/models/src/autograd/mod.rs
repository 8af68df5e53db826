//! Training through the model: fused ops with hand-written backward passes, frozen (possibly
//! quantized) weights that pass gradients to their input only, the low-rank update as one
//! training node, and the switches that say whether a forward pass is training.
//!
//! Inference never needs this module; the layers call into it only when
//! [`ops::training`] says the input takes part in a backward pass.

pub(crate) mod frozen;
pub mod low_rank;
pub mod ops;
