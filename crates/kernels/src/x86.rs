//! AVX2 + FMA + F16C kernels (the same integer arithmetic as llama.cpp's x86 kernels). Every
//! function here requires those features; the safe wrappers are only handed out by
//! [`dots32`] / [`dot_k`], which the caller reaches after run-time detection.
#![allow(unsafe_code)]

use crate::{BlockType, Q8Block, Q8KBlock, RowDot, RowDot4};
use std::arch::x86_64::*;

mod dense;
pub(crate) use dense::{attention_head_avx2, axpy_f32_avx2, dot_f32_avx2};

use crate::tag::{
    block_bytes, fields, has_min, Q4_0 as T_Q4_0, Q4_1 as T_Q4_1, Q5_0 as T_Q5_0, Q5_1 as T_Q5_1,
    Q8_0 as T_Q8_0,
};

/// The row dot products for a 32-element type. Only call after detecting AVX2, FMA and F16C.
pub(crate) fn dots32(ty: BlockType) -> (RowDot<Q8Block>, Option<RowDot4<Q8Block>>) {
    // SAFETY (all closures): the caller detected AVX2, FMA and F16C; `run` passes whole rows.
    macro_rules! pair {
        ($t:expr) => {
            (
                (|w, x| unsafe { dot32::<{ $t }>(w, x) }) as RowDot<Q8Block>,
                Some((|w, x| unsafe { dot32x4::<{ $t }>(w, x) }) as RowDot4<Q8Block>),
            )
        };
    }
    match ty {
        BlockType::Q4_0 => pair!(T_Q4_0),
        BlockType::Q4_1 => pair!(T_Q4_1),
        BlockType::Q5_0 => pair!(T_Q5_0),
        BlockType::Q5_1 => pair!(T_Q5_1),
        _ => pair!(T_Q8_0),
    }
}

/// The row dot product for a K-quant type. Only call after detecting AVX2, FMA and F16C.
pub(crate) fn dot_k(ty: BlockType) -> RowDot<Q8KBlock> {
    // SAFETY (all closures): as in `dots32`.
    match ty {
        BlockType::Q4K => |w, x| unsafe { dot_q45k::<false>(w, x) },
        BlockType::Q5K => |w, x| unsafe { dot_q45k::<true>(w, x) },
        _ => |w, x| unsafe { dot_q6k(w, x) },
    }
}

/// The sum of the eight lanes. Needs only AVX (no F16C), so it inlines into the f32 kernels too.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The two f16 values at `p` and `p + 2`, widened with F16C into lanes 0 and 1. A 32-bit load
/// that zeroes the rest of the register: a 16-bit insert would merge into whatever register the
/// compiler picks (often the accumulator), a false dependency that serialises the loop.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn halves(p: *const u8) -> __m128 {
    // One `vmovd` in inline assembly, so LLVM cannot narrow the load to the 16 bits a symmetric
    // type reads: it would become `vpinsrw` into an arbitrary register (it picked the
    // accumulator, chaining every block of `dot32` behind the previous block's FMA). A volatile
    // read avoided that too, but as four byte loads and shifts.
    let v: __m128i;
    std::arch::asm!(
        "vmovd {v}, dword ptr [{p}]",
        v = out(xmm_reg) v,
        p = in(reg) p,
        options(pure, readonly, nostack, preserves_flags)
    );
    _mm_cvtph_ps(v)
}

/// Lane 1 of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane1(v: __m128) -> f32 {
    _mm_cvtss_f32(_mm_movehdup_ps(v))
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles (elements 0..16), then high (16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
        _mm256_set1_epi8(0x0F),
    )
}

/// 32 bits at `p` → 32 bytes, 0xFF where the bit is set (byte i ↔ bit i).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    let x = (p as *const u32).read_unaligned() as i32;
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
    let mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi64x(-1))
}

