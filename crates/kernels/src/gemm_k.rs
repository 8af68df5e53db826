//! Prefill products for the K-quants (Q4_K, Q5_K, Q6_K) on CPUs with AVX-512 VNNI: an integer
//! GEMM that keeps sixteen weight rows in the sixteen i32 lanes of a register.
//!
//! Each task takes a panel of 16 weight rows and unpacks it into a per-thread buffer: per block,
//! its 256 values as bytes in quads (four consecutive values of each row side by side, so one
//! 64-byte load is four values of all sixteen rows), the sub-block scales as i32 lanes, the
//! minimums (Q4_K, Q5_K) or scales (Q6_K) as i16 pairs, and `d` (and `dmin`) as f32 lanes. The
//! unpacking costs about what dequantizing the panel to f32 did, and is shared by every
//! activation row. Then, eight activation rows at a time (their Q8_K quads broadcast),
//! `vpdpbusd` sums each sub-block, `vpmulld` applies its scale, and `vpdpwssd` forms the minimum
//! (or the Q6_K −32 offset) term from the activation's 16-element sums.
//!
//! Per output value this is the scalar kernel's arithmetic exactly: the same exact integer sums
//! per block, then `sum + ((d·xd)·isum − (dmin·xd)·mins)` (Q6_K: `sum + (d·xd)·isum`) in block
//! order, without fused multiply-adds. So the results equal the scalar path bit for bit, and do
//! not depend on the thread count or on which panel or row group a value falls in.
#![allow(unsafe_code)]

use crate::{BlockType, Layout, Q8KBlock, QMatrix, QK_K};
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Weight rows per panel: the i32 lanes of a 512-bit register.
const ROWS: usize = 16;
/// Bytes of one panel block's values: 256 values of 16 rows.
const QBYTES: usize = QK_K * ROWS;

/// Whether the CPU has what [`gemm_k`] needs.
pub(crate) fn supported() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// A panel of up to 16 weight rows unpacked for the kernel (rows past the matrix are zeros).
#[derive(Default)]
struct Panel {
    /// Per block: 64 quads × 16 rows × 4 bytes.
    q: Vec<u8>,
    /// Per block: per sub-block, 16 lanes of its scale.
    sc: Vec<i32>,
    /// Per block: per pair of sub-blocks, 16 lanes of (i16, i16): the minimums (Q4_K, Q5_K)
    /// or the scales (Q6_K).
    pairs: Vec<i32>,
    /// Per block: 16 lanes of `d`.
    d: Vec<f32>,
    /// Per block: 16 lanes of `dmin` (Q4_K, Q5_K).
    dmin: Vec<f32>,
}

thread_local! {
    static PANEL: std::cell::RefCell<Panel> = std::cell::RefCell::new(Panel::default());
}

/// Sub-blocks per block: 8 of 32 values (Q4_K, Q5_K) or 16 of 16 (Q6_K).
fn subs(ty: BlockType) -> usize {
    if ty == BlockType::Q6K {
        16
    } else {
        8
    }
}

/// Packs two i16 into the lanes of an i32 as `vpdpwssd` reads them (first in the low half).
fn pair(a: i32, b: i32) -> i32 {
    (a as i16 as u16 as u32 | ((b as i16 as u16 as u32) << 16)) as i32
}

/// The sixteen rows' 32 bytes at `rows[r]`, as eight registers of sixteen 4-byte quads: register
/// `t`, lane `r` is bytes `4t..4t + 4` of row `r`.
///
/// # Safety
/// The CPU has AVX-512F/BW; each pointer has 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transpose(rows: &[*const u8; ROWS]) -> [__m512i; 8] {
    let ld = |p: *const u8| _mm256_loadu_si256(p as *const __m256i);
    // a[i]: row i in the low half, row i + 8 in the high half.
    let a: [__m512i; 8] = std::array::from_fn(|i| {
        _mm512_inserti64x4(_mm512_castsi256_si512(ld(rows[i])), ld(rows[i + 8]), 1)
    });
    let b: [__m512i; 8] = std::array::from_fn(|i| {
        let (x, y) = (a[i / 2 * 2], a[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        }
    });
    // c[q] (q < 4, rows 0–3 and 8–11) and c[4 + q] (rows 4–7 and 12–15): per 128-bit lane,
    // quad q (lanes 0, 2) or q + 4 (lanes 1, 3) of four rows.
    let c: [__m512i; 8] = std::array::from_fn(|i| {
        let (g, q) = (i / 4 * 4, i % 4);
        let (x, y) = (b[g + q / 2], b[g + 2 + q / 2]);
        if q % 2 == 0 {
            _mm512_unpacklo_epi64(x, y)
        } else {
            _mm512_unpackhi_epi64(x, y)
        }
    });
    let lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    std::array::from_fn(|t| {
        let q = t % 4;
        _mm512_permutex2var_epi64(c[q], if t < 4 { lo } else { hi }, c[4 + q])
    })
}

