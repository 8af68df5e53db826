//! Frozen weights as one graph node: `y = x·Wᵀ` with a backward pass for `x` only (`dx = dy·W`),
//! for quantized or dense `W`, without the dense weight ever existing in memory. Its forward is
//! also the prefill path of a quantized [`crate::Linear`] (the tiled GEMM); the low-rank op
//! builds on the same two products.

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};
use flywheel_kernels::Layout;
use std::sync::Arc;

use crate::cpu::SendPtr;
use crate::qmatmul::{dequantize_rows, kernel_matrix, kernel_type, prefill_gemm, slab_rows, TILE};

/// `dx = g·W` (`g` is `(m, n)`, `W` a quantized `(n, k)`, `dx` `(m, k)`), the input gradient
/// of [`prefill_gemm`]: one task per block of `dx` columns (disjoint outputs), each walking down
/// `W` in L2-sized tiles (dequantized by its thread) and accumulating one-thread GEMMs. The tiles
/// depend on the shape only, so the result is the same whatever the thread count.
fn input_gradient_gemm(
    q: &QTensor,
    layout: Layout,
    g: &[f32],
    m: usize,
) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    let (n, k) = q.shape().dims2()?;
    if g.len() != m * n {
        candle_core::bail!("input gradient: {} values for ({m}, {n})", g.len());
    }
    let data = q.data()?;
    let w = kernel_matrix(q, &data, layout).expect("checked by the caller");
    let be = w.ty.block_elems();
    // Columns per task: whole blocks, at least 64; rows per tile: about 64 Ki values.
    let kc = be * 64usize.div_ceil(be);
    let nr = ((64 * 1024) / kc).max(16);
    let mut dx = vec![0f32; m * k];
    let dp = SendPtr(dx.as_mut_ptr());
    (0..k.div_ceil(kc)).into_par_iter().for_each(|t| {
        let c0 = t * kc;
        let cols = kc.min(k - c0);
        let b0 = c0 / be;
        TILE.with(|b| {
            let mut tile = b.borrow_mut();
            let mut r0 = 0;
            while r0 < n {
                let rows = nr.min(n - r0);
                tile.resize(rows * cols, 0.0);
                for (i, out) in tile.chunks_exact_mut(cols).enumerate() {
                    flywheel_kernels::dequantize_row_blocks(&w, r0 + i, b0, out);
                }
                // SAFETY: dx is (m, k) row-major and this task alone writes its columns
                // c0..c0 + cols; g is (m, n), read from column r0 for `rows` columns; the tile
                // is (rows, cols) row-major; dst aliases neither.
                #[allow(unsafe_code)]
                unsafe {
                    gemm::gemm(
                        m,
                        cols,
                        rows,
                        dp.get().add(c0),
                        1,
                        k as isize,
                        r0 > 0,
                        g.as_ptr().add(r0),
                        1,
                        n as isize,
                        tile.as_ptr(),
                        1,
                        cols as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                r0 += rows;
            }
        });
    });
    Ok(dx)
}

/// A frozen weight seen by [`FrozenTrainOp`] and the low-rank training op.
#[derive(Debug, Clone)]
pub(crate) enum FrozenWeight {
    /// Dequantized a slab of rows at a time; its blocks in the given layout.
    Quantized(Arc<QTensor>, Layout),
    /// Used as is.
    Dense(Tensor),
}

impl FrozenWeight {
    /// `g·W` for `g` of shape `(m, n)`, one dequantized slab of rows at a time, in `dtype`.
    fn slab_input_gradient(&self, g: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let mut dx: Option<Tensor> = None;
        self.for_each_slab(dtype, |r0, w| {
            let part = g.narrow(1, r0, w.dim(0)?)?.contiguous()?.matmul(&w)?;
            dx = Some(match dx.take() {
                Some(acc) => (acc + part)?,
                None => part,
            });
            Ok(())
        })?;
        Ok(dx.expect("n >= 1"))
    }

    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            FrozenWeight::Quantized(q, _) => q.shape().dims2(),
            FrozenWeight::Dense(w) => w.dims2(),
        }
    }

    /// Calls `f(r0, rows r0..r1 as a dense tensor)` for row slabs covering the matrix, one slab
    /// alive at a time.
    fn for_each_slab(
        &self,
        dtype: DType,
        mut f: impl FnMut(usize, Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let (n, k) = self.dims()?;
        match self {
            FrozenWeight::Dense(w) => f(0, w.to_dtype(dtype)?),
            FrozenWeight::Quantized(q, layout) => {
                let step = slab_rows(k);
                let mut r0 = 0;
                while r0 < n {
                    let r1 = (r0 + step).min(n);
                    f(r0, dequantize_rows(q, *layout, r0, r1)?.to_dtype(dtype)?)?;
                    r0 = r1;
                }
                Ok(())
            }
        }
    }
}