/// A weight block's 32 values as bytes in element order: signed for the symmetric types,
/// unsigned for the types with a minimum.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weights32<const T: u8>(wb: *const u8) -> __m256i {
    match T {
        T_Q4_0 => _mm256_sub_epi8(nibbles(wb.add(2)), _mm256_set1_epi8(8)),
        T_Q4_1 => nibbles(wb.add(4)),
        // A clear fifth bit means value − 16: OR 0xF0 onto the nibble is exactly that in i8.
        T_Q5_0 => _mm256_or_si256(
            nibbles(wb.add(6)),
            _mm256_andnot_si256(bytes_from_bits(wb.add(2)), _mm256_set1_epi8(0xF0u8 as i8)),
        ),
        T_Q5_1 => _mm256_or_si256(
            nibbles(wb.add(8)),
            _mm256_and_si256(bytes_from_bits(wb.add(4)), _mm256_set1_epi8(0x10)),
        ),
        _ => _mm256_loadu_si256(wb.add(2) as *const __m256i),
    }
}

/// Σ over pairs of `q·y` as eight i32 sums widened to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn products<const T: u8>(q: __m256i, ax: __m256i, qy: __m256i) -> __m256 {
    let p16 = if has_min(T) {
        _mm256_maddubs_epi16(q, qy)
    } else {
        // maddubs multiplies unsigned by signed: move q's sign onto y.
        _mm256_maddubs_epi16(ax, _mm256_sign_epi8(qy, q))
    };
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// One block of a 32-element type into a row's accumulators.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step32<const T: u8>(
    q: __m256i,
    ax: __m256i,
    dm: __m128,
    xb: &Q8Block,
    acc: &mut __m256,
    summs: &mut f32,
) {
    let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
    if has_min(T) {
        *summs += lane1(dm) * xb.s;
    }
    let p = products::<T>(q, ax, qy);
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(_mm_cvtss_f32(dm) * xb.d), p, *acc);
}

/// One weight row of a 32-element type times one activation row: one accumulator, blocks in
/// order, so the result is bit-identical to [`dot32x4`] and to the VNNI row kernels (which run
/// four rows side by side for their parallelism).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot32<const T: u8>(w: &[u8], x: &[Q8Block]) -> f32 {
    let bb = block_bytes(T);
    assert!(w.len() >= x.len() * bb);
    let wp = w.as_ptr();
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (b, xb) in x.iter().enumerate() {
        let wb = wp.add(b * bb);
        prefetch(wb);
        let q = weights32::<T>(wb);
        step32::<T>(
            q,
            _mm256_sign_epi8(q, q),
            halves(wb),
            xb,
            &mut acc,
            &mut summs,
        );
    }
    hsum(acc) + summs
}

/// [`dot32`] of one weight row with four activation rows at once: each weight block is unpacked
/// once and the rows' accumulators are independent. Every row's result is bit-identical to
/// [`dot32`] on that row alone (same operations in the same order).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot32x4<const T: u8>(w: &[u8], x: [&[Q8Block]; 4]) -> [f32; 4] {
    let bb = block_bytes(T);
    let nb = x[0].len();
    assert!(w.len() >= nb * bb && x.iter().all(|r| r.len() == nb));
    let wp = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    for b in 0..nb {
        let wb = wp.add(b * bb);
        let q = weights32::<T>(wb);
        let ax = _mm256_sign_epi8(q, q);
        let dm = halves(wb);
        for r in 0..4 {
            step32::<T>(q, ax, dm, x[r].get_unchecked(b), &mut acc[r], &mut summs[r]);
        }
    }
    std::array::from_fn(|r| hsum(acc[r]) + summs[r])
}

use crate::Rows32;

/// Which VNNI encoding the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vnni {
    /// AVX-VNNI (VEX, 256-bit; Alder Lake and later, Sapphire Rapids, Zen 5).
    Avx,
    /// AVX-512 VNNI with BW and VL (Ice Lake, Sapphire Rapids, Zen 4): 256-bit operations, with
    /// mask registers for the Q5 types' fifth bits.
    Avx512,
}

