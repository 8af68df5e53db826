//! A frozen linear layer plus a trainable low-rank update as one training node:
//! `y = x·Wᵀ + s·((x ⊙ m)·Aᵀ)·Bᵀ` (CPU, f32), with a hand-written backward pass that returns
//! `dx`, `dA` and `dB` and nothing for `W`.
//!
//! Built from candle ops the update is five graph nodes per projection (two matmuls, a scale, an
//! add, and the frozen product), and candle's backward pass zero-fills and adds a full
//! `(rows, out)` gradient buffer for each of them; over 210 projections a step those
//! single-threaded passes were a tenth of a LoRA training step on 2 cores. Here the update is
//! added into the frozen product's output by one GEMM, and the backward pass adds its part of
//! `dx` into the frozen input gradient in place. Adapter code (flywheel-peft) calls
//! [`low_rank_train_forward`]; the model files never see it.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use std::sync::Arc;

use crate::autograd::frozen::{frozen_forward_f32, frozen_input_gradient_f32, FrozenWeight};
use crate::cpu::mm;

/// The fused node. Inputs: `x (…, k)`, `A (r, k)`, `B (n, r)`.
struct LowRankTrainOp {
    weight: FrozenWeight,
    scale: f32,
    /// Inverted-dropout mask on the update's input (`x`'s element count), if any.
    mask: Option<Arc<Vec<f32>>>,
}

impl LowRankTrainOp {
    /// `x ⊙ mask`, or `x` itself.
    fn masked<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => x.iter().zip(m.iter()).map(|(a, b)| a * b).collect(),
            None => std::borrow::Cow::Borrowed(x),
        }
    }
}

