//! flywheel-kernels: matrix products with GGUF block-quantized weights on the CPU.
//!
//! The arithmetic follows llama.cpp's CPU backend exactly, so greedy outputs agree with it:
//! each activation row is quantized once per call to the weight type's "vec-dot" block type
//! (Q8_1 for Q4_1, Q8_0 for Q4_0 and Q8_0) with round-half-to-even and an `f16(d · Σq)` sum term,
//! then each output is a sum over blocks of `d_w·d_x·Σ(q_w·q_x)` (+ `m_w·s_x` for Q4_1),
//! accumulated in f32. AVX2+FMA is used when the CPU has it (checked at run time); a scalar
//! path does the same arithmetic everywhere else. Output columns run in parallel on rayon.
//!
//! Block layouts (ggml): Q4_0 `{d: f16, qs: [u8; 16]}` (value = (nibble − 8)·d), Q4_1
//! `{d: f16, m: f16, qs: [u8; 16]}` (value = nibble·d + m), Q8_0 `{d: f16, qs: [i8; 32]}`;
//! byte j holds element j in its low nibble and element j + 16 in its high nibble.
#![deny(missing_docs)]

use half::f16;
use rayon::prelude::*;

/// Elements per block for every type here.
pub const QK: usize = 32;

/// The block types these kernels implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// 4-bit, symmetric (18 bytes a block).
    Q4_0,
    /// 4-bit with a per-block minimum (20 bytes a block).
    Q4_1,
    /// 8-bit, symmetric (34 bytes a block).
    Q8_0,
}

impl BlockType {
    /// Bytes per block of 32 elements.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q8_0 => 34,
        }
    }
}

/// An activation block: 32 signed bytes, scale `d`, and (for Q8_1) `s = d·Σq`.
#[derive(Clone, Copy)]
#[repr(C)]
struct Q8Block {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

impl Default for Q8Block {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        }
    }
}

