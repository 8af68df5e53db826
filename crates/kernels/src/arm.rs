//! NEON kernels for aarch64. NEON is part of the aarch64 baseline; the dot-product extension
//! (`sdot`, FEAT_DotProd) is detected at run time and used through inline assembly (its
//! intrinsics are not stable Rust yet). Without it the integer products go through `smull` and
//! pairwise widening adds. Every block's integer dot product is exact whichever way it is
//! computed, and the f32 accumulation over blocks is the scalar code's expression in the scalar
//! code's order, so these kernels equal the scalar path bit for bit. Each kernel also runs four
//! activation rows per pass over one unpacked weight row (prefill), with the same per-row
//! arithmetic as one row alone.
#![allow(unsafe_code)]

use crate::scalar::scale_min_k4;
use crate::{f16_at, BlockType, Q8Block, Q8KBlock, RowDot, RowDot4};
use std::arch::aarch64::*;
use std::arch::asm;

use crate::tag::{
    block_bytes, has_min, Q4_0 as T_Q4_0, Q4_1 as T_Q4_1, Q5_0 as T_Q5_0, Q5_1 as T_Q5_1,
    Q8_0 as T_Q8_0,
};

/// Whether the CPU has the dot-product instructions.
pub(crate) fn have_dotprod() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| std::arch::is_aarch64_feature_detected!("dotprod"))
}

