//! Gradient checkpointing: a decoder block as one graph node that keeps only its input and
//! recomputes the block in the backward pass.

use candle_core::{Device, Tensor};

use super::Block;
use crate::layers::{LayerCache, PositionTables, Rope};

/// Gradient checkpointing of one block: the forward pass keeps only the block's input; the
/// backward pass recomputes the block with gradients on and hands the parameter gradients it
/// finds to [`crate::autograd::ops::take_checkpoint_grads`].
pub(super) struct CheckpointOp {
    pub(super) block: Block,
    pub(super) rope: Rope,
    pub(super) positions: PositionTables,
    pub(super) mask: Option<Tensor>,
}

impl candle_core::CustomOp1 for CheckpointOp {
    fn name(&self) -> &'static str {
        "flywheel-checkpointed-block"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("checkpointed block: needs a contiguous input")
        };
        let x = match s {
            candle_core::CpuStorage::F32(v) => {
                Tensor::from_slice(&v[a..b], l.shape(), &Device::Cpu)?
            }
            _ => candle_core::bail!("checkpointed block: f32 only"),
        };
        let y = crate::autograd::ops::untracked(|| {
            self.block.forward(
                &x,
                &self.rope,
                &self.positions,
                self.mask.as_ref(),
                &mut LayerCache::default(),
            )
        })
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = candle_core::Var::from_tensor(&arg.detach())?;
        let y = self
            .block
            .forward(
                x.as_tensor(),
                &self.rope,
                &self.positions,
                self.mask.as_ref(),
                &mut LayerCache::default(),
            )
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut store = (y * grad.detach())?.sum_all()?.backward()?;
        let dx = store.remove(x.as_tensor());
        // Gradients of constant leaves can be tensors that still reference the recomputed
        // graph; detach everything kept so each block's activations are freed right away.
        let ids: Vec<_> = store.get_ids().copied().collect();
        for id in ids {
            if let Some(g) = store.get_id(id).map(Tensor::detach) {
                store.insert_id(id, g);
            }
        }
        crate::autograd::ops::push_checkpoint_grads(store);
        Ok(dx.map(|d| d.detach()))
    }
}
