//! CPU helpers shared by the encoder, the decoder's host paths and the training ops: small
//! single-thread GEMMs, vectorisable reductions and `exp`, softmax, run-time selection of the
//! widest vector code (`multiversion!`), and a pointer that parallel tasks write through.

/// `dst[m × n] = scale · lhs[m × k] · rhs[k × n]` on the calling thread (one task of a parallel
/// attention). `dst` and `lhs` are row-major with row strides `dst_rs` / `lhs_rs`; `rhs` moves by
/// `rhs_rs` along k and `rhs_cs` along n, so a transposed operand is a stride swap.
///
/// # Safety
/// Every pointer must cover the elements its sizes and strides reach, and `dst` must not alias
/// the inputs.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) unsafe fn small_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Sum with eight independent accumulators, so the loop vectorises.
#[inline(always)]
pub(crate) fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Maximum with eight independent lanes, so the loop vectorises.
#[inline(always)]
pub(crate) fn max8(x: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            mx[k] = mx[k].max(c[k]);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&mx)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The widest vector level this CPU has for the element-wise loops below (checked once).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// AVX-512 F/BW/DQ/VL: 16 lanes.
    V4,
    /// AVX2 + FMA: 8 lanes.
    V3,
    /// Whatever the build targets.
    Base,
}

pub(crate) fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let v4 = v3
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            if v4 {
                Level::V4
            } else if v3 {
                Level::V3
            } else {
                Level::Base
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Base
    }
}

/// Defines `fn $name(args)` that runs its body compiled for the widest vectors the CPU has
/// (AVX-512, else AVX2+FMA, else the build's baseline). The body and the `#[inline(always)]`
/// helpers it calls are compiled inside each feature-enabled copy; the arithmetic is the same
/// in every copy (no FMA contraction), so results do not depend on the CPU.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(unsafe_code)]
                unsafe fn v4($($a: $t),*) {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(unsafe_code)]
                unsafe fn v3($($a: $t),*) {
                    body($($a),*)
                }
                match $crate::cpu::level() {
                    // SAFETY: the features were detected at run time.
                    #[allow(unsafe_code)]
                    $crate::cpu::Level::V4 => return unsafe { v4($($a),*) },
                    #[allow(unsafe_code)]
                    $crate::cpu::Level::V3 => return unsafe { v3($($a),*) },
                    $crate::cpu::Level::Base => {}
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// e^x to about 3e-7 relative error, branch-free so loops over it vectorise: x = n·ln2 + r
/// (Cody–Waite split of ln2, |r| <= ln2/2), e^r by its degree-6 Taylor polynomial, 2^n by bits.
#[inline(always)]
pub(crate) fn exp_fast(x0: f32) -> f32 {
    let x = x0.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5·2^23 trick (exact for |t| < 2^22).
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from t's bits: t = 1.5·2^23 + n, so its low bits hold n (|n| <= 126 here) and
    // (bits + 127) << 23 is the exponent field of 2^n. Integer ops only, so the loop vectorises
    // (a float-to-int `as` cast is a saturating conversion that stays scalar).
    let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    // Saturate like e^x does in f32: exactly 0 below the normal range (a clamped tiny value
    // would leave denormals in softmax rows, which slow every later multiply by two orders of
    // magnitude) and +inf above it. Selects, so the loop still vectorises.
    let y = if x0 < -87.0 { 0.0 } else { p * scale };
    if x0 > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

multiversion! {
/// Softmax of one row in place (also the decoder's host prefill attention).
pub(crate) fn softmax(r: &mut [f32]) {
    let m = max8(r);
    for v in r.iter_mut() {
        *v = exp_fast(*v - m);
    }
    let inv = 1.0 / sum8(r);
    r.iter_mut().for_each(|v| *v *= inv);
}
}

/// `dst (m×n) = [dst +] scale · L·R` with `L` an `(m×k)` and `R` a `(k×n)` view given by
/// column and row strides into row-major buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_cs, lhs_rs): (&[f32], usize, usize),
    (rhs, rhs_cs, rhs_rs): (&[f32], usize, usize),
    scale: f32,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n, "gemm destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let last = |rows: usize, cols: usize, cs: usize, rs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, k, lhs_cs, lhs_rs) < lhs.len(),
        "gemm lhs out of bounds"
    );
    assert!(
        last(k, n, rhs_cs, rhs_rs) < rhs.len(),
        "gemm rhs out of bounds"
    );
    let par = if m * n * k >= 1 << 20 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices; dst is
    // (m, n) row-major and aliases neither input (it is borrowed mutably).
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// A raw output pointer handed to parallel tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: each task writes a disjoint region (its own sequence rows and head columns).
#[allow(unsafe_code)]
unsafe impl Send for SendPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
