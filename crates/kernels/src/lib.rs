//! flywheel-kernels: matrix products with GGUF block-quantized weights on the CPU.
//!
//! The arithmetic follows llama.cpp's CPU backend, so greedy outputs agree with it: each
//! activation row is quantized once per call to the weight type's "vec-dot" type — Q8_0 for
//! Q4_0 / Q5_0 / Q8_0, Q8_1 (with an `f16(d · Σq)` sum term) for Q4_1 / Q5_1, and Q8_K (256
//! elements, f32 scale, sums of each 16) for the K-quants Q4_K / Q5_K / Q6_K — with
//! round-half-to-even; then each output is a sum over blocks of integer dot products scaled in
//! f32. AVX2+FMA+F16C is used when the CPU has it (checked at run time); a scalar path does the
//! same integer arithmetic everywhere else and is the oracle in tests. On a CPU with VNNI
//! (AVX-VNNI or AVX-512 VNNI) the 32-element types run four weight rows per pass with
//! `vpdpbusd`, one pass per activation row; their results are bit-identical to the AVX2
//! kernels'. Those types can also be repacked at load ([`Layout::Rows4`], [`pack_rows4`]): four
//! rows' blocks side by side with their scales together, which the VNNI kernels read as one
//! stream. On aarch64 the NEON kernels (`sdot` where the CPU has the dot-product extension)
//! equal the scalar path bit for bit.
//!
//! For prefill with K-quant weights, [`gemm_k`] is an integer GEMM for CPUs with AVX-512 VNNI:
//! sixteen weight rows in the lanes of a register, eight activation rows per pass, each output
//! the scalar path's bits.
//!
//! Output columns (weight rows) run in parallel on rayon in contiguous ranges; every output value
//! is computed by the same code whatever the range, so results do not depend on the thread count.
//!
//! Block layouts (ggml), `d`/`m`/`dmin` are f16:
//! - Q4_0 `{d, qs[16]}` (value = (nibble − 8)·d); Q4_1 `{d, m, qs[16]}` (nibble·d + m);
//!   byte j holds element j in its low nibble and element j + 16 in its high nibble.
//! - Q5_0 `{d, qh: u32, qs[16]}` (value = (nibble | bit·16 − 16)·d, bit j of qh is element j's
//!   fifth bit); Q5_1 `{d, m, qh, qs[16]}` (value = (nibble | bit·16)·d + m).
//! - Q8_0 `{d, qs: [i8; 32]}`.
//! - Q4_K `{d, dmin, scales[12], qs[128]}`: 8 sub-blocks of 32 with 6-bit scale and min; value =
//!   d·sc·q − dmin·m. Q5_K `{d, dmin, scales[12], qh[32], qs[128]}`: the same with a fifth bit.
//! - Q6_K `{ql[128], qh[64], scales: [i8; 16], d}`: 16 sub-blocks of 16, value = d·sc·(q − 32).
#![deny(missing_docs)]

use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
mod arm;
mod f32ops;
#[cfg(target_arch = "x86_64")]
mod gemm_k;
mod quant;
mod rows4;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(test)]
use f32ops::attention_head_scalar;
pub use f32ops::{attention_head, attention_head_within, axpy_f32, dot_f32};
pub(crate) use quant::{quantize_row, quantize_row_k, Q8Block, Q8KBlock};
use rows4::fields32;
pub use rows4::{has_rows4, pack_rows4, pack_rows4_in_place, prefers_rows4, unpack_rows4};

/// Const-generic tags of the 32-element types and their block structure, shared by the SIMD
/// kernels and the [`Layout::Rows4`] repacking.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) mod tag {
    use crate::BlockType;

    /// Q4_0.
    pub(crate) const Q4_0: u8 = 0;
    /// Q4_1.
    pub(crate) const Q4_1: u8 = 1;
    /// Q5_0.
    pub(crate) const Q5_0: u8 = 2;
    /// Q5_1.
    pub(crate) const Q5_1: u8 = 3;
    /// Q8_0.
    pub(crate) const Q8_0: u8 = 4;

    /// The tag of a 32-element type (Q8_0's for any other).
    pub(crate) fn of(ty: BlockType) -> u8 {
        match ty {
            BlockType::Q4_0 => Q4_0,
            BlockType::Q4_1 => Q4_1,
            BlockType::Q5_0 => Q5_0,
            BlockType::Q5_1 => Q5_1,
            _ => Q8_0,
        }
    }

    /// The byte widths of a block's fields in ggml order: scale (and minimum), fifth bits,
    /// quants.
    pub(crate) const fn fields(t: u8) -> [usize; 3] {
        match t {
            Q4_0 => [2, 0, 16],
            Q4_1 => [4, 0, 16],
            Q5_0 => [2, 4, 16],
            Q5_1 => [4, 4, 16],
            _ => [2, 0, 32],
        }
    }

    /// Bytes per block of the tagged type.
    pub(crate) const fn block_bytes(t: u8) -> usize {
        let f = fields(t);
        f[0] + f[1] + f[2]
    }

    /// Types with a per-block minimum (unsigned values, Q8_1 activations).
    pub(crate) const fn has_min(t: u8) -> bool {
        matches!(t, Q4_1 | Q5_1)
    }
}