/// `acc + Σ a·b` over groups of four bytes: `sdot` with `DP`, `smull` + `sadalp` otherwise. The
/// lanes group the products differently, but the sum over all lanes is the same integer.
#[inline(always)]
unsafe fn idot<const DP: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if DP {
        let mut acc = acc;
        // SAFETY: callers with DP = true run inside a `dotprod` function, reached only after
        // run-time detection; the instruction touches registers only.
        asm!(
            "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
            inout(vreg) acc,
            in(vreg) a,
            in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    } else {
        // |a·b| <= 128 · 128, which fits i16; the pairwise adds widen to i32.
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// The dot products of a 32-element type: one row, and four activation rows per pass.
pub(crate) fn dots32(ty: BlockType, dotprod: bool) -> (RowDot<Q8Block>, RowDot4<Q8Block>) {
    // SAFETY (all closures): NEON is baseline on aarch64, `dotprod` is only true after run-time
    // detection, and the kernels check the row lengths they index.
    macro_rules! pair {
        ($t:expr) => {
            if dotprod {
                (
                    (|w, x| unsafe { dot32_dp::<{ $t }, 1>(w, [x])[0] }) as RowDot<Q8Block>,
                    (|w, x| unsafe { dot32_dp::<{ $t }, 4>(w, x) }) as RowDot4<Q8Block>,
                )
            } else {
                (
                    (|w, x| unsafe { dot32_base::<{ $t }, 1>(w, [x])[0] }) as RowDot<Q8Block>,
                    (|w, x| unsafe { dot32_base::<{ $t }, 4>(w, x) }) as RowDot4<Q8Block>,
                )
            }
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

/// The dot products of a K-quant type: one row, and four activation rows per pass.
pub(crate) fn dots_k(ty: BlockType, dotprod: bool) -> (RowDot<Q8KBlock>, RowDot4<Q8KBlock>) {
    // SAFETY (all closures): as in `dots32`.
    macro_rules! pair {
        ($dp:ident, $base:ident $(, $c:expr)?) => {
            if dotprod {
                (
                    (|w, x| unsafe { $dp::<$($c,)? 1>(w, [x])[0] }) as RowDot<Q8KBlock>,
                    (|w, x| unsafe { $dp::<$($c,)? 4>(w, x) }) as RowDot4<Q8KBlock>,
                )
            } else {
                (
                    (|w, x| unsafe { $base::<$($c,)? 1>(w, [x])[0] }) as RowDot<Q8KBlock>,
                    (|w, x| unsafe { $base::<$($c,)? 4>(w, x) }) as RowDot4<Q8KBlock>,
                )
            }
        };
    }
    match ty {
        BlockType::Q4K => pair!(q45k_dp, q45k_base, false),
        BlockType::Q5K => pair!(q45k_dp, q45k_base, true),
        _ => pair!(q6k_dp, q6k_base),
    }
}

/// Sixteen bytes, each 0x10 where bit i of `bits` is set (i = byte index), else 0.
#[inline(always)]
unsafe fn bit4_of(bits: u16) -> uint8x16_t {
    const MASK: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let v = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
    vandq_u8(vtstq_u8(v, vld1q_u8(MASK.as_ptr())), vdupq_n_u8(0x10))
}

/// Block `wb`'s 32 values as signed bytes: elements 0..16 and 16..32.
#[inline(always)]
unsafe fn weights32<const T: u8>(wb: *const u8) -> (int8x16_t, int8x16_t) {
    match T {
        T_Q8_0 => (
            vld1q_s8(wb.add(2) as *const i8),
            vld1q_s8(wb.add(18) as *const i8),
        ),
        T_Q4_0 | T_Q4_1 => {
            let v = vld1q_u8(wb.add(if T == T_Q4_0 { 2 } else { 4 }));
            let lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
            if T == T_Q4_0 {
                let off = vdupq_n_s8(8);
                (vsubq_s8(lo, off), vsubq_s8(hi, off))
            } else {
                (lo, hi)
            }
        }
        _ => {
            let at = if T == T_Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes(std::ptr::read_unaligned(wb.add(at) as *const [u8; 4]));
            let v = vld1q_u8(wb.add(at + 4));
            let lo = vorrq_u8(vandq_u8(v, vdupq_n_u8(0x0F)), bit4_of(qh as u16));
            let hi = vorrq_u8(vshrq_n_u8::<4>(v), bit4_of((qh >> 16) as u16));
            let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
            if T == T_Q5_0 {
                let off = vdupq_n_s8(16);
                (vsubq_s8(lo, off), vsubq_s8(hi, off))
            } else {
                (lo, hi)
            }
        }
    }
}

/// One weight row of a 32-element type times `R` activation rows.
#[inline(always)]
unsafe fn dot32_body<const T: u8, const DP: bool, const R: usize>(
    w: &[u8],
    x: [&[Q8Block]; R],
) -> [f32; R] {
    let bb = block_bytes(T);
    let nb = w.len() / bb;
    let x = x.map(|r| &r[..nb]);
    let mut sum = [0f32; R];
    for b in 0..nb {
        let wb = &w[b * bb..(b + 1) * bb];
        let (lo, hi) = weights32::<T>(wb.as_ptr());
        let d = f16_at(wb, 0);
        let m = if has_min(T) { f16_at(wb, 2) } else { 0.0 };
        for (s, xr) in sum.iter_mut().zip(x) {
            let xb = &xr[b];
            let xs = xb.qs.as_ptr();
            let acc = idot::<DP>(vdupq_n_s32(0), lo, vld1q_s8(xs));
            let si = vaddvq_s32(idot::<DP>(acc, hi, vld1q_s8(xs.add(16))));
            // The scalar path's expression (symmetric types add m · s = 0).
            *s += d * xb.d * si as f32 + m * xb.s;
        }
    }
    sum
}

#[target_feature(enable = "dotprod")]
unsafe fn dot32_dp<const T: u8, const R: usize>(w: &[u8], x: [&[Q8Block]; R]) -> [f32; R] {
    dot32_body::<T, true, R>(w, x)
}

unsafe fn dot32_base<const T: u8, const R: usize>(w: &[u8], x: [&[Q8Block]; R]) -> [f32; R] {
    dot32_body::<T, false, R>(w, x)
}

/// The integer dot product of 32 weight bytes (two vectors) with activations at `xs`.
#[inline(always)]
unsafe fn dot_2x16<const DP: bool>(q0: int8x16_t, q1: int8x16_t, xs: *const i8) -> i32 {
    let acc = idot::<DP>(vdupq_n_s32(0), q0, vld1q_s8(xs));
    vaddvq_s32(idot::<DP>(acc, q1, vld1q_s8(xs.add(16))))
}

/// One Q4_K (`FIVE = false`) or Q5_K weight row times `R` Q8_K activation rows.
#[inline(always)]
unsafe fn q45k_body<const FIVE: bool, const DP: bool, const R: usize>(
    w: &[u8],
    x: [&[Q8KBlock]; R],
) -> [f32; R] {
    let bb = if FIVE { 176 } else { 144 };
    let nb = w.len() / bb;
    let x = x.map(|r| &r[..nb]);
    let mut sum = [0f32; R];
    let m4 = vdupq_n_u8(0x0F);
    for b in 0..nb {
        let wb = &w[b * bb..(b + 1) * bb];
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, 2));
        let mut sc = [0i32; 8];
        let mut mn = [0i32; 8];
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &wb[4..16]);
            sc[j] = s as i32;
            mn[j] = m as i32;
        }
        let qs = wb[if FIVE { 48 } else { 16 }..].as_ptr();
        let (qh0, qh1) = if FIVE {
            (vld1q_u8(wb.as_ptr().add(16)), vld1q_u8(wb.as_ptr().add(32)))
        } else {
            (vdupq_n_u8(0), vdupq_n_u8(0))
        };
        // Sub-block 2j is the low nibbles of bytes 32j..32j+32, sub-block 2j + 1 the high ones;
        // Q5_K's fifth bits are bits 2j and 2j + 1 of qh.
        let mut q = [vdupq_n_s8(0); 16];
        for j in 0..4 {
            let (v0, v1) = (vld1q_u8(qs.add(32 * j)), vld1q_u8(qs.add(32 * j + 16)));
            let (mut l0, mut l1) = (vandq_u8(v0, m4), vandq_u8(v1, m4));
            let (mut h0, mut h1) = (vshrq_n_u8::<4>(v0), vshrq_n_u8::<4>(v1));
            if FIVE {
                let bit16 = vdupq_n_u8(0x10);
                let (bl, bh) = (vdupq_n_u8(1 << (2 * j)), vdupq_n_u8(2 << (2 * j)));
                l0 = vorrq_u8(l0, vandq_u8(vtstq_u8(qh0, bl), bit16));
                l1 = vorrq_u8(l1, vandq_u8(vtstq_u8(qh1, bl), bit16));
                h0 = vorrq_u8(h0, vandq_u8(vtstq_u8(qh0, bh), bit16));
                h1 = vorrq_u8(h1, vandq_u8(vtstq_u8(qh1, bh), bit16));
            }
            q[4 * j] = vreinterpretq_s8_u8(l0);
            q[4 * j + 1] = vreinterpretq_s8_u8(l1);
            q[4 * j + 2] = vreinterpretq_s8_u8(h0);
            q[4 * j + 3] = vreinterpretq_s8_u8(h1);
        }
        for (s, xr) in sum.iter_mut().zip(x) {
            let xb = &xr[b];
            let (mut isum, mut mins) = (0i32, 0i32);
            for j in 0..8 {
                let dot = dot_2x16::<DP>(q[2 * j], q[2 * j + 1], xb.qs.as_ptr().add(32 * j));
                isum += sc[j] * dot;
                mins += mn[j] * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32);
            }
            *s += d * xb.d * isum as f32 - dmin * xb.d * mins as f32;
        }
    }
    sum
}