/// The VNNI row kernel for a 32-element type (`vpdpbusd`: unsigned bytes times signed bytes,
/// four products summed into each i32 lane; the lane sums of [`crate::lane_sums`] undo the
/// unsigned offset). Only call after detecting AVX2, FMA, F16C and the given VNNI flavour.
pub(crate) fn rows32(ty: BlockType, vnni: Vnni) -> Rows32 {
    macro_rules! pick {
        ($f:ident) => {
            // SAFETY (all closures): the caller detected the features; sizes are checked inside.
            match ty {
                BlockType::Q4_0 => |w, p, x, l, o, s| unsafe { $f::<T_Q4_0>(w, p, x, l, o, s) },
                BlockType::Q4_1 => |w, p, x, l, o, s| unsafe { $f::<T_Q4_1>(w, p, x, l, o, s) },
                BlockType::Q5_0 => |w, p, x, l, o, s| unsafe { $f::<T_Q5_0>(w, p, x, l, o, s) },
                BlockType::Q5_1 => |w, p, x, l, o, s| unsafe { $f::<T_Q5_1>(w, p, x, l, o, s) },
                _ => |w, p, x, l, o, s| unsafe { $f::<T_Q8_0>(w, p, x, l, o, s) },
            }
        };
    }
    match vnni {
        Vnni::Avx => pick!(rows32_avxvnni),
        Vnni::Avx512 => pick!(rows32_avx512vnni),
    }
}

/// How far ahead of the block in use the decode kernels ask for weight bytes. The hardware
/// prefetcher alone left one-row matmuls at 60–70% of the read bandwidth when rows are short
/// (k = 896: 616 bytes of Q5_0 a row, four rows side by side); asking 4 KiB ahead raised Q5_0 /
/// Q8_0 from about 8 / 11 to 10.5 / 15 GB/s on weights outside the cache (BENCHMARKS.md).
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache line [`PREFETCH_AHEAD`] bytes past `p`. A hint only: it never faults, so
/// running past the end of the weights is harmless (and `wrapping_add` keeps it defined).
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: SSE is baseline on x86_64, and a prefetch reads nothing the program sees.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD) as *const i8) }
}

/// Where a 32-element block's fifth bits and quants start, relative to the block (ggml layout).
const fn qh_qs_at(t: u8) -> (usize, usize) {
    let f = fields(t);
    (f[0], f[0] + f[1])
}

/// A weight block's 32 values as unsigned bytes, `value + offset` with the offset of
/// [`offset_init`] (8 for Q4_0, 16 for Q5_0, 128 for Q8_0, none for the types with a minimum),
/// from its fifth bits at `qh` (Q5 types) and its quants at `qs`: the fields of one block in
/// ggml's layout, or one row's fields of a [`crate::Layout::Rows4`] group.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unsigned32<const T: u8>(qh: *const u8, qs: *const u8) -> __m256i {
    match T {
        T_Q4_0 | T_Q4_1 => nibbles(qs),
        T_Q5_0 | T_Q5_1 => _mm256_or_si256(
            nibbles(qs),
            _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10)),
        ),
        _ => _mm256_xor_si256(
            _mm256_loadu_si256(qs as *const __m256i),
            _mm256_set1_epi8(0x80u8 as i8),
        ),
    }
}

/// [`unsigned32`] with AVX-512 (BW, VL): the fifth bits of Q5_0 / Q5_1 become a mask register
/// and one masked move, instead of the five-instruction byte expansion AVX2 needs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn unsigned32_k<const T: u8>(qh: *const u8, qs: *const u8) -> __m256i {
    match T {
        T_Q5_0 | T_Q5_1 => {
            let bits = (qh as *const u32).read_unaligned();
            _mm256_or_si256(
                nibbles(qs),
                _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10)),
            )
        }
        _ => unsigned32::<T>(qh, qs),
    }
}

/// The accumulator `vpdpbusd` starts from: −offset · (each lane's four activation values), so
/// that Σ (value + offset)·q lands on exactly Σ value·q, the i32 lanes [`products`] makes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn offset_init<const T: u8>(ls: &[i32; 8]) -> __m256i {
    let sums = _mm256_loadu_si256(ls.as_ptr() as *const __m256i);
    let zero = _mm256_setzero_si256();
    match T {
        T_Q4_0 => _mm256_sub_epi32(zero, _mm256_slli_epi32::<3>(sums)),
        T_Q5_0 => _mm256_sub_epi32(zero, _mm256_slli_epi32::<4>(sums)),
        T_Q8_0 => _mm256_sub_epi32(zero, _mm256_slli_epi32::<7>(sums)),
        _ => zero,
    }
}

