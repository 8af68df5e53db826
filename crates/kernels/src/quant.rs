//! Activations quantized for the integer dot products: Q8_0/Q8_1 blocks of 32 and Q8_K
//! blocks of 256, with llama.cpp's round-half-to-even.

use half::f16;

use crate::{QK, QK_K};

/// An activation block of 32: signed bytes, scale `d`, and (for Q8_1) `s = d·Σq`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8Block {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) qs: [i8; QK],
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

/// An activation block of 256 for the K-quants (llama.cpp's `block_q8_K`).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8KBlock {
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
    pub(crate) d: f32,
}

impl Default for Q8KBlock {
    fn default() -> Self {
        Self {
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
            d: 0.0,
        }
    }
}

/// Round to nearest, ties to even, for |x| < 2²²: adding and subtracting 1.5·2²³ leaves the
/// rounded value (the default rounding mode does the work). llama.cpp's `nearest_int` trick; a
/// plain add where `round_ties_even` would be a libm call on baseline x86-64.
#[inline]
pub(crate) fn round_even(x: f32) -> f32 {
    (x + 12_582_912.0) - 12_582_912.0
}

/// Quantizes one row like llama.cpp's `quantize_row_q8_0` / `quantize_row_q8_1` (AVX2 rounding:
/// nearest, ties to even). `d` and `s` are kept as the f16 values llama.cpp stores, widened.
pub(crate) fn quantize_row(x: &[f32], out: &mut [Q8Block], with_sum: bool) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            let r = round_even(v * id) as i32;
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

/// Quantizes one row like llama.cpp's `quantize_row_q8_K`: the scale comes from the element of
/// largest magnitude with its sign (`iscale = −127 / max`), values round to nearest, ties to even,
/// and each 16 elements keep their sum.
pub(crate) fn quantize_row_k(x: &[f32], out: &mut [Q8KBlock]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *blk = Q8KBlock::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            *q = (round_even(iscale * v) as i32).min(127) as i8;
        }
        for (s, qs) in blk.bsums.iter_mut().zip(blk.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        blk.d = 1.0 / iscale;
    }
}