#[target_feature(enable = "dotprod")]
unsafe fn q45k_dp<const FIVE: bool, const R: usize>(w: &[u8], x: [&[Q8KBlock]; R]) -> [f32; R] {
    q45k_body::<FIVE, true, R>(w, x)
}

unsafe fn q45k_base<const FIVE: bool, const R: usize>(w: &[u8], x: [&[Q8KBlock]; R]) -> [f32; R] {
    q45k_body::<FIVE, false, R>(w, x)
}

/// One Q6_K weight row times `R` Q8_K activation rows.
#[inline(always)]
unsafe fn q6k_body<const DP: bool, const R: usize>(w: &[u8], x: [&[Q8KBlock]; R]) -> [f32; R] {
    let nb = w.len() / 210;
    let x = x.map(|r| &r[..nb]);
    let mut sum = [0f32; R];
    let (m4, m30, m3) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30), vdupq_n_u8(3));
    let off = vdupq_n_s8(32);
    for b in 0..nb {
        let wb = &w[b * 210..(b + 1) * 210];
        let d = f16_at(wb, 208);
        let (ql, qh) = (wb.as_ptr(), wb.as_ptr().add(128));
        // Vector s holds sub-block s (16 values), minus 32.
        let mut q = [vdupq_n_s8(0); 16];
        for n in 0..2 {
            let l: [uint8x16_t; 4] = std::array::from_fn(|i| vld1q_u8(ql.add(64 * n + 16 * i)));
            let h: [uint8x16_t; 2] = std::array::from_fn(|i| vld1q_u8(qh.add(32 * n + 16 * i)));
            for i in 0..2 {
                let y0 = vorrq_u8(vandq_u8(l[i], m4), vshlq_n_u8::<4>(vandq_u8(h[i], m3)));
                let y1 = vorrq_u8(vandq_u8(l[2 + i], m4), vandq_u8(vshlq_n_u8::<2>(h[i]), m30));
                let y2 = vorrq_u8(vshrq_n_u8::<4>(l[i]), vandq_u8(h[i], m30));
                let y3 = vorrq_u8(
                    vshrq_n_u8::<4>(l[2 + i]),
                    vandq_u8(vshrq_n_u8::<2>(h[i]), m30),
                );
                for (k, y) in [y0, y1, y2, y3].into_iter().enumerate() {
                    q[8 * n + 2 * k + i] = vsubq_s8(vreinterpretq_s8_u8(y), off);
                }
            }
        }
        for (s, xr) in sum.iter_mut().zip(x) {
            let xb = &xr[b];
            let mut isum = 0i32;
            for (k, &sc) in wb[192..208].iter().enumerate() {
                let acc = idot::<DP>(vdupq_n_s32(0), q[k], vld1q_s8(xb.qs.as_ptr().add(16 * k)));
                isum += (sc as i8) as i32 * vaddvq_s32(acc);
            }
            *s += d * xb.d * isum as f32;
        }
    }
    sum
}

