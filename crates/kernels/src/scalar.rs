//! Portable kernels: the same integer arithmetic as the SIMD code (the oracle in tests, and the
//! path on CPUs without AVX2), plus ggml's dequantization of every block type.

use crate::{f16_at, BlockType, Q8Block, Q8KBlock, QK, QK_K};

/// The 32 quantized values of a 32-element block as integers, with its scale and minimum.
/// Symmetric types give signed values and `m = 0`; types with a minimum give unsigned values.
fn unpack32(ty: BlockType, b: &[u8]) -> ([i32; QK], f32, f32) {
    let mut q = [0i32; QK];
    let d = f16_at(b, 0);
    match ty {
        BlockType::Q8_0 => {
            for (v, &x) in q.iter_mut().zip(&b[2..34]) {
                *v = (x as i8) as i32;
            }
            (q, d, 0.0)
        }
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let (qs, m, off) = if ty == BlockType::Q4_0 {
                (&b[2..18], 0.0, 8)
            } else {
                (&b[4..20], f16_at(b, 2), 0)
            };
            for j in 0..16 {
                q[j] = (qs[j] & 0x0F) as i32 - off;
                q[j + 16] = (qs[j] >> 4) as i32 - off;
            }
            (q, d, m)
        }
        BlockType::Q5_0 | BlockType::Q5_1 => {
            let (at, m, off) = if ty == BlockType::Q5_0 {
                (2, 0.0, 16)
            } else {
                (4, f16_at(b, 2), 0)
            };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) as i32;
                let h1 = ((qh >> (j + 16)) & 1) as i32;
                q[j] = ((qs[j] & 0x0F) as i32 | (h0 << 4)) - off;
                q[j + 16] = ((qs[j] >> 4) as i32 | (h1 << 4)) - off;
            }
            (q, d, m)
        }
        _ => unreachable!("not a 32-element type"),
    }
}

/// One weight row (blocks of a 32-element type) times one activation row.
pub(crate) fn dot32(ty: BlockType, w: &[u8], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(ty.block_bytes()).zip(x) {
        let (q, d, m) = unpack32(ty, wb);
        let si: i32 = q.iter().zip(&xb.qs).map(|(&a, &b)| a * b as i32).sum();
        sum += d * xb.d * si as f32 + m * xb.s;
    }
    sum
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K / Q5_K block (`get_scale_min_k4`).
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 256 unsigned values of a Q4_K (`five = false`) or Q5_K block, sub-block by sub-block.
fn unpack_q45k(b: &[u8], five: bool) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[16..16], &b[16..144])
    };
    for j in 0..4 {
        for l in 0..32 {
            let byte = qs[32 * j + l];
            let (mut lo, mut hi) = (byte & 0x0F, byte >> 4);
            if five {
                lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
            q[64 * j + l] = lo;
            q[64 * j + 32 + l] = hi;
        }
    }
    q
}

fn dot_q45k(w: &[u8], x: &[Q8KBlock], five: bool) -> f32 {
    let bb = if five { 176 } else { 144 };
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(bb).zip(x) {
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, 2));
        let q = unpack_q45k(wb, five);
        let (mut isum, mut mins) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, mn) = scale_min_k4(j, &wb[4..16]);
            let s: i32 = (0..32)
                .map(|l| q[32 * j + l] as i32 * xb.qs[32 * j + l] as i32)
                .sum();
            isum += sc as i32 * s;
            mins += mn as i32 * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32);
        }
        sum += d * xb.d * isum as f32 - dmin * xb.d * mins as f32;
    }
    sum
}

/// One Q4_K weight row times one Q8_K activation row.
pub(crate) fn dot_q4k(w: &[u8], x: &[Q8KBlock]) -> f32 {
    dot_q45k(w, x, false)
}

/// One Q5_K weight row times one Q8_K activation row.
pub(crate) fn dot_q5k(w: &[u8], x: &[Q8KBlock]) -> f32 {
    dot_q45k(w, x, true)
}

/// The 256 unsigned 6-bit values (before the −32) of a Q6_K block.
fn unpack_q6k(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    let (ql, qh) = (&b[0..128], &b[128..192]);
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        let y = &mut q[128 * n..];
        for l in 0..32 {
            y[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    q
}

/// One Q6_K weight row times one Q8_K activation row.
pub(crate) fn dot_q6k(w: &[u8], x: &[Q8KBlock]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(210).zip(x) {
        let d = f16_at(wb, 208);
        let q = unpack_q6k(wb);
        let mut isum = 0i32;
        for (s, &sc) in wb[192..208].iter().enumerate() {
            let dot: i32 = (16 * s..16 * s + 16)
                .map(|l| (q[l] as i32 - 32) * xb.qs[l] as i32)
                .sum();
            isum += (sc as i8) as i32 * dot;
        }
        sum += d * xb.d * isum as f32;
    }
    sum
}

/// ggml's `dequantize_row_*` for every block type, into `out` (whole blocks).
pub(crate) fn dequantize_into(ty: BlockType, data: &[u8], out: &mut [f32]) {
    let be = ty.block_elems();
    for (b, o) in data
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(be))
    {
        match ty {
            BlockType::Q4K | BlockType::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let q = unpack_q45k(b, ty == BlockType::Q5K);
                for j in 0..8 {
                    let (sc, mn) = scale_min_k4(j, &b[4..16]);
                    let (ds, dm) = (d * sc as f32, dmin * mn as f32);
                    for l in 32 * j..32 * j + 32 {
                        o[l] = ds * q[l] as f32 - dm;
                    }
                }
            }
            BlockType::Q6K => {
                let d = f16_at(b, 208);
                let q = unpack_q6k(b);
                for (s, &sc) in b[192..208].iter().enumerate() {
                    let ds = d * (sc as i8) as f32;
                    for l in 16 * s..16 * s + 16 {
                        o[l] = ds * (q[l] as i32 - 32) as f32;
                    }
                }
            }
            _ => {
                let (q, d, m) = unpack32(ty, b);
                for (o, &v) in o.iter_mut().zip(&q) {
                    *o = v as f32 * d + m;
                }
            }
        }
    }
}