/// Defines a [`Rows32`] kernel for one VNNI flavour: four rows at a time (one activation load
/// and one f16 conversion serve four rows; four independent FMA chains), from a
/// [`crate::Layout::Rows4`] group (one stream, the four rows' scales in one load) or from four
/// ggml rows. A short last group of ggml rows repeats its last row and drops the extra results,
/// so every row is computed by the same code wherever it falls and results do not depend on how
/// rows are split between threads; both layouts give the same bits.
macro_rules! vnni_rows {
    ($rows:ident, $group:ident, $feat:literal, $dp:ident, $unsigned:ident) => {
        /// Four rows: `w` holds the four rows' starts (ggml), or the group's start four times
        /// (`PACKED`, Rows4).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn $group<const T: u8, const PACKED: bool>(
            w: [*const u8; 4],
            x: &[Q8Block],
            ls: &[[i32; 8]],
        ) -> [f32; 4] {
            let bb = block_bytes(T);
            let (qh_at, qs_at) = qh_qs_at(T);
            // Rows4: per block, 4 scale fields, then 4 fifth-bit fields, then 4 quant fields.
            let (dmb, qhb) = (qh_at, qs_at - qh_at);
            let qsb = bb - qs_at;
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut summs = _mm256_setzero_ps();
            for (b, (xb, l)) in x.iter().zip(ls).enumerate() {
                let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let init = offset_init::<T>(l);
                // The rows' `d` (and `m`) halves, widened together: lane 2r is row r's scale
                // times the activation's, lane 2r + 1 its minimum times the activation sum.
                let dm = if PACKED {
                    let g = w[0].add(4 * b * bb);
                    let mut o = 0;
                    while o < 4 * bb {
                        prefetch(g.add(o));
                        o += 64;
                    }
                    if has_min(T) {
                        _mm256_cvtph_ps(_mm_loadu_si128(g as *const __m128i))
                    } else {
                        let d = _mm_loadl_epi64(g as *const __m128i);
                        _mm256_cvtph_ps(_mm_unpacklo_epi16(d, _mm_setzero_si128()))
                    }
                } else {
                    let h: [u32; 4] =
                        std::array::from_fn(|r| (w[r].add(b * bb) as *const u32).read_unaligned());
                    _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i))
                };
                let sc = _mm256_mul_ps(
                    dm,
                    _mm256_setr_ps(xb.d, xb.s, xb.d, xb.s, xb.d, xb.s, xb.d, xb.s),
                );
                if has_min(T) {
                    summs = _mm256_add_ps(summs, sc);
                }
                let mut s = [0f32; 8];
                _mm256_storeu_ps(s.as_mut_ptr(), sc);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let u = if PACKED {
                        let g = w[0].add(4 * b * bb);
                        $unsigned::<T>(g.add(4 * dmb + r * qhb), g.add(4 * qs_at + r * qsb))
                    } else {
                        let wb = w[r].add(b * bb);
                        prefetch(wb);
                        $unsigned::<T>(wb.add(qh_at), wb.add(qs_at))
                    };
                    let p = _mm256_cvtepi32_ps($dp(init, u, qy));
                    *acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[2 * r]), p, *acc);
                }
            }
            let mut m = [0f32; 8];
            _mm256_storeu_ps(m.as_mut_ptr(), summs);
            std::array::from_fn(|r| hsum(acc[r]) + m[2 * r + 1])
        }

        #[target_feature(enable = $feat)]
        unsafe fn $rows<const T: u8>(
            w: &[u8],
            packed: usize,
            x: &[Q8Block],
            ls: &[[i32; 8]],
            out: &mut [f32],
            stride: usize,
        ) {
            let rb = x.len() * block_bytes(T);
            let n = out.len().div_ceil(stride.max(1));
            assert!(ls.len() == x.len() && w.len() >= n * rb);
            assert!(packed.is_multiple_of(4) && packed <= n);
            let mut r = 0;
            while r < n {
                let v = if r < packed {
                    let g = w.as_ptr().add(r * rb);
                    $group::<T, true>([g; 4], x, ls)
                } else {
                    let rows = std::array::from_fn(|i| w.as_ptr().add((r + i).min(n - 1) * rb));
                    $group::<T, false>(rows, x, ls)
                };
                for (j, &v) in v.iter().enumerate().take(n - r) {
                    out[(r + j) * stride] = v;
                }
                r += 4;
            }
        }
    };
}