/// Elements per block of the 32-element types.
pub const QK: usize = 32;
/// Elements per block of the K-quant types.
pub const QK_K: usize = 256;

/// The block types these kernels implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockType {
    /// 4-bit, symmetric (18 bytes a block of 32).
    Q4_0,
    /// 4-bit with a per-block minimum (20 bytes a block of 32).
    Q4_1,
    /// 5-bit, symmetric (22 bytes a block of 32).
    Q5_0,
    /// 5-bit with a per-block minimum (24 bytes a block of 32).
    Q5_1,
    /// 8-bit, symmetric (34 bytes a block of 32).
    Q8_0,
    /// 4-bit K-quant (144 bytes a block of 256).
    Q4K,
    /// 5-bit K-quant (176 bytes a block of 256).
    Q5K,
    /// 6-bit K-quant (210 bytes a block of 256).
    Q6K,
}

/// Every block type, for tests and listings.
pub const ALL_TYPES: [BlockType; 8] = [
    BlockType::Q4_0,
    BlockType::Q4_1,
    BlockType::Q5_0,
    BlockType::Q5_1,
    BlockType::Q8_0,
    BlockType::Q4K,
    BlockType::Q5K,
    BlockType::Q6K,
];

impl BlockType {
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            QK
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q5_0 => 22,
            BlockType::Q5_1 => 24,
            BlockType::Q8_0 => 34,
            BlockType::Q4K => 144,
            BlockType::Q5K => 176,
            BlockType::Q6K => 210,
        }
    }

    /// Whether this is a 256-element K-quant.
    pub fn is_k(self) -> bool {
        matches!(self, BlockType::Q4K | BlockType::Q5K | BlockType::Q6K)
    }

    /// Whether the activation blocks carry the `d·Σq` term (types with a minimum).
    fn with_sum(self) -> bool {
        matches!(self, BlockType::Q4_1 | BlockType::Q5_1)
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
fn have_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAVE.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The VNNI flavour the CPU has, if any (with AVX2, FMA and F16C).
#[cfg(target_arch = "x86_64")]
fn have_vnni() -> Option<x86::Vnni> {
    static HAVE: std::sync::OnceLock<Option<x86::Vnni>> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        if !have_avx2() {
            None
        } else if is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512f")
        {
            Some(x86::Vnni::Avx512)
        } else if is_x86_feature_detected!("avxvnni") {
            Some(x86::Vnni::Avx)
        } else {
            None
        }
    })
}

/// Which implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The best the CPU supports.
    Auto,
    /// The baseline SIMD set without its optional extensions, to compare the two in tests:
    /// AVX2 without the VNNI row kernels on x86-64 (the scalar path where the CPU lacks AVX2),
    /// NEON without the dot-product instructions on aarch64.
    Baseline,
    /// The portable scalar code (the oracle for the SIMD path).
    Scalar,
}

/// The name of the implementation [`Path::Auto`] picks on this CPU (for `flywheel info`/benches).
pub fn auto_path_name() -> &'static str {
    #[cfg(target_arch = "aarch64")]
    {
        if arm::have_dotprod() {
            "neon+dotprod"
        } else {
            "neon"
        }
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        #[cfg(target_arch = "x86_64")]
        match have_vnni() {
            Some(x86::Vnni::Avx) => return "avx2+fma+f16c+avxvnni",
            Some(x86::Vnni::Avx512) => return "avx2+fma+f16c+avx512vnni",
            None => {}
        }
        if have_avx2() {
            "avx2+fma+f16c"
        } else {
            "scalar"
        }
    }
}