/// Each 16-bit lane shifted right by `n` (then masked per byte by the callers).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn srl16(x: __m512i, n: i32) -> __m512i {
    _mm512_srl_epi16(x, _mm_cvtsi32_si128(n))
}

/// Each 32-bit lane shifted right (logically) by `n`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn srl32(x: __m512i, n: u32) -> __m512i {
    _mm512_srl_epi32(x, _mm_cvtsi32_si128(n as i32))
}

/// Each 32-bit lane shifted left by `n`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sll32(x: __m512i, n: u32) -> __m512i {
    _mm512_sll_epi32(x, _mm_cvtsi32_si128(n as i32))
}

/// Unpacks rows `r0..r0 + 16` of `w` into `p` (past the last row, the last row again: those
/// lanes are never stored).
///
/// # Safety
/// The CPU has AVX-512F/BW; `w` is a K-quant matrix whose data fits its shape.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack(w: &QMatrix<'_>, r0: usize, p: &mut Panel) {
    let nb = w.k / QK_K;
    let subs = subs(w.ty);
    let bb = w.ty.block_bytes();
    p.q.resize(nb * QBYTES, 0);
    p.sc.resize(nb * subs * ROWS, 0);
    p.pairs.resize(nb * subs / 2 * ROWS, 0);
    p.d.resize(nb * ROWS, 0.0);
    p.dmin.resize(nb * ROWS, 0.0);
    let row_bytes = nb * bb;
    let last = w.n - 1;
    let base: [*const u8; ROWS] =
        std::array::from_fn(|r| w.data.as_ptr().add((r0 + r).min(last) * row_bytes));
    let m4 = _mm512_set1_epi8(0x0F);
    let m1 = _mm512_set1_epi8(0x01);
    let m3 = _mm512_set1_epi8(0x03);
    for b in 0..nb {
        let at = |off: usize| -> [*const u8; ROWS] {
            std::array::from_fn(|r| base[r].add(b * bb + off))
        };
        let dst = p.q.as_mut_ptr().add(b * QBYTES);
        // Stores chunk `chunk` (32 values: quads 8·chunk ..) of all sixteen rows.
        let put = |chunk: usize, v: &[__m512i; 8]| {
            for (t, &v) in v.iter().enumerate() {
                _mm512_storeu_si512(dst.add((8 * chunk + t) * 64) as *mut __m512i, v);
            }
        };
        if w.ty == BlockType::Q6K {
            for n in 0..2 {
                let a = transpose(&at(64 * n));
                let bq = transpose(&at(64 * n + 32));
                let h = transpose(&at(128 + 32 * n));
                for (k, (src, shift)) in [(&a, 0), (&bq, 0), (&a, 4), (&bq, 4)]
                    .into_iter()
                    .enumerate()
                {
                    let v: [__m512i; 8] = std::array::from_fn(|t| {
                        let low = _mm512_and_si512(srl16(src[t], shift), m4);
                        let high = _mm512_and_si512(srl16(h[t], 2 * k as i32), m3);
                        _mm512_or_si512(low, _mm512_slli_epi16(high, 4))
                    });
                    put(4 * n + k, &v);
                }
            }
        } else {
            let five = w.ty == BlockType::Q5K;
            let qs_at = if five { 48 } else { 16 };
            let qh = if five { Some(transpose(&at(16))) } else { None };
            for g in 0..4 {
                let raw = transpose(&at(qs_at + 32 * g));
                for half in 0..2 {
                    let j = 2 * g + half;
                    let v: [__m512i; 8] = std::array::from_fn(|t| {
                        let mut v = _mm512_and_si512(srl16(raw[t], 4 * half as i32), m4);
                        if let Some(qh) = &qh {
                            let bit = _mm512_and_si512(srl16(qh[t], j as i32), m1);
                            v = _mm512_or_si512(v, _mm512_slli_epi16(bit, 4));
                        }
                        v
                    });
                    put(j, &v);
                }
            }
        }
        // Scales, minimums and d of the sixteen rows, lane by lane: `word(off)` has row r's
        // 4 bytes at `off` in lane r.
        let word = |off: usize| {
            let v: [u32; ROWS] =
                std::array::from_fn(|r| (base[r].add(b * bb + off) as *const u32).read_unaligned());
            _mm512_loadu_si512(v.as_ptr() as *const __m512i)
        };
        let byte = |v: __m512i, i: u32| _mm512_and_si512(srl32(v, 8 * i), _mm512_set1_epi32(0xFF));
        let pairs16 = |a: __m512i, b: __m512i| {
            _mm512_or_si512(
                _mm512_and_si512(a, _mm512_set1_epi32(0xFFFF)),
                _mm512_slli_epi32(b, 16),
            )
        };
        let sc = p.sc.as_mut_ptr().add(b * subs * ROWS);
        let pairs = p.pairs.as_mut_ptr().add(b * subs / 2 * ROWS);
        let f16s = |v: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
        if w.ty == BlockType::Q6K {
            // The sixteen i8 scales, sign-extended.
            let sv: [__m512i; 16] = std::array::from_fn(|s| {
                let v = word(192 + 4 * (s / 4));
                _mm512_srai_epi32(sll32(v, 24 - 8 * (s % 4) as u32), 24)
            });
            for (s, &v) in sv.iter().enumerate() {
                _mm512_storeu_si512(sc.add(s * ROWS) as *mut __m512i, v);
            }
            for i in 0..8 {
                _mm512_storeu_si512(
                    pairs.add(i * ROWS) as *mut __m512i,
                    pairs16(sv[2 * i], sv[2 * i + 1]),
                );
            }
            // d: the high half of the 4 bytes at 206 (reading at 208 could pass the data's end).
            _mm512_storeu_ps(p.d.as_mut_ptr().add(b * ROWS), f16s(srl32(word(206), 16)));
        } else {
            // llama.cpp's `get_scale_min_k4` on four bytes at once (as `scales_mins_k4`).
            let (u0, u1, u2) = (word(4), word(8), word(12));
            let k1 = _mm512_set1_epi32(0x3f3f_3f3f);
            let k2 = _mm512_set1_epi32(0x0f0f_0f0f);
            let k3 = _mm512_set1_epi32(0x0303_0303);
            let or_hi = |lo: __m512i, src: __m512i| {
                _mm512_or_si512(
                    lo,
                    _mm512_slli_epi32(_mm512_and_si512(srl32(src, 6), k3), 4),
                )
            };
            let s03 = _mm512_and_si512(u0, k1);
            let s47 = or_hi(_mm512_and_si512(u2, k2), u0);
            let m03 = _mm512_and_si512(u1, k1);
            let m47 = or_hi(_mm512_and_si512(srl32(u2, 4), k2), u1);
            for j in 0..8 {
                let v = byte(if j < 4 { s03 } else { s47 }, (j % 4) as u32);
                _mm512_storeu_si512(sc.add(j * ROWS) as *mut __m512i, v);
            }
            for i in 0..4 {
                let m = if i < 2 { m03 } else { m47 };
                let q = 2 * (i % 2) as u32;
                _mm512_storeu_si512(
                    pairs.add(i * ROWS) as *mut __m512i,
                    pairs16(byte(m, q), byte(m, q + 1)),
                );
            }
            let dm = word(0);
            _mm512_storeu_ps(p.d.as_mut_ptr().add(b * ROWS), f16s(dm));
            _mm512_storeu_ps(p.dmin.as_mut_ptr().add(b * ROWS), f16s(srl32(dm, 16)));
        }
    }
}

