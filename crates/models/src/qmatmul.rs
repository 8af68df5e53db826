//! Quantized matrices on the CPU: the flywheel-kernels view of a GGUF tensor, rows dequantized
//! on demand, and the tiled prefill GEMM that multiplies by a quantized weight without the
//! dense weight ever existing.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use flywheel_kernels::Layout;

use crate::cpu::SendPtr;

/// A 2-D quantized `q` of a type flywheel-kernels covers, its blocks (`data`, from `q.data()`) in
/// `layout`, as the kernels read it.
pub(crate) fn kernel_matrix<'a>(
    q: &QTensor,
    data: &'a [u8],
    layout: Layout,
) -> Option<flywheel_kernels::QMatrix<'a>> {
    let (n, k) = q.shape().dims2().ok()?;
    Some(flywheel_kernels::QMatrix {
        ty: kernel_type(q.dtype())?,
        data,
        n,
        k,
        layout,
    })
}

/// The flywheel-kernels block type of a GGUF type, if the kernels cover it.
pub(crate) fn kernel_type(t: GgmlDType) -> Option<flywheel_kernels::BlockType> {
    match t {
        GgmlDType::Q4_0 => Some(flywheel_kernels::BlockType::Q4_0),
        GgmlDType::Q4_1 => Some(flywheel_kernels::BlockType::Q4_1),
        GgmlDType::Q5_0 => Some(flywheel_kernels::BlockType::Q5_0),
        GgmlDType::Q5_1 => Some(flywheel_kernels::BlockType::Q5_1),
        GgmlDType::Q8_0 => Some(flywheel_kernels::BlockType::Q8_0),
        GgmlDType::Q4K => Some(flywheel_kernels::BlockType::Q4K),
        GgmlDType::Q5K => Some(flywheel_kernels::BlockType::Q5K),
        GgmlDType::Q6K => Some(flywheel_kernels::BlockType::Q6K),
        _ => None,
    }
}

/// Rows of a quantized weight dequantized per slab (about 4 MiB of f32 at a time).
pub(crate) fn slab_rows(k: usize) -> usize {
    (1usize << 20).div_ceil(k.max(1)).max(1)
}

/// Rows `r0..r1` of a quantized `(n, k)` matrix in `layout` as a dense f32 `(r1 - r0, k)`
/// tensor.
pub(crate) fn dequantize_rows(
    q: &QTensor,
    layout: Layout,
    r0: usize,
    r1: usize,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let (_, k) = q.shape().dims2()?;
    let data = q.data()?;
    if let Some(w) = kernel_matrix(q, &data, layout) {
        let mut out = vec![0f32; (r1 - r0) * k];
        out.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
            flywheel_kernels::dequantize_row_blocks(&w, r0 + i, 0, row);
        });
        return Tensor::from_vec(out, (r1 - r0, k), &candle_core::Device::Cpu);
    }
    let ty = q.dtype();
    let row_bytes = k / ty.block_size() * ty.type_size();
    let slab = candle_core::quantized::ggml_file::qtensor_from_ggml(
        ty,
        &data[r0 * row_bytes..r1 * row_bytes],
        vec![r1 - r0, k],
        &candle_core::Device::Cpu,
    )?;
    slab.dequantize(&candle_core::Device::Cpu)
}

/// `y = x·Wᵀ` in f32 for a quantized `W` of a type flywheel-kernels covers, without the dense
/// `W` ever existing: tasks of [`tile_rows`] weight rows, each dequantized by its thread into an
/// L2-sized buffer and multiplied by a one-thread GEMM into its own columns of `y`. (One 4 MiB
/// slab at a time under a threaded GEMM moved every weight through L3 or memory three times,
/// which made prefills of 16–64 positions dequantization-bound: 32 positions of Qwen2.5-0.5B
/// ran at 50 tok/s, now 90.)
pub(crate) fn prefill_gemm(
    q: &QTensor,
    layout: Layout,
    x: &[f32],
    dims: &[usize],
) -> candle_core::Result<(Vec<f32>, Vec<usize>)> {
    use rayon::prelude::*;
    let (n, k) = q.shape().dims2()?;
    let m: usize = dims[..dims.len() - 1].iter().product();
    if x.len() != m * k {
        candle_core::bail!("prefill GEMM: input of {} values for ({m}, {k})", x.len());
    }
    let data = q.data()?;
    let w = kernel_matrix(q, &data, layout).expect("checked by the caller");
    let step = tile_rows(k).min(n);
    let mut y = vec![0f32; m * n];
    let yp = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(step)).into_par_iter().for_each(|t| {
        let r0 = t * step;
        let rows = step.min(n - r0);
        TILE.with(|b| {
            let mut slab = b.borrow_mut();
            slab.resize(rows * k, 0.0);
            for (i, row) in slab.chunks_exact_mut(k).enumerate() {
                flywheel_kernels::dequantize_row_blocks(&w, r0 + i, 0, row);
            }
            // SAFETY: y is (m, n) row-major and this task alone writes its columns
            // r0..r0 + rows; x is (m, k); the slab holds `rows` rows of k, read as the
            // (k, rows) right-hand side; dst aliases neither.
            #[allow(unsafe_code)]
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    yp.get().add(r0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    slab.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    });
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    Ok((y, shape))
}

/// Weight rows per task of [`prefill_gemm`]: about 256 KiB of f32, so a task's
/// dequantized rows stay in L2 while the GEMM packs and reads them; a multiple of 16 rows. It
/// depends on `k` only, so the split (and every result) is the same whatever the thread count.
pub(crate) fn tile_rows(k: usize) -> usize {
    ((64 * 1024) / k.max(1) / 16 * 16).max(16)
}

thread_local! {
    /// Each pool thread's buffer of dequantized weight rows.
    pub(crate) static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}