/// Quantizes one row like llama.cpp's `quantize_row_q8_0` / `quantize_row_q8_1` (AVX2 rounding:
/// nearest, ties to even). `d` and `s` are kept as the f16 values llama.cpp stores, widened.
fn quantize_row(x: &[f32], out: &mut [Q8Block], with_sum: bool) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        blk.d = f16::from_f32(d).to_f32();
        blk.s = if with_sum {
            f16::from_f32(d * sum as f32).to_f32()
        } else {
            0.0
        };
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scalar dot product of one weight row with one quantized activation row.
fn dot_scalar(ty: BlockType, w: &[u8], x: &[Q8Block]) -> f32 {
    let bb = ty.block_bytes();
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(bb).zip(x) {
        match ty {
            BlockType::Q4_0 | BlockType::Q4_1 => {
                let (qs, dw, mw) = if ty == BlockType::Q4_0 {
                    (&wb[2..18], f16_at(wb, 0), 0.0)
                } else {
                    (&wb[4..20], f16_at(wb, 0), f16_at(wb, 2))
                };
                let off = if ty == BlockType::Q4_0 { 8 } else { 0 };
                let mut si = 0i32;
                for (j, &b) in qs.iter().enumerate() {
                    let lo = (b & 0x0F) as i32 - off;
                    let hi = (b >> 4) as i32 - off;
                    si += lo * xb.qs[j] as i32 + hi * xb.qs[j + 16] as i32;
                }
                sum += dw * xb.d * si as f32 + mw * xb.s;
            }
            BlockType::Q8_0 => {
                let dw = f16_at(wb, 0);
                let mut si = 0i32;
                for j in 0..QK {
                    si += (wb[2 + j] as i8) as i32 * xb.qs[j] as i32;
                }
                sum += dw * xb.d * si as f32;
            }
        }
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA dot products, the same instruction sequence as llama.cpp's x86 kernels.
    #![allow(unsafe_code)]
    use super::{BlockType, Q8Block};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// An f16 scale at byte `at`, widened with the F16C instruction.
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn h(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds whole blocks matching `x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(ty: BlockType, w: &[u8], x: &[Q8Block]) -> f32 {
        let bb = ty.block_bytes();
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        for (wb, xb) in w.chunks_exact(bb).zip(x) {
            let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let (p16, d) = match ty {
                BlockType::Q4_1 | BlockType::Q4_0 => {
                    let off = if ty == BlockType::Q4_1 { 4 } else { 2 };
                    let raw = _mm_loadu_si128(wb.as_ptr().add(off) as *const __m128i);
                    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
                    let q = _mm256_and_si256(both, low); // lane 0: elements 0..16, lane 1: 16..32
                    let d = h(wb, 0) * xb.d;
                    if ty == BlockType::Q4_1 {
                        summs += h(wb, 2) * xb.s;
                        (_mm256_maddubs_epi16(q, qy), d)
                    } else {
                        let q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
                        let ax = _mm256_sign_epi8(q, q);
                        let sy = _mm256_sign_epi8(qy, q);
                        (_mm256_maddubs_epi16(ax, sy), d)
                    }
                }
                BlockType::Q8_0 => {
                    let q = _mm256_loadu_si256(wb.as_ptr().add(2) as *const __m256i);
                    let ax = _mm256_sign_epi8(q, q);
                    let sy = _mm256_sign_epi8(qy, q);
                    (_mm256_maddubs_epi16(ax, sy), h(wb, 0) * xb.d)
                }
            };
            let p32 = _mm256_madd_epi16(p16, ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p32), acc);
        }
        hsum(acc) + summs
    }

    /// [`dot`] of one weight row with four activation rows at once: each weight block is
    /// unpacked once and the four accumulators are independent (more work per load, no shared
    /// dependency chain). Every row's result is bit-identical to [`dot`] on that row alone.
    ///
    /// # Safety
    /// As [`dot`]; every `x[r]` matches `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4(ty: BlockType, w: &[u8], x: [&[Q8Block]; 4]) -> [f32; 4] {
        let bb = ty.block_bytes();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        for (b, wb) in w.chunks_exact(bb).enumerate() {
            let dw = h(wb, 0);
            match ty {
                BlockType::Q4_1 => {
                    let raw = _mm_loadu_si128(wb.as_ptr().add(4) as *const __m128i);
                    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
                    let q = _mm256_and_si256(both, low);
                    let mw = h(wb, 2);
                    for r in 0..4 {
                        let xb = x[r].get_unchecked(b);
                        let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        summs[r] += mw * xb.s;
                        let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(q, qy), ones);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dw * xb.d),
                            _mm256_cvtepi32_ps(p32),
                            acc[r],
                        );
                    }
                }
                BlockType::Q4_0 | BlockType::Q8_0 => {
                    let q = if ty == BlockType::Q4_0 {
                        let raw = _mm_loadu_si128(wb.as_ptr().add(2) as *const __m128i);
                        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
                        _mm256_sub_epi8(_mm256_and_si256(both, low), _mm256_set1_epi8(8))
                    } else {
                        _mm256_loadu_si256(wb.as_ptr().add(2) as *const __m256i)
                    };
                    let ax = _mm256_sign_epi8(q, q);
                    for r in 0..4 {
                        let xb = x[r].get_unchecked(b);
                        let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        let sy = _mm256_sign_epi8(qy, q);
                        let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dw * xb.d),
                            _mm256_cvtepi32_ps(p32),
                            acc[r],
                        );
                    }
                }
            }
        }
        [
            hsum(acc[0]) + summs[0],
            hsum(acc[1]) + summs[1],
            hsum(acc[2]) + summs[2],
            hsum(acc[3]) + summs[3],
        ]
    }
}

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

fn dot(ty: BlockType, w: &[u8], x: &[Q8Block], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2, FMA and F16C were detected at run time.
        #[allow(unsafe_code)]
        return unsafe { avx2::dot(ty, w, x) };
    }
    let _ = simd;
    dot_scalar(ty, w, x)
}

/// Which implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The best the CPU supports.
    Auto,
    /// The portable scalar code (the oracle for the SIMD path).
    Scalar,
}

/// A quantized `(n, k)` weight matrix: `n` rows of `k / 32` blocks in ggml layout.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    /// Block type.
    pub ty: BlockType,
    /// The raw blocks, row after row.
    pub data: &'a [u8],
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features), a multiple of 32.
    pub k: usize,
}