impl CustomOp3 for LowRankTrainOp {
    fn name(&self) -> &'static str {
        "flywheel-low-rank-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::autograd::ops::contiguous_f32;
        let x = contiguous_f32(s1, l1, "low-rank training op: x")?;
        let a = contiguous_f32(s2, l2, "low-rank training op: A")?;
        let b = contiguous_f32(s3, l3, "low-rank training op: B")?;
        let (r, k) = l2.shape().dims2()?;
        let (n, r2) = l3.shape().dims2()?;
        let dims = l1.shape().dims();
        if r != r2 || dims.last() != Some(&k) {
            candle_core::bail!(
                "low-rank training op: x {:?}, A ({r}, {k}), B ({n}, {r2}) do not fit",
                dims
            );
        }
        let m = x.len() / k.max(1);
        let (mut y, shape) = frozen_forward_f32(&self.weight, x, dims)?;
        let xm = self.masked(x);
        let mut low = vec![0f32; m * r];
        mm(&mut low, (m, r, k), (&xm, 1, k), (a, k, 1), 1.0, false);
        mm(&mut y, (m, n, r), (&low, 1, r), (b, r, 1), self.scale, true);
        Ok((CpuStorage::F32(y), shape.into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, k) = a.dims2()?;
        let (n, _) = b.dims2()?;
        use crate::autograd::ops::host_f32;
        let xs = host_f32(x)?;
        let (av, bv) = (host_f32(a)?, host_f32(b)?);
        let g = host_f32(grad)?;
        let m = xs.len() / k.max(1);
        let xm = self.masked(&xs);
        // low = xm·Aᵀ (recomputed: m·k·r multiply-adds, cheaper than keeping it).
        let mut low = vec![0f32; m * r];
        mm(&mut low, (m, r, k), (&xm, 1, k), (&av, k, 1), 1.0, false);
        // glow = s·g·B, dB = s·gᵀ·low, dA = glowᵀ·xm.
        let mut glow = vec![0f32; m * r];
        mm(
            &mut glow,
            (m, r, n),
            (&g, 1, n),
            (&bv, 1, r),
            self.scale,
            false,
        );
        let mut db = vec![0f32; n * r];
        mm(
            &mut db,
            (n, r, m),
            (&g, n, 1),
            (&low, 1, r),
            self.scale,
            false,
        );
        let mut da = vec![0f32; r * k];
        mm(&mut da, (r, k, m), (&glow, r, 1), (&xm, 1, k), 1.0, false);
        // dx = g·W + (glow·A) ⊙ mask.
        let mut dx = frozen_input_gradient_f32(&self.weight, &g, m)?;
        match &self.mask {
            None => mm(&mut dx, (m, k, r), (&glow, 1, r), (&av, 1, k), 1.0, true),
            Some(mask) => {
                let mut part = vec![0f32; m * k];
                mm(&mut part, (m, k, r), (&glow, 1, r), (&av, 1, k), 1.0, false);
                for ((d, p), w) in dx.iter_mut().zip(&part).zip(mask.iter()) {
                    *d += p * w;
                }
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// Training forward of `linear(x) + scale·((x ⊙ mask)·Aᵀ)·Bᵀ` as one graph node whose backward
/// pass gives `x`, `A` and `B` their gradients (see the module header). `mask`, when given, has
/// `x`'s element count. `None` when the fused path does not apply (not CPU, not f32, a base
/// weight that trains, or a mask of the wrong size); the caller then composes candle ops.
pub fn low_rank_train_forward(
    linear: &crate::linear::Linear,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> crate::Result<Option<Tensor>> {
    use candle_core::DType;
    let cpu = x.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu();
    let f32s = x.dtype() == DType::F32 && a.dtype() == DType::F32 && b.dtype() == DType::F32;
    if !cpu || !f32s || mask.as_ref().is_some_and(|m| m.len() != x.elem_count()) {
        return Ok(None);
    }
    let Some(weight) = linear.frozen_weight() else {
        return Ok(None);
    };
    let op = LowRankTrainOp {
        weight,
        scale: scale as f32,
        mask: mask.map(Arc::new),
    };
    let y = x
        .contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    Ok(Some(match linear.bias() {
        Some(bias) => y.broadcast_add(&bias.to_dtype(y.dtype())?)?,
        None => y,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Linear;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        Ok(a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale)))
    }

    /// The fused node gives the output and the gradients of x, A and B that the composition of
    /// candle ops gives, for a quantized and a dense frozen base, with and without a dropout
    /// mask and a bias.
    #[test]
    fn the_fused_node_equals_the_composed_ops() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (m, k, n, r) = (7, 64, 40, 3);
        let w = Tensor::randn(0f32, 0.5, (n, k), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
        let bases = [
            Linear::quantized(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?), None)?,
            Linear::quantized(Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0)?), None)?,
            Linear::dense(w.clone(), None)?,
            Linear::dense(w.clone(), Some(bias))?,
        ];
        let probe = Tensor::randn(0f32, 1.0, (1, m, n), &dev)?;
        for (i, base) in bases.iter().enumerate() {
            for masked in [false, true] {
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, m, k), &dev)?)?;
                let a = Var::from_tensor(&Tensor::randn(0f32, 0.3, (r, k), &dev)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, (n, r), &dev)?)?;
                let mask: Option<Vec<f32>> =
                    masked.then(|| (0..m * k).map(|j| [0.0, 1.25][j % 3 % 2]).collect());
                let scale = 0.75;
                let fused = low_rank_train_forward(base, &x, &a, &b, scale, mask.clone())?
                    .expect("the fused path applies");
                let xm = match &mask {
                    Some(mk) => (x.as_tensor() * Tensor::from_vec(mk.clone(), (1, m, k), &dev)?)?,
                    None => x.as_tensor().clone(),
                };
                let low = xm.broadcast_matmul(&a.as_tensor().t()?)?;
                let up = (low.broadcast_matmul(&b.as_tensor().t()?)? * scale)?;
                let composed = (base.forward(&x)? + up)?;
                let tag = format!("base {i}, mask {masked}");
                let e = max_rel(&fused, &composed)?;
                assert!(e < 1e-5, "{tag}: output differs by {e}");
                let gf = (&fused * &probe)?.sum_all()?.backward()?;
                let gc = (&composed * &probe)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                    let f = gf.get(v).expect("fused gradient");
                    let c = gc.get(v).expect("composed gradient");
                    let e = max_rel(f, c)?;
                    assert!(e < 1e-5, "{tag}: gradient of {name} differs by {e}");
                }
            }
        }
        Ok(())
    }

    /// A trainable base weight or a wrongly sized mask is left to the composed ops.
    #[test]
    fn the_fused_node_declines_what_it_does_not_cover() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        let a = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (4, 2), &dev)?;
        let trainable = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 8), &dev)?)?;
        let base = Linear::dense(trainable.as_tensor().clone(), None)?;
        assert!(low_rank_train_forward(&base, &x, &a, &b, 1.0, None)?.is_none());
        let base = Linear::dense(Tensor::randn(0f32, 1.0, (4, 8), &dev)?, None)?;
        assert!(low_rank_train_forward(&base, &x, &a, &b, 1.0, Some(vec![1.0; 3]))?.is_none());
        assert!(low_rank_train_forward(&base, &x, &a, &b, 1.0, None)?.is_some());
        Ok(())
    }
}
