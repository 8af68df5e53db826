//! [`crate::Layout::Rows4`]: four weight rows' 32-element blocks side by side with their scales
//! together, which the VNNI kernels read as one stream; packing and unpacking in place.

#[cfg(target_arch = "x86_64")]
use crate::have_vnni;
use crate::{tag, BlockType};

/// The byte widths of a 32-element block's fields in ggml order: scale (and minimum), fifth
/// bits, quants. (K-quants have no [`crate::Layout::Rows4`]; they get one field, the whole block.)
pub(crate) fn fields32(ty: BlockType) -> [usize; 3] {
    if ty.is_k() {
        [ty.block_bytes(), 0, 0]
    } else {
        tag::fields(tag::of(ty))
    }
}

/// Whether `ty` has a [`crate::Layout::Rows4`] (the 32-element types).
pub fn has_rows4(ty: BlockType) -> bool {
    !ty.is_k()
}

/// Whether this CPU's kernels read [`crate::Layout::Rows4`] faster than ggml's layout: Q4_0, Q4_1 and
/// Q8_0 where the VNNI row kernels run (one contiguous stream and one load of four rows' scales
/// per block instead of four of each; and for several activation rows, one pass per row over
/// L1-sized chunks instead of the AVX2 four-row kernel). Not the Q5 types: expanding their
/// fifth bits once per activation row made several rows slower than the AVX2 kernel, which
/// expands them once for four rows (BENCHMARKS.md). Elsewhere Rows4 is read correctly but row
/// by row through a gather, so loaders should keep ggml's layout.
pub fn prefers_rows4(ty: BlockType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(ty, BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0) && have_vnni().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// `n` rows of `ty` in ggml's layout (`data`) repacked into [`crate::Layout::Rows4`]: the same bytes,
/// moved. Panics if `ty` has no Rows4 layout or `data` is not `n` whole rows.
pub fn pack_rows4(ty: BlockType, data: &[u8], n: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    pack_rows4_in_place(ty, &mut out, n);
    out
}

/// [`pack_rows4`] without a second copy of the matrix: each group of four rows is moved through
/// a buffer of its own size.
pub fn pack_rows4_in_place(ty: BlockType, data: &mut [u8], n: usize) {
    convert_rows4(ty, data, n, true)
}

/// The inverse of [`pack_rows4`]: [`crate::Layout::Rows4`] back to ggml's layout.
pub fn unpack_rows4(ty: BlockType, data: &[u8], n: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    convert_rows4(ty, &mut out, n, false);
    out
}

/// Repacks (`pack`) or unpacks `n` rows in place, group by group (the ggml tail rows stay).
fn convert_rows4(ty: BlockType, data: &mut [u8], n: usize, pack: bool) {
    assert!(has_rows4(ty), "{ty:?} has no Rows4 layout");
    let bb = ty.block_bytes();
    assert!(
        n > 0 && data.len().is_multiple_of(n) && (data.len() / n).is_multiple_of(bb),
        "{} bytes are not {n} rows of {ty:?} blocks",
        data.len()
    );
    let rb = data.len() / n;
    let fl = fields32(ty);
    let mut src = vec![0u8; 4 * rb];
    for group in data.chunks_exact_mut(4 * rb) {
        src.copy_from_slice(group);
        // Block by block, field by field: the four rows' copies of the field.
        for b in 0..rb / bb {
            let mut before = 0;
            for len in fl {
                for r in 0..4 {
                    let a = r * rb + b * bb + before; // ggml
                    let p = 4 * b * bb + 4 * before + r * len; // Rows4
                    let (s, d) = if pack { (a, p) } else { (p, a) };
                    group[d..d + len].copy_from_slice(&src[s..s + len]);
                }
                before += len;
            }
        }
    }
}