#[target_feature(enable = "dotprod")]
unsafe fn q6k_dp<const R: usize>(w: &[u8], x: [&[Q8KBlock]; R]) -> [f32; R] {
    q6k_body::<true, R>(w, x)
}

unsafe fn q6k_base<const R: usize>(w: &[u8], x: [&[Q8KBlock]; R]) -> [f32; R] {
    q6k_body::<false, R>(w, x)
}

/// `Σ a·b` in four f32x4 accumulators, then the tail.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut i, mut s) = (0, 0f32);
    // SAFETY: every load reads lanes i..i + 16 (or i + 4) with that end <= n.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        while i + 16 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + 4 * j;
                *acc = vfmaq_f32(
                    *acc,
                    vld1q_f32(a.as_ptr().add(o)),
                    vld1q_f32(b.as_ptr().add(o)),
                );
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vfmaq_f32(
                acc[0],
                vld1q_f32(a.as_ptr().add(i)),
                vld1q_f32(b.as_ptr().add(i)),
            );
            i += 4;
        }
        s += vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ));
    }
    for j in i..n {
        s += a[j] * b[j];
    }
    s
}

/// `y += a · x`, four lanes at a time.
pub(crate) fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let mut i = 0;
    // SAFETY: every access covers lanes i..i + 4 with i + 4 <= n.
    unsafe {
        let av = vdupq_n_f32(a);
        while i + 4 <= n {
            let p = y.as_mut_ptr().add(i);
            vst1q_f32(p, vfmaq_f32(vld1q_f32(p), av, vld1q_f32(x.as_ptr().add(i))));
            i += 4;
        }
    }
    for j in i..n {
        y[j] += a * x[j];
    }
}