/// `out[i, j] = Σ_k x[i, k] · W[j, k]` for `x` of shape `(m, k)`. Panics if the slices do not
/// fit the shapes (callers check shapes at load time).
pub fn matmul(w: QMatrix<'_>, x: &[f32], m: usize, out: &mut [f32], path: Path) {
    let QMatrix { ty, data: w, n, k } = w;
    assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
    let row_bytes = k / QK * ty.block_bytes();
    assert_eq!(
        w.len(),
        n * row_bytes,
        "weight bytes do not match ({n}, {k})"
    );
    assert_eq!(x.len(), m * k, "activations do not match ({m}, {k})");
    assert_eq!(out.len(), m * n, "output does not match ({m}, {n})");
    let blocks = k / QK;
    let mut xq = vec![Q8Block::default(); m * blocks];
    let with_sum = ty == BlockType::Q4_1;
    for (row, q) in x.chunks_exact(k).zip(xq.chunks_exact_mut(blocks)) {
        quantize_row(row, q, with_sum);
    }
    let simd = path == Path::Auto && have_avx2();
    // Each task owns a range of output columns (weight rows) and fills them for every x row.
    const COLS: usize = 16;
    let tasks = n.div_ceil(COLS);
    let results: Vec<(usize, Vec<f32>)> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let c0 = t * COLS;
            let c1 = (c0 + COLS).min(n);
            let width = c1 - c0;
            let mut local = vec![0f32; m * width];
            for c in c0..c1 {
                let wr = &w[c * row_bytes..(c + 1) * row_bytes];
                let mut i = 0;
                // Four activation rows per pass over the weight row (same results as one by one).
                #[cfg(target_arch = "x86_64")]
                if simd {
                    while i + 4 <= m {
                        let xr = |r: usize| &xq[(i + r) * blocks..(i + r + 1) * blocks];
                        // SAFETY: `simd` is only true when AVX2, FMA and F16C were detected.
                        #[allow(unsafe_code)]
                        let v = unsafe { avx2::dot4(ty, wr, [xr(0), xr(1), xr(2), xr(3)]) };
                        for (r, val) in v.into_iter().enumerate() {
                            local[(i + r) * width + (c - c0)] = val;
                        }
                        i += 4;
                    }
                }
                for (r, xr) in xq.chunks_exact(blocks).enumerate().skip(i) {
                    local[r * width + (c - c0)] = dot(ty, wr, xr, simd);
                }
            }
            (c0, local)
        })
        .collect();
    for (c0, local) in results {
        let width = local.len() / m.max(1);
        for i in 0..m {
            out[i * n + c0..i * n + c0 + width].copy_from_slice(&local[i * width..(i + 1) * width]);
        }
    }
}

