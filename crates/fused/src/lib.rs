//! flywheel-fused: candle ops that run as one CUDA kernel of our own (`kernels/cuda`), each with
//! a plain CPU implementation of the same function, so the CPU build, CI and the tests on the
//! GPU all check one specification against candle's reference composition.
//!
//! - [`lora_bgmv`]: the LoRA update for a batch whose rows use different adapters.
#![deny(missing_docs)]

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The row index that means "no adapter" in [`lora_bgmv`]'s `idx`.
pub const NO_ADAPTER: u32 = u32::MAX;

/// The largest rank [`lora_bgmv`] takes (the CUDA kernel's shared buffer).
pub const MAX_RANK: usize = 256;

/// Per-row low-rank update of a mixed-adapter batch (BGMV):
/// `out[t] = scales[g] · Σ_j (down[g, j] · z[t]) · up[g, j]` with `g = idx[t]`, and zeros for
/// rows whose `idx` is [`NO_ADAPTER`].
///
/// `z`: `(T, n_in)`; `down`: `(G, r, n_in)`; `up`: `(G, r, n_out)`, all of one float dtype;
/// `scales`: `(G,)` f32; `idx`: `(T,)` u32, each below `G` or [`NO_ADAPTER`] (on the CPU an index
/// out of range is an error; the GPU cannot check without a sync and treats it as no adapter).
/// The result is `(T, n_out)` in `z`'s dtype, with f32
/// accumulation. For LoRA's forward pass `down` is the stacked `A` and `up` the stacked `Bᵀ`
/// (adapters of lower rank padded with zero rows); the input gradient is the same op with
/// `down = Bᵀ`, `up = A` and `z = dy`.
pub fn lora_bgmv(
    z: &Tensor,
    down: &Tensor,
    up: &Tensor,
    scales: &Tensor,
    idx: &Tensor,
) -> Result<Tensor> {
    let (t, n_in) = z.dims2()?;
    let (g, r, d_in) = down.dims3()?;
    let (g2, r2, _) = up.dims3()?;
    if d_in != n_in || g2 != g || r2 != r {
        candle_core::bail!(
            "lora_bgmv: z {:?}, down {:?} and up {:?} do not fit together",
            z.dims(),
            down.dims(),
            up.dims()
        );
    }
    if r > MAX_RANK {
        candle_core::bail!("lora_bgmv: rank {r} is over the largest supported, {MAX_RANK}");
    }
    if down.dtype() != z.dtype() || up.dtype() != z.dtype() {
        candle_core::bail!(
            "lora_bgmv: z, down and up must share a dtype ({:?}, {:?}, {:?})",
            z.dtype(),
            down.dtype(),
            up.dtype()
        );
    }
    if scales.dims1()? != g || scales.dtype() != DType::F32 {
        candle_core::bail!("lora_bgmv: scales must be ({g},) f32");
    }
    if idx.dims1()? != t || idx.dtype() != DType::U32 {
        candle_core::bail!("lora_bgmv: idx must be ({t},) u32");
    }
    let op = Bgmv {
        scales: scales.contiguous()?,
        idx: idx.contiguous()?,
    };
    z.contiguous()?
        .apply_op3_no_bwd(&down.contiguous()?, &up.contiguous()?, &op)
}

struct Bgmv {
    scales: Tensor,
    idx: Tensor,
}