/// How the blocks of a [`QMatrix`] are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// ggml's: row after row, each row's blocks in order.
    #[default]
    Ggml,
    /// The 32-element types repacked for the decode kernels ([`pack_rows4`]): rows in groups of
    /// four, and for each block index the four rows' scales side by side, then their fifth bits
    /// (Q5), then their quants. The `n % 4` rows after the last whole group keep ggml's layout.
    /// A group of four rows takes the bytes of four ggml rows, so row ranges that start at a
    /// multiple of four are byte ranges as in ggml's layout.
    Rows4,
}

/// A quantized `(n, k)` weight matrix: `n` rows of `k / block_elems` blocks.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    /// Block type.
    pub ty: BlockType,
    /// The raw blocks, in `layout`.
    pub data: &'a [u8],
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features), a multiple of the block's element count.
    pub k: usize,
    /// How `data` is laid out.
    pub layout: Layout,
}

impl<'a> QMatrix<'a> {
    /// A matrix in ggml's layout.
    pub fn ggml(ty: BlockType, data: &'a [u8], n: usize, k: usize) -> Self {
        Self {
            ty,
            data,
            n,
            k,
            layout: Layout::Ggml,
        }
    }

    /// Bytes per row (a group of four rows in [`Layout::Rows4`] takes four times this).
    pub fn row_bytes(&self) -> usize {
        self.k / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// Rows stored in whole groups of four ([`Layout::Rows4`]); 0 in ggml's layout.
    pub fn packed_rows(&self) -> usize {
        match self.layout {
            Layout::Ggml => 0,
            Layout::Rows4 => self.n / 4 * 4,
        }
    }

    /// Where field `f` (see `fields32`) of block `b` of row `r` starts in `data`.
    fn field_at(&self, r: usize, b: usize, f: usize) -> usize {
        let (rb, bb) = (self.row_bytes(), self.ty.block_bytes());
        let fl = fields32(self.ty);
        let before: usize = fl[..f].iter().sum();
        if r < self.packed_rows() {
            (r / 4) * 4 * rb + b * 4 * bb + 4 * before + (r % 4) * fl[f]
        } else {
            r * rb + b * bb + before
        }
    }

    /// Block `b` of row `r` in ggml's layout: a slice of `data`, or gathered into `buf`.
    fn block<'b>(&'b self, r: usize, b: usize, buf: &'b mut [u8; 34]) -> &'b [u8] {
        let bb = self.ty.block_bytes();
        if r >= self.packed_rows() {
            let at = r * self.row_bytes() + b * bb;
            return &self.data[at..at + bb];
        }
        let mut o = 0;
        for (f, len) in fields32(self.ty).into_iter().enumerate() {
            let at = self.field_at(r, b, f);
            buf[o..o + len].copy_from_slice(&self.data[at..at + len]);
            o += len;
        }
        &buf[..bb]
    }

    /// Row `r` in ggml's layout: a slice of `data`, or gathered into `buf`.
    fn row<'b>(&'b self, r: usize, buf: &'b mut Vec<u8>) -> &'b [u8] {
        let rb = self.row_bytes();
        if r >= self.packed_rows() {
            return &self.data[r * rb..(r + 1) * rb];
        }
        buf.clear();
        let mut blk = [0u8; 34];
        for b in 0..self.k / self.ty.block_elems() {
            let bytes = self.block(r, b, &mut blk);
            buf.extend_from_slice(bytes);
        }
        buf
    }
}

/// One weight row times one activation row.
pub(crate) type RowDot<A> = fn(&[u8], &[A]) -> f32;
/// One weight row times four activation rows (bit-identical to four [`RowDot`]s).
pub(crate) type RowDot4<A> = fn(&[u8], [&[A]; 4]) -> [f32; 4];

/// Many weight rows times one activation row (see `x86::rows32`): the weight bytes, how many of
/// their rows are in [`Layout::Rows4`] groups (the rest follow in ggml's layout), the
/// activation blocks, their lane sums, the outputs and their stride (row `r`'s value goes to
/// `out[r · stride]`; `out.len().div_ceil(stride)` rows).
pub(crate) type Rows32 = fn(&[u8], usize, &[Q8Block], &[[i32; 8]], &mut [f32], usize);

/// The row kernels of one weight matrix.
#[derive(Clone, Copy)]
enum Kern {
    /// A 32-element type on Q8_0/Q8_1 activations, with a many-rows kernel for one activation
    /// row where the CPU has VNNI.
    B32(RowDot<Q8Block>, Option<RowDot4<Q8Block>>, Option<Rows32>),
    /// A K-quant on Q8_K activations.
    K(RowDot<Q8KBlock>, Option<RowDot4<Q8KBlock>>),
}

/// The kernels for `ty` in `layout` with `m` activation rows on this CPU: the SIMD ones unless
/// `path` is [`Path::Scalar`] (or the CPU lacks them); the optional extensions (the VNNI row
/// kernels, `sdot`) only with [`Path::Auto`].
fn kern_for(ty: BlockType, layout: Layout, path: Path, m: usize) -> Kern {
    #[cfg(target_arch = "x86_64")]
    if path != Path::Scalar && have_avx2() {
        return if ty.is_k() {
            Kern::K(x86::dot_k(ty), None)
        } else {
            let (d, d4) = x86::dots32(ty);
            // The VNNI row kernels serve one activation row (decode) in either layout, and
            // several rows of a repacked weight (one pass per activation row over L1-sized
            // chunks): bit for bit what the AVX2 kernels give. On ggml's layout the AVX2
            // four-row kernel is as fast or faster for several rows (BENCHMARKS.md).
            let vnni = path == Path::Auto && (m == 1 || layout == Layout::Rows4);
            Kern::B32(d, d4, if vnni { x86_rows32(ty) } else { None })
        };
    }
    #[cfg(target_arch = "aarch64")]
    if path != Path::Scalar {
        let dotprod = path == Path::Auto && arm::have_dotprod();
        return if ty.is_k() {
            let (d, d4) = arm::dots_k(ty, dotprod);
            Kern::K(d, Some(d4))
        } else {
            let (d, d4) = arm::dots32(ty, dotprod);
            Kern::B32(d, Some(d4), None)
        };
    }
    let _ = (layout, path, m);
    if ty.is_k() {
        Kern::K(scalar_k_dot(ty), None)
    } else {
        Kern::B32(scalar_dot32(ty), None, None)
    }
}

/// Each activation block's sums of four consecutive values (the i32 lanes of a `vpdpbusd`),
/// which turn the unsigned weight bytes of the VNNI kernels back into signed values.
fn lane_sums(xq: &[Q8Block], out: &mut Vec<[i32; 8]>) {
    out.clear();
    out.extend(
        xq.iter().map(|b| {
            std::array::from_fn(|j| b.qs[4 * j..4 * j + 4].iter().map(|&q| q as i32).sum())
        }),
    );
}

/// One product of a [`matmul_many`] call: a weight matrix and where `x·Wᵀ` goes (`m × n`,
/// row-major).
pub struct Product<'a> {
    /// The weight.
    pub w: QMatrix<'a>,
    /// The output, `m × w.n`.
    pub out: &'a mut [f32],
}