/// `y = x·Wᵀ` for a frozen `W` (quantized or dense) with a backward pass for `x` only
/// (`dx = dy·W`). A quantized `W` is dequantized a slab of rows at a time in both passes, so the
/// model never exists dense in memory; `W` itself gets no gradient.
#[derive(Debug, Clone)]
pub(crate) struct FrozenTrainOp {
    pub(crate) weight: FrozenWeight,
}

impl FrozenTrainOp {
    fn forward_cpu<T: candle_core::WithDType>(
        &self,
        xs: &[T],
        dims: &[usize],
    ) -> candle_core::Result<(Vec<T>, Vec<usize>)> {
        let (n, k) = self.weight.dims()?;
        let m: usize = dims[..dims.len() - 1].iter().product();
        let x = Tensor::from_slice(xs, (m, k), &candle_core::Device::Cpu)?;
        let mut parts = Vec::new();
        self.weight.for_each_slab(x.dtype(), |_, w| {
            parts.push(x.matmul(&w.t()?)?);
            Ok(())
        })?;
        let y = if parts.len() == 1 {
            parts.into_iter().next().expect("one part")
        } else {
            Tensor::cat(&parts, 1)?
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = n;
        Ok((y.flatten_all()?.to_vec1::<T>()?, shape))
    }
}

impl candle_core::CustomOp1 for FrozenTrainOp {
    fn name(&self) -> &'static str {
        "flywheel-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen linear training op needs a contiguous input")
        };
        let dims = layout.shape().dims();
        let (data, shape) = match storage {
            S::F32(v) => {
                let (y, s) = match &self.weight {
                    FrozenWeight::Quantized(q, wl) if kernel_type(q.dtype()).is_some() => {
                        prefill_gemm(q, *wl, &v[a..b], dims)?
                    }
                    _ => self.forward_cpu(&v[a..b], dims)?,
                };
                (S::F32(y), s)
            }
            S::F64(v) => {
                let (y, s) = self.forward_cpu(&v[a..b], dims)?;
                (S::F64(y), s)
            }
            S::BF16(v) => {
                let (y, s) = self.forward_cpu(&v[a..b], dims)?;
                (S::BF16(y), s)
            }
            S::F16(v) => {
                let (y, s) = self.forward_cpu(&v[a..b], dims)?;
                (S::F16(y), s)
            }
            _ => candle_core::bail!("frozen linear training op: unsupported dtype"),
        };
        Ok((data, shape.into()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, _) = self.weight.dims()?;
        let dims = grad_res.dims();
        let m: usize = dims[..dims.len() - 1].iter().product();
        let g = grad_res.detach().to_dtype(arg.dtype())?.reshape((m, n))?;
        if let FrozenWeight::Quantized(q, layout) = &self.weight {
            if arg.dtype() == DType::F32 && kernel_type(q.dtype()).is_some() {
                let g = g.contiguous()?;
                let dx = input_gradient_gemm(q, *layout, &crate::autograd::ops::host_f32(&g)?, m)?;
                return Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?));
            }
        }
        let dx = self.weight.slab_input_gradient(&g, arg.dtype())?;
        Ok(Some(dx.reshape(arg.shape())?))
    }
}