/// A contiguous CPU tensor's elements as f32.
fn cpu_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("lora_bgmv: input not contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("lora_bgmv: unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp3 for Bgmv {
    fn name(&self) -> &'static str {
        "lora-bgmv"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, n_in) = zl.shape().dims2()?;
        let (_, r, n_out) = ul.shape().dims3()?;
        let (z, down, up) = (cpu_f32(zs, zl)?, cpu_f32(ds, dl)?, cpu_f32(us, ul)?);
        let scales = self.scales.to_vec1::<f32>()?;
        let idx = self.idx.to_vec1::<u32>()?;
        let mut out = vec![0f32; t * n_out];
        let mut v = vec![0f32; r];
        for (row, (o, &g)) in out.chunks_mut(n_out).zip(&idx).enumerate() {
            if g == NO_ADAPTER {
                continue;
            }
            let g = g as usize;
            if g >= scales.len() {
                candle_core::bail!("lora_bgmv: row {row} names adapter {g} of {}", scales.len());
            }
            let zt = &z[row * n_in..(row + 1) * n_in];
            for (j, vj) in v.iter_mut().enumerate() {
                let d = &down[(g * r + j) * n_in..(g * r + j + 1) * n_in];
                *vj = zt.iter().zip(d).map(|(a, b)| a * b).sum::<f32>() * scales[g];
            }
            for (j, vj) in v.iter().enumerate() {
                let u = &up[(g * r + j) * n_out..(g * r + j + 1) * n_out];
                for (ov, uv) in o.iter_mut().zip(u) {
                    *ov += vj * uv;
                }
            }
        }
        let shape = Shape::from((t, n_out));
        Ok(match zs.dtype() {
            DType::F32 => (CpuStorage::F32(out), shape),
            DType::BF16 => (
                CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
                shape,
            ),
            _ => (
                CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
                shape,
            ),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bgmv(self, zs, zl, ds, dl, us, ul)
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launches and uninitialised device buffers are FFI
mod cuda {
    //! The launch of `kernels/cuda/lora.cu`.
    use super::Bgmv;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));

    fn part<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("lora_bgmv: input not contiguous".into()))?;
        Ok(s.slice(a..b))
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        name: &str,
        dev: &candle_core::CudaDevice,
        (z, zl): (&CudaSlice<T>, &Layout),
        (d, dl): (&CudaSlice<T>, &Layout),
        (u, ul): (&CudaSlice<T>, &Layout),
        scales: &CudaView<'_, f32>,
        idx: &CudaView<'_, u32>,
    ) -> Result<CudaSlice<T>> {
        let (t, n_in) = zl.shape().dims2()?;
        let (g, r, n_out) = ul.shape().dims3()?;
        let func = dev.get_or_load_custom_func(name, "flywheel_lora", PTX)?;
        // SAFETY: every element is written by the kernel (zeros for rows without an adapter).
        let out = unsafe { dev.alloc::<T>(t * n_out)? };
        let (z, d, u) = (part(z, zl)?, part(d, dl)?, part(u, ul)?);
        let (n_in, n_out, r, g) = (n_in as i32, n_out as i32, r as i32, g as i32);
        let mut b = func.builder();
        b.arg(&z);
        b.arg(&d);
        b.arg(&u);
        b.arg(scales);
        b.arg(idx);
        b.arg(&out);
        b.arg(&n_in);
        b.arg(&n_out);
        b.arg(&r);
        b.arg(&g);
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature; the shapes were checked.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    pub(super) fn bgmv(
        op: &Bgmv,
        zs: &CudaStorage,
        zl: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = zs.device.clone();
        let (scales_s, scales_l) = op.scales.storage_and_layout();
        let (idx_s, idx_l) = op.idx.storage_and_layout();
        let (Storage::Cuda(scales), Storage::Cuda(idx)) = (&*scales_s, &*idx_s) else {
            candle_core::bail!("lora_bgmv: scales and idx must be on the GPU with z");
        };
        let scales = part(scales.as_cuda_slice::<f32>()?, scales_l)?;
        let idx = part(idx.as_cuda_slice::<u32>()?, idx_l)?;
        let (t, _) = zl.shape().dims2()?;
        let (_, _, n_out) = ul.shape().dims3()?;
        use CudaStorageSlice as S;
        macro_rules! run {
            ($variant:ident, $name:literal, $z:ident, $d:ident, $u:ident) => {
                S::$variant(launch(
                    $name,
                    &dev,
                    ($z, zl),
                    ($d, dl),
                    ($u, ul),
                    &scales,
                    &idx,
                )?)
            };
        }
        let slice = match (&zs.slice, &ds.slice, &us.slice) {
            (S::F32(z), S::F32(d), S::F32(u)) => run!(F32, "lora_bgmv_f32", z, d, u),
            (S::BF16(z), S::BF16(d), S::BF16(u)) => run!(BF16, "lora_bgmv_bf16", z, d, u),
            (S::F16(z), S::F16(d), S::F16(u)) => run!(F16, "lora_bgmv_f16", z, d, u),
            _ => candle_core::bail!("lora_bgmv: z, down and up must be f32, bf16 or f16 alike"),
        };
        Ok((CudaStorage { slice, device: dev }, Shape::from((t, n_out))))
    }
}

#[cfg(test)]
mod tests;