/// [`crate::quantize_row_k`] with AVX-512, bit for bit: the element of largest magnitude (the
/// first of equals) sets the scale, `vcvtps2dq` rounds to nearest, ties to even, as the
/// scalar code's `round_even` does for these magnitudes.
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_row_k(x: &[f32], out: &mut [Q8KBlock]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(xs.as_ptr().add(16 * i)));
        let mut amax = _mm512_setzero_ps();
        for &v in &v {
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        }
        let amax = _mm512_reduce_max_ps(amax);
        if amax == 0.0 {
            *blk = Q8KBlock::default();
            continue;
        }
        let first = v
            .iter()
            .enumerate()
            .find_map(|(i, &v)| {
                let hit = _mm512_cmpeq_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(amax));
                (hit != 0).then(|| 16 * i + hit.trailing_zeros() as usize)
            })
            .expect("the maximum is one of the values");
        let iscale = -127.0 / xs[first];
        let sc = _mm512_set1_ps(iscale);
        let top = _mm512_set1_epi32(127);
        for (i, &v) in v.iter().enumerate() {
            let q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(sc, v)), top);
            _mm_storeu_si128(
                blk.qs.as_mut_ptr().add(16 * i) as *mut __m128i,
                _mm512_cvtepi32_epi8(q),
            );
            blk.bsums[i] = _mm512_reduce_add_epi32(q) as i16;
        }
        blk.d = 1.0 / iscale;
    }
}