/// `x·Wᵀ` in f32 for a frozen weight, `x` of shape `dims` (last axis `k`): the tiled GEMM for
/// quantized types flywheel-kernels covers, one GEMM on a dense f32 weight, else slabs.
pub(crate) fn frozen_forward_f32(
    weight: &FrozenWeight,
    x: &[f32],
    dims: &[usize],
) -> candle_core::Result<(Vec<f32>, Vec<usize>)> {
    let (n, k) = weight.dims()?;
    match weight {
        FrozenWeight::Quantized(q, layout) if kernel_type(q.dtype()).is_some() => {
            prefill_gemm(q, *layout, x, dims)
        }
        FrozenWeight::Dense(w) if w.dtype() == DType::F32 && w.device().is_cpu() => {
            let m = x.len() / k.max(1);
            let mut y = vec![0f32; m * n];
            let wv = crate::autograd::ops::host_f32(w)?;
            crate::cpu::mm(&mut y, (m, n, k), (x, 1, k), (&wv, k, 1), 1.0, false);
            let mut shape = dims.to_vec();
            *shape.last_mut().expect("rank >= 1") = n;
            Ok((y, shape))
        }
        _ => FrozenTrainOp {
            weight: weight.clone(),
        }
        .forward_cpu(x, dims),
    }
}

/// `dy·W` in f32 for a frozen `(n, k)` weight and `dy` of `m` rows.
pub(crate) fn frozen_input_gradient_f32(
    weight: &FrozenWeight,
    g: &[f32],
    m: usize,
) -> candle_core::Result<Vec<f32>> {
    let (n, k) = weight.dims()?;
    match weight {
        FrozenWeight::Quantized(q, layout) if kernel_type(q.dtype()).is_some() => {
            input_gradient_gemm(q, *layout, g, m)
        }
        FrozenWeight::Dense(w) if w.dtype() == DType::F32 && w.device().is_cpu() => {
            let mut dx = vec![0f32; m * k];
            let wv = crate::autograd::ops::host_f32(w)?;
            crate::cpu::mm(&mut dx, (m, k, n), (g, 1, n), (&wv, 1, k), 1.0, false);
            Ok(dx)
        }
        _ => {
            let gt = Tensor::from_slice(g, (m, n), &candle_core::Device::Cpu)?;
            weight
                .slab_input_gradient(&gt, DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    #[test]
    fn tiled_gemms_equal_the_dequantized_matmuls() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // A partial column block (k = 96 is 64 + 32), several row tiles (n > 1024), a K type.
        for (dt, n, k) in [
            (GgmlDType::Q8_0, 1100, 96),
            (GgmlDType::Q4_0, 40, 160),
            (GgmlDType::Q4K, 24, 512),
        ] {
            let q = QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev)?, dt)?;
            let w = q.dequantize(&dev)?;
            let m = 5;
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let xs = x.flatten_all()?.to_vec1()?;
            let (y, shape) = prefill_gemm(&q, Layout::Ggml, &xs, &[m, k])?;
            assert_eq!(shape, [m, n]);
            let want = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let g = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
            let gs = g.flatten_all()?.to_vec1()?;
            let dx = input_gradient_gemm(&q, Layout::Ggml, &gs, m)?;
            if dt != GgmlDType::Q4K {
                // The same blocks repacked give the same bits.
                let r = crate::packed::repack(&q)?;
                assert_eq!(
                    prefill_gemm(&r, Layout::Rows4, &xs, &[m, k])?.0,
                    y,
                    "{dt:?}"
                );
                assert_eq!(
                    input_gradient_gemm(&r, Layout::Rows4, &gs, m)?,
                    dx,
                    "{dt:?}"
                );
            }
            let want_dx = g.matmul(&w)?.flatten_all()?.to_vec1::<f32>()?;
            for (got, want) in [(&y, &want), (&dx, &want_dx)] {
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(want.iter())
                    .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{dt:?} ({n}, {k}): off by {worst}");
            }
        }
        Ok(())
    }
}