vnni_rows!(
    rows32_avxvnni,
    group32_avxvnni,
    "avx2,fma,f16c,avxvnni",
    _mm256_dpbusd_avx_epi32,
    unsigned32
);
vnni_rows!(
    rows32_avx512vnni,
    group32_avx512vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32,
    unsigned32_k
);

/// The 12 packed scale bytes of a Q4_K / Q5_K block → (8 scales, 8 mins) as bytes
/// (llama.cpp's `utmp` unpacking of `get_scale_min_k4`).
#[inline]
unsafe fn scales_mins_k4(p: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u = |i: usize| (p.add(4 * i) as *const u32).read_unaligned();
    let (u0, u1, u2) = (u(0), u(1), u(2));
    [
        u0 & KMASK1,
        (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4),
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ]
}

/// One Q4_K (`FIVE = false`) or Q5_K weight row times one Q8_K activation row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q45k<const FIVE: bool>(w: &[u8], x: &[Q8KBlock]) -> f32 {
    let bb = if FIVE { 176 } else { 144 };
    let qs_at = if FIVE { 48 } else { 16 };
    assert!(w.len() >= x.len() * bb);
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let two = _mm256_set1_epi8(2);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for (b, xb) in x.iter().enumerate() {
        let wb = w.as_ptr().add(b * bb);
        for l in 0..bb.div_ceil(64) {
            prefetch(wb.wrapping_add(64 * l));
        }
        let dm = halves(wb);
        let d = xb.d * _mm_cvtss_f32(dm);
        let dmin = xb.d * lane1(dm);
        let sm = scales_mins_k4(wb.add(4));
        let sc: [u8; 16] = std::mem::transmute(sm);
        // Mins: Σ_j m_j · (sum of the 32 activations of sub-block j).
        let mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, sm[3] as i32, sm[2] as i32));
        let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
        let pair_sums = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
        let pm = _mm_madd_epi16(mins, pair_sums);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(pm), acc_m);

        let mut hb = if FIVE {
            _mm256_loadu_si256(wb.add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let q8 = xb.qs.as_ptr();
        let mut isum = _mm256_setzero_si256();
        for j in 0..4 {
            let raw = _mm256_loadu_si256(wb.add(qs_at + 32 * j) as *const __m256i);
            let mut lo = _mm256_and_si256(raw, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if FIVE {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(hb, two), 3));
                hb = _mm256_srli_epi16(hb, 2);
            }
            let y0 = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
            let y1 = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
            let p0 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, y0),
                _mm256_set1_epi16(sc[2 * j] as i16),
            );
            let p1 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, y1),
                _mm256_set1_epi16(sc[2 * j + 1] as i16),
            );
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc);
    }
    let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let m = _mm_add_ss(m, _mm_movehdup_ps(m));
    hsum(acc) - _mm_cvtss_f32(m)
}

/// One Q6_K weight row times one Q8_K activation row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k(w: &[u8], x: &[Q8KBlock]) -> f32 {
    assert!(w.len() >= x.len() * 210);
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(0x03);
    let m0c = _mm256_set1_epi8(0x0C);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = _mm256_setzero_ps();
    for (b, xb) in x.iter().enumerate() {
        let wb = w.as_ptr().add(b * 210);
        for l in 0..4 {
            prefetch(wb.wrapping_add(64 * l));
        }
        // The 4 bytes ending the block: two scale bytes, then d.
        let d = xb.d * lane1(halves(wb.add(206)));
        let sc = std::slice::from_raw_parts(wb.add(192) as *const i8, 16);
        // The −32 offset: 32 · Σ_s sc_s · (sum of the 16 activations of sub-block s).
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(192) as *const __m128i));
        let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
        let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
        let q8 = xb.qs.as_ptr();
        let mut isum = _mm256_setzero_si256();
        for n in 0..2 {
            let ql0 = _mm256_loadu_si256(wb.add(64 * n) as *const __m256i);
            let ql1 = _mm256_loadu_si256(wb.add(64 * n + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(wb.add(128 + 32 * n) as *const __m256i);
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(qh, m0c), 2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_and_si256(qh, m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                ),
            ];
            for (t, q) in q.into_iter().enumerate() {
                let y = _mm256_loadu_si256(q8.add(128 * n + 32 * t) as *const __m256i);
                let s = 8 * n + 2 * t;
                let scv = _mm256_set_m128i(
                    _mm_set1_epi16(sc[s + 1] as i16),
                    _mm_set1_epi16(sc[s] as i16),
                );
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scv);
                isum = _mm256_add_epi32(isum, p);
            }
        }
        isum = _mm256_sub_epi32(isum, off);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc);
    }
    hsum(acc)
}