/// The activation block's sums as the kernel broadcasts them: pairs of 32-element sums (Q4_K,
/// Q5_K; four used) or of 16-element sums (Q6_K; all eight).
fn act_pairs(ty: BlockType, x: &Q8KBlock) -> [i32; 8] {
    let s = |i: usize| x.bsums[i] as i32;
    if ty == BlockType::Q6K {
        std::array::from_fn(|i| pair(s(2 * i), s(2 * i + 1)))
    } else {
        let p32 = |j: usize| s(2 * j) + s(2 * j + 1);
        std::array::from_fn(|i| {
            if i < 4 {
                pair(p32(2 * i), p32(2 * i + 1))
            } else {
                0
            }
        })
    }
}

/// `C` activation rows (`x`, `xp`: `C × nb` blocks) against one panel; row `c`'s 16 results go
/// to `out + c · stride`, the lanes of `mask` only.
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `p` holds `nb` blocks; `x` and `xp` hold `C · nb` entries;
/// `out + c · stride + lane` is writable for every `c < C` and every lane in `mask`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn panel_rows<const SUBS: usize, const MIN: bool, const C: usize>(
    p: &Panel,
    nb: usize,
    x: &[Q8KBlock],
    xp: &[[i32; 8]],
    out: *mut f32,
    stride: usize,
    mask: __mmask16,
) {
    // Quads (four values) per sub-block: 8 (Q4_K, Q5_K) or 4 (Q6_K).
    let quads: usize = QK_K / SUBS / 4;
    debug_assert!(x.len() >= C * nb && xp.len() >= C * nb && p.d.len() >= nb * ROWS);
    let mut acc = [_mm512_setzero_ps(); C];
    for b in 0..nb {
        let qb = p.q.as_ptr().add(b * QBYTES);
        let mut isum = [_mm512_setzero_si512(); C];
        for j in 0..SUBS {
            let mut w = [_mm512_setzero_si512(); 8];
            for (t, w) in w.iter_mut().enumerate().take(quads) {
                *w = _mm512_loadu_si512(qb.add((j * quads + t) * 64) as *const __m512i);
            }
            let sc = _mm512_loadu_si512(p.sc.as_ptr().add((b * SUBS + j) * ROWS) as *const __m512i);
            for (c, isum) in isum.iter_mut().enumerate() {
                let xs = x.get_unchecked(c * nb + b).qs.as_ptr().add(j * quads * 4) as *const i32;
                let mut s = _mm512_setzero_si512();
                for (t, &w) in w.iter().enumerate().take(quads) {
                    s = _mm512_dpbusd_epi32(s, w, _mm512_set1_epi32(xs.add(t).read_unaligned()));
                }
                *isum = _mm512_add_epi32(*isum, _mm512_mullo_epi32(s, sc));
            }
        }
        let d = _mm512_loadu_ps(p.d.as_ptr().add(b * ROWS));
        let dmin = _mm512_loadu_ps(p.dmin.as_ptr().add(b * ROWS));
        let pairs = p.pairs.as_ptr().add(b * SUBS / 2 * ROWS);
        for (c, (acc, &isum)) in acc.iter_mut().zip(&isum).enumerate() {
            let xb = x.get_unchecked(c * nb + b);
            let xpc = xp.get_unchecked(c * nb + b);
            let mut o = _mm512_setzero_si512();
            for (i, &v) in xpc.iter().enumerate().take(SUBS / 2) {
                let pw = _mm512_loadu_si512(pairs.add(i * ROWS) as *const __m512i);
                o = _mm512_dpwssd_epi32(o, pw, _mm512_set1_epi32(v));
            }
            let xd = _mm512_set1_ps(xb.d);
            let t = if MIN {
                let t1 = _mm512_mul_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(isum));
                let t2 = _mm512_mul_ps(_mm512_mul_ps(dmin, xd), _mm512_cvtepi32_ps(o));
                _mm512_sub_ps(t1, t2)
            } else {
                let is = _mm512_sub_epi32(isum, _mm512_slli_epi32(o, 5));
                _mm512_mul_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(is))
            };
            *acc = _mm512_add_ps(*acc, t);
        }
    }
    for (c, &acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(c * stride), mask, acc);
    }
}