/// Dot product of two f32 slices of equal length (AVX2+FMA when the CPU has it, eight lanes and
/// four accumulators; a scalar loop otherwise). Used for exact dense search over unit vectors.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time; the loads stay inside both slices.
        #[allow(unsafe_code)]
        return unsafe { dot_f32_avx2(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(pa.add(i + 8 * k));
            let y = _mm256_loadu_ps(pb.add(i + 8 * k));
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = _mm256_loadu_ps(pa.add(i));
        let y = _mm256_loadu_ps(pb.add(i));
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    let mut total: f32 = lanes.iter().sum();
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

#[cfg(test)]
mod tests {

    #[test]
    fn dot_f32_matches_a_plain_sum() {
        for n in [0usize, 1, 7, 8, 31, 32, 33, 384, 385] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum();
            let got = dot_f32(&a, &b) as f64;
            assert!(
                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
        }
    }
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Quantizes weights the simple reference way (for tests): per block scale from the absmax.
    fn quantize_weights(ty: BlockType, w: &[f32]) -> Vec<u8> {
        let mut out = vec![];
        for xs in w.chunks_exact(QK) {
            match ty {
                BlockType::Q8_0 => {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    for v in xs {
                        out.push(((v / d).round() as i8) as u8);
                    }
                }
                BlockType::Q4_0 => {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 7.0;
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    for j in 0..16 {
                        let q = |v: f32| ((v / d).round() as i32 + 8).clamp(0, 15) as u8;
                        out.push(q(xs[j]) | (q(xs[j + 16]) << 4));
                    }
                }
                BlockType::Q4_1 => {
                    let min = xs.iter().cloned().fold(f32::MAX, f32::min);
                    let max = xs.iter().cloned().fold(f32::MIN, f32::max);
                    let d = (max - min) / 15.0;
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    for j in 0..16 {
                        let q = |v: f32| (((v - min) / d).round() as i32).clamp(0, 15) as u8;
                        out.push(q(xs[j]) | (q(xs[j + 16]) << 4));
                    }
                }
            }
        }
        out
    }

    fn dequantize(ty: BlockType, w: &[u8]) -> Vec<f32> {
        let mut out = vec![];
        for b in w.chunks_exact(ty.block_bytes()) {
            let d = f16_at(b, 0);
            match ty {
                BlockType::Q8_0 => out.extend(b[2..].iter().map(|&q| (q as i8) as f32 * d)),
                BlockType::Q4_0 | BlockType::Q4_1 => {
                    let (qs, m, off) = if ty == BlockType::Q4_0 {
                        (&b[2..], 0.0, 8.0)
                    } else {
                        (&b[4..], f16_at(b, 2), 0.0)
                    };
                    let mut v = [0f32; QK];
                    for j in 0..16 {
                        v[j] = ((qs[j] & 15) as f32 - off) * d + m;
                        v[j + 16] = ((qs[j] >> 4) as f32 - off) * d + m;
                    }
                    out.extend_from_slice(&v);
                }
            }
        }
        out
    }

    #[test]
    fn simd_equals_scalar_and_both_track_the_dequantized_product() {
        let mut seed = 1;
        for ty in [BlockType::Q4_0, BlockType::Q4_1, BlockType::Q8_0] {
            // Odd sizes: n not a multiple of the 16-column task width, m not a power of two.
            let (m, n, k) = (5, 37, 96);
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            x[7] = 250.0; // an outlier, as real activations have
            let wq = quantize_weights(ty, &w);
            let wm = QMatrix {
                ty,
                data: &wq,
                n,
                k,
            };
            let mut a = vec![0f32; m * n];
            let mut b = vec![0f32; m * n];
            matmul(wm, &x, m, &mut a, Path::Auto);
            matmul(wm, &x, m, &mut b, Path::Scalar);
            let wd = dequantize(ty, &wq);
            for i in 0..m {
                for j in 0..n {
                    let exact: f32 = (0..k).map(|t| x[i * k + t] * wd[j * k + t]).sum();
                    let (ai, bi) = (a[i * n + j], b[i * n + j]);
                    assert!(
                        (ai - bi).abs() <= 1e-4 * (1.0 + bi.abs()),
                        "{ty:?} simd {ai} vs scalar {bi}"
                    );
                    // Rounding each activation to its block's step d_x moves it by at most d_x / 2.
                    let bound: f32 = (0..k / QK)
                        .map(|b| {
                            let xs = &x[i * k + b * QK..i * k + (b + 1) * QK];
                            let dx = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                            let ws: f32 = wd[j * k + b * QK..j * k + (b + 1) * QK]
                                .iter()
                                .map(|v| v.abs())
                                .sum();
                            0.5 * dx * ws * 1.01
                        })
                        .sum();
                    assert!(
                        (bi - exact).abs() <= bound + 1e-3,
                        "{ty:?} ({i},{j}): {bi} vs exact {exact}, bound {bound}"
                    );
                }
            }
            // Row independence (the server's batched answers equal the same requests alone):
            // each row alone equals that row in the batch, bit for bit, whether the batch ran
            // it in a four-row pass or on its own.
            for i in 0..m {
                let mut one = vec![0f32; n];
                matmul(wm, &x[i * k..(i + 1) * k], 1, &mut one, Path::Auto);
                assert_eq!(&one[..], &a[i * n..(i + 1) * n], "{ty:?} row {i}");
            }
        }
    }

    #[test]
    fn activation_quantization_matches_llama_cpp_rules() {
        let mut x = [0f32; QK];
        x[0] = 1.0;
        x[1] = -0.5; // -0.5 * 127 = -63.5 → ties to even: -64
        x[2] = 2.0 / 254.0; // 1/127 of the max → exactly 1
        x[3] = 1.5 / 127.0; // 1.5 → 2 (tie to even)
        x[4] = 2.5 / 127.0; // 2.5 → 2 (tie to even)
        let mut out = [Q8Block::default()];
        quantize_row(&x, &mut out, true);
        assert_eq!(&out[0].qs[..5], &[127, -64, 1, 2, 2]);
        let d = 1.0f32 / 127.0;
        assert_eq!(out[0].d, f16::from_f32(d).to_f32());
        let sum = (127 - 64 + 1 + 2 + 2) as f32;
        assert_eq!(out[0].s, f16::from_f32(d * sum).to_f32());
    }
}