/// Dequantizes blocks of a 32-element type (same values as the scalar code: `q·d + m`, two
/// roundings). Only call after detecting AVX2, FMA and F16C.
pub(crate) fn dequantize32(ty: BlockType, data: &[u8], out: &mut [f32]) {
    let (qh, qs) = qh_qs_at(crate::tag::of(ty));
    dequantize32_strided(ty, data, [0, qh, qs], ty.block_bytes(), out)
}

/// Dequantizes `out.len() / 32` blocks of a 32-element type whose fields sit at
/// `data[offs[f] + b·stride ..]` for block `b` (scale and minimum, fifth bits, quants): blocks in
/// ggml's layout, or one row of a [`crate::Layout::Rows4`] group. Only call after detecting AVX2,
/// FMA and F16C.
pub(crate) fn dequantize32_strided(
    ty: BlockType,
    data: &[u8],
    offs: [usize; 3],
    stride: usize,
    out: &mut [f32],
) {
    let blocks = out.len() / 32;
    if blocks == 0 {
        return;
    }
    // Reads: 4 bytes at the scale and at the fifth bits, the quants after those.
    let qs_len = fields(crate::tag::of(ty))[2];
    let last = (blocks - 1) * stride;
    assert!(
        last + offs[2] + qs_len <= data.len()
            && last + offs[0] + 4 <= data.len()
            && last + offs[1] + 4 <= data.len(),
        "dequantize: blocks out of range"
    );
    // SAFETY: the caller detected the features; every read is inside `data` (checked above).
    unsafe {
        match ty {
            BlockType::Q4_0 => dequant32::<T_Q4_0>(data, offs, stride, out),
            BlockType::Q4_1 => dequant32::<T_Q4_1>(data, offs, stride, out),
            BlockType::Q5_0 => dequant32::<T_Q5_0>(data, offs, stride, out),
            BlockType::Q5_1 => dequant32::<T_Q5_1>(data, offs, stride, out),
            _ => dequant32::<T_Q8_0>(data, offs, stride, out),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant32<const T: u8>(data: &[u8], offs: [usize; 3], stride: usize, out: &mut [f32]) {
    for b in 0..out.len() / 32 {
        let at = data.as_ptr().add(b * stride);
        let u = unsigned32::<T>(at.add(offs[1]), at.add(offs[2]));
        // Back to the signed values (the types with a minimum are unsigned already).
        let q = match T {
            T_Q4_0 => _mm256_sub_epi8(u, _mm256_set1_epi8(8)),
            T_Q5_0 => _mm256_sub_epi8(u, _mm256_set1_epi8(16)),
            T_Q8_0 => _mm256_xor_si256(u, _mm256_set1_epi8(0x80u8 as i8)),
            _ => u,
        };
        let dm = halves(at.add(offs[0]));
        let d = _mm256_set1_ps(_mm_cvtss_f32(dm));
        let m = _mm256_set1_ps(if has_min(T) { lane1(dm) } else { 0.0 });
        let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
        let o = out.as_mut_ptr().add(b * 32);
        for (j, p) in parts.into_iter().enumerate() {
            // Unsigned types hold 0..31 here, so sign extension is exact for them too.
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(p));
            let y = _mm256_mul_ps(v, d);
            let y = if has_min(T) { _mm256_add_ps(y, m) } else { y };
            _mm256_storeu_ps(o.add(8 * j), y);
        }
    }
}