/// Every activation row against one packed panel, eight rows at a time, then four, two, one.
///
/// # Safety
/// As [`panel_rows`], for all `m` rows of `x`.
unsafe fn panel_all<const SUBS: usize, const MIN: bool>(
    p: &Panel,
    nb: usize,
    (x, xp): (&[Q8KBlock], &[[i32; 8]]),
    m: usize,
    out: *mut f32,
    stride: usize,
    mask: __mmask16,
) {
    let mut c = 0;
    while c < m {
        let (xs, ps, o) = (&x[c * nb..], &xp[c * nb..], out.add(c * stride));
        c += match m - c {
            8.. => {
                panel_rows::<SUBS, MIN, 8>(p, nb, xs, ps, o, stride, mask);
                8
            }
            4..=7 => {
                panel_rows::<SUBS, MIN, 4>(p, nb, xs, ps, o, stride, mask);
                4
            }
            2 | 3 => {
                panel_rows::<SUBS, MIN, 2>(p, nb, xs, ps, o, stride, mask);
                2
            }
            _ => {
                panel_rows::<SUBS, MIN, 1>(p, nb, xs, ps, o, stride, mask);
                1
            }
        };
    }
}

/// An output pointer that tasks on other threads write disjoint columns of.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes its own panel's columns (see `gemm_k`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the whole `Out`, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[i, j] = Σ_t x[i, t] · W[j, t]` (`m × n`, row-major) for a K-quant `W` in ggml's layout.
/// Panics if the CPU lacks AVX-512 VNNI, the type is not a K-quant or the shapes do not fit.
pub(crate) fn gemm_k(w: QMatrix<'_>, x: &[f32], m: usize, out: &mut [f32]) {
    assert!(supported(), "gemm_k needs AVX-512 VNNI");
    assert!(
        w.ty.is_k() && w.layout == Layout::Ggml,
        "gemm_k takes K-quants in ggml's layout"
    );
    let (n, k) = (w.n, w.k);
    assert!(
        k.is_multiple_of(QK_K),
        "k = {k} is not a multiple of {QK_K}"
    );
    let nb = k / QK_K;
    assert_eq!(
        w.data.len(),
        n * nb * w.ty.block_bytes(),
        "weight bytes do not match ({n}, {k})"
    );
    assert_eq!(x.len(), m * k, "activations do not match ({m}, {k})");
    assert_eq!(out.len(), m * n, "output does not match ({m}, {n})");
    if m == 0 || n == 0 {
        return;
    }
    let mut xq = vec![Q8KBlock::default(); m * nb];
    xq.par_chunks_mut(nb)
        .zip(x.par_chunks(k))
        .for_each(|(q, row)| {
            // SAFETY: supported() checked the CPU.
            unsafe { quantize_row_k(row, q) }
        });
    let xp: Vec<[i32; 8]> = xq.iter().map(|b| act_pairs(w.ty, b)).collect();
    let o = Out(out.as_mut_ptr());
    (0..n.div_ceil(ROWS)).into_par_iter().for_each(|t| {
        let r0 = t * ROWS;
        let mask = (((1u32 << ROWS.min(n - r0)) - 1) & 0xFFFF) as __mmask16;
        PANEL.with(|p| {
            let mut p = p.borrow_mut();
            // SAFETY: supported() checked the CPU; the shapes were checked above; the panel holds nb blocks; xq and xp hold
            // m · nb entries; this task alone writes columns r0..r0 + 16 (those in the mask,
            // all < n) of every row of the m × n output.
            unsafe {
                pack(&w, r0, &mut p);
                let dst = o.get().add(r0);
                if w.ty == BlockType::Q6K {
                    panel_all::<16, false>(&p, nb, (&xq, &xp), m, dst, n, mask);
                } else {
                    panel_all::<8, true>(&p, nb, (&xq, &xp), m, dst, n, mask);
                }
            }
        });
    });
}
