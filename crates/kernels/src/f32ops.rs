//! Dense f32 helpers: dot products, the one-query attention head over a KV cache, and axpy,
//! with AVX2+FMA (or NEON) where the CPU has it and a scalar loop elsewhere.

#[cfg(target_arch = "aarch64")]
use crate::arm;
#[cfg(target_arch = "x86_64")]
use crate::{have_avx2, x86};

/// Dot product of two f32 slices of equal length (AVX2+FMA when the CPU has it, eight lanes and
/// four accumulators; a scalar loop otherwise). Used for exact dense search over unit vectors.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time; the loads stay inside both slices.
        #[allow(unsafe_code)]
        return unsafe { x86::dot_f32_avx2(a, b) };
    }
    #[cfg(target_arch = "aarch64")]
    {
        arm::dot_f32(a, b)
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

/// Single-query attention for one head: `out = softmax(scale · K·q) · V` over the `len` cached
/// positions of `k` and `v` (`len × d` each, row-major, `d = q.len()`). One thread, a fixed
/// order of operations, so the result does not depend on who calls it. The scores live in a
/// per-thread scratch buffer (no allocation in steady state).
pub fn attention_head(q: &[f32], k: &[f32], v: &[f32], scale: f32, out: &mut [f32]) {
    attention_head_within(q, k, v, scale, out, 0)
}

/// [`attention_head`] for a cache with room for `capacity` positions: the scratch buffer is
/// sized for all of them at once, so it does not grow again while the cache fills up.
pub fn attention_head_within(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    out: &mut [f32],
    capacity: usize,
) {
    let d = q.len();
    assert!(d > 0 && out.len() == d, "attention_head: q and out differ");
    assert!(
        k.len() == v.len() && k.len().is_multiple_of(d),
        "attention_head: bad K/V"
    );
    thread_local! {
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCORES.with(|s| {
        let mut s = s.borrow_mut();
        s.clear();
        s.reserve(capacity.max(k.len() / d));
        s.resize(k.len() / d, 0.0);
        #[cfg(target_arch = "x86_64")]
        if have_avx2() && d.is_multiple_of(8) {
            // SAFETY: AVX2, FMA were detected; every access is inside the checked slices.
            #[allow(unsafe_code)]
            return unsafe { x86::attention_head_avx2(q, k, v, scale, &mut s, out) };
        }
        #[cfg(target_arch = "aarch64")]
        {
            attention_head_by(q, k, v, scale, &mut s, out, arm::dot_f32, arm::axpy_f32)
        }
        #[cfg(not(target_arch = "aarch64"))]
        {
            attention_head_scalar(q, k, v, scale, &mut s, out)
        }
    })
}

/// The portable [`attention_head`].
#[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
pub(crate) fn attention_head_scalar(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    s: &mut [f32],
    out: &mut [f32],
) {
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let axpy = |a: f32, x: &[f32], y: &mut [f32]| {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    };
    attention_head_by(q, k, v, scale, s, out, dot, axpy)
}

/// [`attention_head`] in three passes over the cache with the given dot product and `y += a·x`:
/// scores, softmax (`exp` from the standard library), then the weighted sum of the values.
#[allow(clippy::too_many_arguments)]
fn attention_head_by(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    s: &mut [f32],
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(f32, &[f32], &mut [f32]),
) {
    let d = q.len();
    let mut max = f32::NEG_INFINITY;
    for (sc, kr) in s.iter_mut().zip(k.chunks_exact(d)) {
        *sc = dot(q, kr) * scale;
        max = max.max(*sc);
    }
    let mut sum = 0f32;
    for sc in s.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (&w, vr) in s.iter().zip(v.chunks_exact(d)) {
        axpy(w * inv, vr, out);
    }
}

/// `y += a · x` over f32 slices of equal length (AVX2+FMA when the CPU has it).
pub fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time; the accesses stay inside both slices.
        #[allow(unsafe_code)]
        return unsafe { x86::axpy_f32_avx2(a, x, y) };
    }
    #[cfg(target_arch = "aarch64")]
    arm::axpy_f32(a, x, y);
    #[cfg(not(target_arch = "aarch64"))]
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
