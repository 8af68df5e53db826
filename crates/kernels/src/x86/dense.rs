//! Dense f32 kernels with AVX2 + FMA: dot product, axpy, and the one-query attention head
//! (scores, a vectorised `exp`, the weighted sum of values).

use super::hsum;
use std::arch::x86_64::*;

/// f32 dot product, eight lanes and four accumulators.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `a` and `b` have equal lengths.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
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

/// `y += a · x`, eight lanes at a time.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` and `y` have equal lengths.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy_f32_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
        _mm256_storeu_ps(py.add(i), v);
        i += 8;
    }
    while i < n {
        *py.add(i) += a * *px.add(i);
        i += 1;
    }
}

/// Lane j = the sum of the eight lanes of `a[j]` (a transposing reduction).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8(a: [__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    // u0 = [Σ a0..a3 over the low halves | Σ over the high halves], u1 likewise for a4..a7.
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
    let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
    _mm256_add_ps(lo, hi)
}

/// `e^x` for eight lanes (Cephes' single-precision polynomial, ~1 ulp over the range softmax
/// uses; inputs below −87.3 give e^−87.3 ≈ 1e−38 instead of smaller).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
        _mm256_set1_ps(1.0),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// [`crate::attention_head`] with AVX2 (`d` a multiple of 8): scores by 8-lane dot products,
/// exponentials eight at a time, and the weighted sum of values kept in registers 64 dims at a
/// time.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `d = q.len()` is a multiple of 8, `k` and `v` hold
/// `s.len()` rows of `d`, `out` has `d` elements.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn attention_head_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    s: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let len = s.len();
    assert!(k.len() >= len * d && v.len() >= len * d && out.len() == d && d.is_multiple_of(8));
    let (pq, pk, pv) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
    // Scores eight keys at a time: one accumulator per key, q loaded once per eight keys, and
    // one transposing reduction for the eight sums instead of a horizontal sum per key.
    let sv = _mm256_set1_ps(scale);
    let mut maxv = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut p0 = 0;
    while p0 + 8 <= len {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < d {
            let qv = _mm256_loadu_ps(pq.add(i));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(pk.add((p0 + j) * d + i)), *a);
            }
            i += 8;
        }
        let sc = _mm256_mul_ps(hsum8(acc), sv);
        _mm256_storeu_ps(s.as_mut_ptr().add(p0), sc);
        maxv = _mm256_max_ps(maxv, sc);
        p0 += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), maxv);
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for (p, sc) in s.iter_mut().enumerate().skip(p0) {
        let kr = pk.add(p * d);
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= d {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), _mm256_loadu_ps(kr.add(i)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pq.add(i + 8)),
                _mm256_loadu_ps(kr.add(i + 8)),
                a1,
            );
            i += 16;
        }
        if i < d {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), _mm256_loadu_ps(kr.add(i)), a0);
        }
        *sc = hsum(_mm256_add_ps(a0, a1)) * scale;
        max = max.max(*sc);
    }
    // Exponentials and their sum, eight scores at a time (lanes summed in a fixed order).
    let mv = _mm256_set1_ps(max);
    let mut sumv = _mm256_setzero_ps();
    let mut p = 0;
    while p + 8 <= len {
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(p)), mv));
        _mm256_storeu_ps(s.as_mut_ptr().add(p), e);
        sumv = _mm256_add_ps(sumv, e);
        p += 8;
    }
    let mut sum = hsum(sumv);
    if p < len {
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..len - p].copy_from_slice(&s[p..]);
        let mut e = [0f32; 8];
        _mm256_storeu_ps(
            e.as_mut_ptr(),
            exp256(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), mv)),
        );
        for (j, sc) in s[p..].iter_mut().enumerate() {
            *sc = e[j];
            sum += e[j];
        }
    }
    let inv = 1.0 / sum;
    // out = Σ_p s_p · V_p / sum, 64 output dims (eight registers) per pass over the positions.
    let mut c0 = 0;
    while c0 < d {
        let width = (d - c0).min(64);
        let lanes = width / 8;
        let mut acc = [_mm256_setzero_ps(); 8];
        for (p, &w) in s.iter().enumerate() {
            let wv = _mm256_set1_ps(w);
            let vr = pv.add(p * d + c0);
            for (j, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr.add(8 * j)), *a);
            }
        }
        let iv = _mm256_set1_ps(inv);
        for (j, a) in acc.iter().enumerate().take(lanes) {
            _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * j), _mm256_mul_ps(*a, iv));
        }
        c0 += width;
    }
}