/// `out[i, j] = Σ_k x[i, k] · W[j, k]` for `x` of shape `(m, k)`. Panics if the slices do not
/// fit the shapes (callers check shapes at load time).
pub fn matmul(w: QMatrix<'_>, x: &[f32], m: usize, out: &mut [f32], path: Path) {
    matmul_many(&mut [Product { w, out }], x, m, path)
}

/// Products per [`matmul_many`] pass (a layer's q/k/v is three); more are done in groups.
const MAX_PRODUCTS: usize = 4;

/// Per-thread buffers of [`matmul_many`]: quantized activations, VNNI lane sums and the
/// column-major outputs of multi-row calls. They keep their capacity between calls, so a
/// steady stream of same-sized products (decode) allocates nothing.
#[derive(Default)]
struct Scratch {
    xq32: Vec<Q8Block>,
    xqk: Vec<Q8KBlock>,
    sums: Vec<[i32; 8]>,
    cols: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    /// A weight row gathered out of [`Layout::Rows4`] for the row-at-a-time kernels.
    static ROW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An output pointer that tasks on other threads write disjoint ranges of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes its own range of the buffer (see `matmul_many`).
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

/// Several products of the same activations (a layer's q/k/v, or gate/up) in one pass: `x` is
/// quantized once per activation type, and the weight rows of all matrices share one parallel
/// section. Each output value is bit-identical to [`matmul`] of its matrix alone. Working
/// buffers are per-thread and reused: in steady state a call allocates nothing.
pub fn matmul_many(products: &mut [Product<'_>], x: &[f32], m: usize, path: Path) {
    if products.len() > MAX_PRODUCTS {
        for group in products.chunks_mut(MAX_PRODUCTS) {
            matmul_many(group, x, m, path);
        }
        return;
    }
    let Some(k) = products.first().map(|p| p.w.k) else {
        return;
    };
    assert_eq!(x.len(), m * k, "activations do not match ({m}, {k})");
    let np = products.len();
    let mut ws = [QMatrix::ggml(BlockType::Q8_0, &[], 0, 0); MAX_PRODUCTS];
    for (w, p) in ws.iter_mut().zip(products.iter()) {
        let QMatrix {
            ty,
            data,
            n,
            k: pk,
            layout,
        } = p.w;
        assert!(
            layout == Layout::Ggml || has_rows4(ty),
            "{ty:?} has no Rows4 layout"
        );
        let be = ty.block_elems();
        assert_eq!(pk, k, "products of one matmul_many share k");
        assert!(k.is_multiple_of(be), "k = {k} is not a multiple of {be}");
        assert_eq!(
            data.len(),
            n * (k / be) * ty.block_bytes(),
            "weight bytes do not match ({n}, {k})"
        );
        assert_eq!(p.out.len(), m * n, "output does not match ({m}, {n})");
        *w = p.w;
    }
    let ws = &ws[..np];
    // The buffers are taken out for the call (a call nested through work stealing finds them
    // empty and uses its own) and put back after.
    let mut sc = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    // One quantization per activation type. Q8_1 is Q8_0 plus the sum term, which the symmetric
    // types ignore, so one pass with sums serves all 32-element types.
    let (b32, bk) = (k / QK, k / QK_K);
    if ws.iter().any(|w| !w.ty.is_k()) {
        sc.xq32.clear();
        sc.xq32.resize(m * b32, Q8Block::default());
        let with_sum = ws.iter().any(|w| w.ty.with_sum());
        for (row, q) in x.chunks_exact(k).zip(sc.xq32.chunks_exact_mut(b32)) {
            quantize_row(row, q, with_sum);
        }
    }
    if ws.iter().any(|w| w.ty.is_k()) {
        sc.xqk.clear();
        sc.xqk.resize(m * bk, Q8KBlock::default());
        for (row, q) in x.chunks_exact(k).zip(sc.xqk.chunks_exact_mut(bk)) {
            quantize_row_k(row, q);
        }
    }
    let mut kerns = [Kern::K(scalar::dot_q6k, None); MAX_PRODUCTS];
    for (kn, w) in kerns.iter_mut().zip(ws) {
        *kn = kern_for(w.ty, w.layout, path, m);
    }
    let kerns = &kerns[..np];
    if kerns.iter().any(|k| matches!(k, Kern::B32(_, _, Some(_)))) {
        lane_sums(&sc.xq32, &mut sc.sums);
    }
    let (xq32, xqk, sums) = (&sc.xq32[..], &sc.xqk[..], &sc.sums[..]);
    // Fills `dst` (`width × m`, column-major) with columns c0.. of product i.
    // (`c0` is a multiple of four, so in Rows4 a task's rows are whole groups and then the
    // ggml tail, and its bytes are the range of its rows as in ggml's layout.)
    let fill = |i: usize, c0: usize, dst: &mut [f32]| {
        let w = ws[i];
        let row_bytes = w.row_bytes();
        if let Kern::B32(_, _, Some(rows)) = kerns[i] {
            let width = dst.len() / m;
            let packed = w.packed_rows().saturating_sub(c0).min(width);
            let wr = &w.data[c0 * row_bytes..(c0 + width) * row_bytes];
            // One pass per activation row over about 16 KiB of weight rows (a multiple of four,
            // so Rows4 groups stay whole), which stay in L1 for the next pass; each pass writes
            // its values `m` apart (the columns).
            let sub = (16 * 1024 / row_bytes.max(1)).max(4) / 4 * 4;
            let mut c = 0;
            while c < width {
                let cw = sub.min(width - c);
                let chunk = &wr[c * row_bytes..(c + cw) * row_bytes];
                let p = packed.saturating_sub(c).min(cw);
                for a in 0..m {
                    let blocks = a * b32..(a + 1) * b32;
                    let out = &mut dst[c * m + a..(c + cw) * m];
                    rows(chunk, p, &xq32[blocks.clone()], &sums[blocks], out, m);
                }
                c += cw;
            }
            return;
        }
        ROW.with(|buf| {
            let mut buf = buf.borrow_mut();
            for (c, col) in dst.chunks_exact_mut(m).enumerate() {
                let wr = w.row(c0 + c, &mut buf);
                match kerns[i] {
                    Kern::B32(dot, dot4, _) => fill_column(wr, xq32, b32, dot, dot4, col),
                    Kern::K(dot, dot4) => fill_column(wr, xqk, bk, dot, dot4, col),
                }
            }
        })
    };
    // A few ranges per thread (work stealing evens out a slow core) but not so many that
    // scheduling costs more than the work: at least 16 weight rows a range. Task `t` is range
    // `t - first[i]` of product `i`; its `width × m` values go to `base[i]` from `c0 · m` on
    // (one row: the output itself; more rows: column-major scratch, transposed below).
    let threads = rayon::current_num_threads().max(1);
    let total: usize = ws.iter().map(|w| w.n).sum();
    let cols = total.div_ceil(threads * 4).max(16).next_multiple_of(4);
    let mut first = [0usize; MAX_PRODUCTS + 1];
    for (i, w) in ws.iter().enumerate() {
        first[i + 1] = first[i] + w.n.div_ceil(cols);
    }
    let mut base = [OutPtr(std::ptr::null_mut()); MAX_PRODUCTS];
    if m == 1 {
        for (b, p) in base.iter_mut().zip(products.iter_mut()) {
            *b = OutPtr(p.out.as_mut_ptr());
        }
    } else {
        sc.cols.clear();
        sc.cols.resize(total * m, 0.0);
        let mut off = 0;
        for (b, w) in base.iter_mut().zip(ws) {
            // SAFETY: `off + w.n · m <= total · m`, the length of `sc.cols`.
            #[allow(unsafe_code)]
            {
                *b = OutPtr(unsafe { sc.cols.as_mut_ptr().add(off) });
            }
            off += w.n * m;
        }
    }
    let task = |t: usize| {
        let i = (0..np)
            .rfind(|&i| first[i] <= t)
            .expect("task 0 is in product 0");
        let c0 = (t - first[i]) * cols;
        let width = cols.min(ws[i].n - c0);
        let at = base[i];
        // SAFETY: tasks of product i cover disjoint column ranges c0..c0 + width of its
        // `n × m` buffer (the output for one row, its scratch region otherwise), which outlives
        // the parallel section and which nothing else touches meanwhile.
        #[allow(unsafe_code)]
        let dst = unsafe { std::slice::from_raw_parts_mut(at.0.add(c0 * m), width * m) };
        fill(i, c0, dst);
    };
    if first[np] == 1 {
        task(0);
    } else {
        (0..first[np]).into_par_iter().for_each(task);
    }
    if m > 1 {
        let mut off = 0;
        for p in products.iter_mut() {
            let n = p.w.n;
            for (c, col) in sc.cols[off..off + n * m].chunks_exact(m).enumerate() {
                for (i, &v) in col.iter().enumerate() {
                    p.out[i * n + c] = v;
                }
            }
            off += n * m;
        }
    }
    SCRATCH.with(|s| *s.borrow_mut() = sc);
}

/// Whether [`gemm_k`] runs for weights of `ty` on this CPU: a K-quant (Q4_K, Q5_K, Q6_K) on
/// x86-64 with AVX-512 VNNI.
pub fn has_gemm_k(ty: BlockType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        ty.is_k() && gemm_k::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// The prefill product for K-quant weights: `out[i, j] = Σ_t x[i, t] · W[j, t]` for `x` of shape
/// `(m, k)`, `out` `(m, n)` row-major, as an integer GEMM on sixteen weight rows at a time. Each
/// value equals [`matmul`] on [`Path::Scalar`] bit for bit (the same Q8_K activations and the
/// same arithmetic), whatever the thread count. Panics unless [`has_gemm_k`] holds for `w`'s
/// type, `w` is in ggml's layout and the slices fit the shapes.
pub fn gemm_k(w: QMatrix<'_>, x: &[f32], m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        gemm_k::gemm_k(w, x, m, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, x, m, out);
        panic!("gemm_k needs x86-64 with AVX-512 VNNI (see has_gemm_k)")
    }
}

/// One weight row against every activation row: `col[i] = dot(wr, x row i)`, four rows per
/// pass where a four-row kernel exists (bit-identical to one by one).
fn fill_column<A>(
    wr: &[u8],
    xq: &[A],
    blocks: usize,
    dot: RowDot<A>,
    dot4: Option<RowDot4<A>>,
    col: &mut [f32],
) {
    let m = col.len();
    let mut i = 0;
    if let Some(d4) = dot4 {
        while i + 4 <= m {
            let xr = |r: usize| &xq[(i + r) * blocks..(i + r + 1) * blocks];
            col[i..i + 4].copy_from_slice(&d4(wr, [xr(0), xr(1), xr(2), xr(3)]));
            i += 4;
        }
    }
    while i < m {
        col[i] = dot(wr, &xq[i * blocks..(i + 1) * blocks]);
        i += 1;
    }
}

fn scalar_dot32(ty: BlockType) -> RowDot<Q8Block> {
    match ty {
        BlockType::Q4_0 => |w, x| scalar::dot32(BlockType::Q4_0, w, x),
        BlockType::Q4_1 => |w, x| scalar::dot32(BlockType::Q4_1, w, x),
        BlockType::Q5_0 => |w, x| scalar::dot32(BlockType::Q5_0, w, x),
        BlockType::Q5_1 => |w, x| scalar::dot32(BlockType::Q5_1, w, x),
        _ => |w, x| scalar::dot32(BlockType::Q8_0, w, x),
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_rows32(ty: BlockType) -> Option<Rows32> {
    have_vnni().map(|v| x86::rows32(ty, v))
}

fn scalar_k_dot(ty: BlockType) -> RowDot<Q8KBlock> {
    match ty {
        BlockType::Q4K => scalar::dot_q4k,
        BlockType::Q5K => scalar::dot_q5k,
        _ => scalar::dot_q6k,
    }
}

/// Dequantizes `data` (whole blocks of `ty`) into f32, exactly as ggml's `dequantize_row_*`.
/// The reference for tests and a fallback for callers that need dense rows.
pub fn dequantize(ty: BlockType, data: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; data.len() / ty.block_bytes() * ty.block_elems()];
    dequantize_into(ty, data, &mut out);
    out
}

/// Blocks `b0..b0 + out.len() / block_elems` of row `r` of `w`, dequantized into `out`, in
/// either layout (the same values as [`dequantize`] of those blocks in ggml's layout).
pub fn dequantize_row_blocks(w: &QMatrix<'_>, r: usize, b0: usize, out: &mut [f32]) {
    let (be, bb) = (w.ty.block_elems(), w.ty.block_bytes());
    assert!(
        r < w.n && out.len().is_multiple_of(be) && b0 + out.len() / be <= w.k / be,
        "dequantize_row_blocks: row {r}, blocks {b0}.. out of range"
    );
    if r >= w.packed_rows() {
        let at = r * w.row_bytes() + b0 * bb;
        return dequantize_into(w.ty, &w.data[at..at + out.len() / be * bb], out);
    }
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        // The row's fields, block after block, a group's stride apart.
        let offs = [0, 1, 2].map(|f| w.field_at(r, b0, f));
        let stride = 4 * bb;
        return x86::dequantize32_strided(w.ty, w.data, offs, stride, out);
    }
    let mut blk = [0u8; 34];
    for (i, o) in out.chunks_exact_mut(be).enumerate() {
        let bytes = w.block(r, b0 + i, &mut blk);
        dequantize_into(w.ty, bytes, o);
    }
}

/// [`dequantize`] into `out` (`data.len() / block_bytes · block_elems` values), with AVX2 for
/// the 32-element types when the CPU has it (same values as the scalar code).
pub fn dequantize_into(ty: BlockType, data: &[u8], out: &mut [f32]) {
    let blocks = data.len() / ty.block_bytes();
    assert_eq!(
        out.len(),
        blocks * ty.block_elems(),
        "dequantize_into: output size"
    );
    #[cfg(target_arch = "x86_64")]
    if !ty.is_k() && have_avx2() {
        return x86::dequantize32(ty, data, out);
    }
    scalar::dequantize_into(ty, data, out)
}

#[cfg(test)]
mod tests;
