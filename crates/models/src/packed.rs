//! Quantized weights repacked at load for the decode kernels ([`Layout::Rows4`]: four rows'
//! blocks side by side, scales together). The repacked bytes live in a candle `QTensor` whose
//! storage knows the layout: candle's own paths through it (the reference matmul, dequantize,
//! embedding lookups) unpack to ggml's layout first and so compute exactly what candle computes
//! on the original, while flywheel's kernels read the repacked bytes in place. The original is
//! dropped, so a repacked model takes no more memory than the file's blocks.

use crate::qmatmul::kernel_type;
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Device};
use flywheel_kernels::{BlockType, Layout};
use half::f16;
use std::borrow::Cow;

/// Whether `FLYWHEEL_REPACK` allows repacking (unset, or anything but `0`, `off`, `false`).
pub fn repack_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("FLYWHEEL_REPACK").ok().as_deref(),
            Some("0" | "off" | "false")
        )
    })
}

/// The layout a quantized `(n, k)` weight is best kept in on this CPU: [`Layout::Rows4`] for a
/// CPU tensor of a type whose decode kernels read it faster (see
/// [`flywheel_kernels::prefers_rows4`]) with at least one group of four rows, unless
/// `FLYWHEEL_REPACK=0`; ggml's layout otherwise.
pub(crate) fn preferred_layout(q: &QTensor) -> Layout {
    let dims = q.shape().dims();
    if dims.len() != 2 {
        return Layout::Ggml;
    }
    preferred_layout_for(q.dtype(), &q.device(), dims[0])
}

/// [`preferred_layout`] for a `rows`-row matrix of `dtype` on `device`.
pub(crate) fn preferred_layout_for(dtype: GgmlDType, device: &Device, rows: usize) -> Layout {
    match kernel_type(dtype) {
        Some(ty)
            if device.is_cpu()
                && rows >= 4
                && flywheel_kernels::prefers_rows4(ty)
                && repack_enabled() =>
        {
            Layout::Rows4
        }
        _ => Layout::Ggml,
    }
}

/// `q` (a CPU `(n, k)` tensor in ggml's layout, of a type with a Rows4 layout) repacked.
pub(crate) fn repack(q: &QTensor) -> candle_core::Result<QTensor> {
    if !q.device().is_cpu() {
        candle_core::bail!("only CPU tensors are repacked");
    }
    let (n, k) = q.shape().dims2()?;
    from_ggml_bytes(q.dtype(), q.data()?.into_owned(), n, k)
}

/// A CPU `(n, k)` tensor of `dtype` from its blocks in ggml's layout (`bytes`), repacked in
/// place into [`Layout::Rows4`] (no second copy of the matrix).
pub(crate) fn from_ggml_bytes(
    dtype: GgmlDType,
    mut bytes: Vec<u8>,
    n: usize,
    k: usize,
) -> candle_core::Result<QTensor> {
    let ty = kernel_type(dtype)
        .filter(|&t| flywheel_kernels::has_rows4(t))
        .ok_or_else(|| candle_core::Error::Msg(format!("{dtype:?} has no Rows4 layout")))?;
    if n == 0
        || !k.is_multiple_of(ty.block_elems())
        || bytes.len() != n * (k / ty.block_elems()) * ty.block_bytes()
    {
        candle_core::bail!(
            "{} bytes are not a ({n}, {k}) {dtype:?} matrix",
            bytes.len()
        );
    }
    flywheel_kernels::pack_rows4_in_place(ty, &mut bytes, n);
    let storage = PackedRows4 {
        ty,
        dtype,
        data: bytes,
        n,
        k,
    };
    QTensor::new(QStorage::Cpu(Box::new(storage)), (n, k))
}

/// A `(n, k)` matrix of a 32-element block type in [`Layout::Rows4`], as candle storage.
struct PackedRows4 {
    ty: BlockType,
    dtype: GgmlDType,
    data: Vec<u8>,
    n: usize,
    k: usize,
}

impl PackedRows4 {
    /// The same blocks in ggml's layout, as candle's own storage of the type.
    fn ggml(&self) -> candle_core::Result<Box<dyn QuantizedType>> {
        let bytes = flywheel_kernels::unpack_rows4(self.ty, &self.data, self.n);
        match QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, self.dtype)? {
            QStorage::Cpu(s) => Ok(s),
            _ => candle_core::bail!("CPU storage expected"),
        }
    }

    /// Applies `f` to the blocks in ggml's layout (candle's storage of the type), then repacks
    /// the result into `self`.
    fn update(&mut self, f: impl FnOnce(&mut dyn QuantizedType)) {
        let mut g = self.ggml().expect("repacked blocks unpack");
        f(g.as_mut());
        // SAFETY: `as_ptr` and `storage_size_in_bytes` describe `g`'s own initialised blocks.
        #[allow(unsafe_code)]
        let bytes = unsafe { std::slice::from_raw_parts(g.as_ptr(), g.storage_size_in_bytes()) };
        self.data = flywheel_kernels::pack_rows4(self.ty, bytes, self.n);
    }
}

impl QuantizedType for PackedRows4 {
    fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    fn matmul_t(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        self.ggml()?.matmul_t(mkn, lhs, dst)
    }

    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f16],
        dst: &mut [f16],
    ) -> candle_core::Result<()> {
        self.ggml()?.matmul_t_f16(mkn, lhs, dst)
    }

    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        self.ggml()?.embedding(ids, rows, hidden)
    }

    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        if elem_count != self.n * self.k {
            candle_core::bail!(
                "dequantize: {elem_count} elements of a ({}, {}) matrix",
                self.n,
                self.k
            );
        }
        self.ggml()?.dequantize(elem_count)
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }

    fn block_size(&self) -> usize {
        self.ty.block_elems()
    }

    fn from_float(&mut self, xs: &[f32]) {
        self.update(|g| g.from_float(xs))
    }

    fn from_float_imatrix(&mut self, xs: &[f32], imatrix_weights: &[f32], n_per_row: usize) {
        self.update(|g| g.from_float_imatrix(xs, imatrix_weights, n_per_row))
    }

    fn size(&self) -> usize {
        self.data.len()
    }
}
