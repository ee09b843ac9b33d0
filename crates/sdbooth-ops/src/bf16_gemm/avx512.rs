//! The AVX512_BF16 microkernel: an [`MR`]×[`NR`] block of f32 sums in 24 zmm registers (or
//! [`MR`]×16 in 12 for a last column panel of at most 16 columns).
//!
//! Per k pair: `V` loads of the packed column panel (16 columns each), then for each of the 12
//! rows a broadcast of its pair and `V` `vdpbf16ps`. 24 accumulators + 2 column registers + 1
//! broadcast fit the 32 zmm registers, and 12 or 24 independent chains hide the instruction's
//! latency. The sums start from the destination (or zero) and are stored straight back to it
//! (masked at the matrix's edges), so no block passes through a buffer.

use super::{MR, NR};
use std::arch::x86_64::*;

/// Where one block's sums go: `rows ≤ MR` rows of `cols ≤ NR` f32 values, row stride `rs`.
pub(super) struct Block {
    pub dst: *mut f32,
    pub rs: usize,
    pub rows: usize,
    pub cols: usize,
    /// Start from the values in `dst` (else from zero).
    pub load: bool,
    /// The lhs panel of the next block (as many pairs), and its rhs panel when that is not this
    /// one's (else null): fetched into cache while this block runs, a line per pair and 16
    /// columns, so the next block starts on cached panels. Only prefetched, never read.
    pub next_a: *const u32,
    pub next_b: *const u32,
}

/// `dst[i][j] = (load ? dst[i][j] : 0) + Σ_{q<kc} a[q·MR + i] · b[q·NR + j]` (each term a bf16
/// pair dot) for `i < rows`, `j < cols`, with the 16-wide kernel when `cols ≤ 16`.
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16; `a` must point at `kc·MR` and `b` at `kc·NR`
/// readable `u32`s; `dst` rows `0..rows` must have `cols` writable values each (row stride
/// `rs`) that no other thread touches.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn kernel(kc: usize, a: *const u32, b: *const u32, out: &Block) {
    match (out.cols <= 16, out.next_b.is_null()) {
        (true, true) => kernel_v::<1, false>(kc, a, b, out),
        (true, false) => kernel_v::<1, true>(kc, a, b, out),
        (false, true) => kernel_v::<2, false>(kc, a, b, out),
        (false, false) => kernel_v::<2, true>(kc, a, b, out),
    }
}

#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// [`kernel`] on the first `16·V` columns of the panel (`NEXT_B`: prefetch `out.next_b`).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_v<const V: usize, const NEXT_B: bool>(kc: usize, a: *const u32, b: *const u32, out: &Block) {
    let masks: [__mmask16; V] = std::array::from_fn(|v| lanes(out.cols.saturating_sub(16 * v)));
    let mut c = [[_mm512_setzero_ps(); V]; MR];
    // Every row index is a constant of the unrolled loops (rows past `out.rows` are skipped by a
    // branch, not by a shorter loop), so the accumulators stay in registers.
    if out.load {
        for (i, row) in c.iter_mut().enumerate() {
            if i < out.rows {
                for (v, acc) in row.iter_mut().enumerate() {
                    // SAFETY: row i < rows, columns 16v.. masked to cols (caller's contract).
                    *acc = _mm512_maskz_loadu_ps(masks[v], out.dst.add(i * out.rs + 16 * v));
                }
            }
        }
    }
    for q in 0..kc {
        // Pair q of the next block's panels (48 bytes of lhs a pair: every line is touched);
        // prefetching never faults, and the pointers are only offset, not read.
        _mm_prefetch::<_MM_HINT_T0>(out.next_a.wrapping_add(q * MR) as *const i8);
        if NEXT_B {
            for v in 0..V {
                _mm_prefetch::<_MM_HINT_T0>(out.next_b.wrapping_add(q * NR + 16 * v) as *const i8);
            }
        }
        // SAFETY (rest of the loop): q < kc, so every offset is inside the panels the caller
        // promised.
        let bq = b.add(q * NR);
        let bv: [__m512bh; V] = std::array::from_fn(|v| {
            std::mem::transmute(_mm512_loadu_si512(bq.add(16 * v) as *const __m512i))
        });
        let aq = a.add(q * MR);
        for (i, row) in c.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(i) as i32));
            for (acc, bv) in row.iter_mut().zip(&bv) {
                *acc = _mm512_dpbf16_ps(*acc, ai, *bv);
            }
        }
    }
    for (i, row) in c.iter().enumerate() {
        if i < out.rows {
            for (v, acc) in row.iter().enumerate() {
                // SAFETY: as the loads above.
                _mm512_mask_storeu_ps(out.dst.add(i * out.rs + 16 * v), masks[v], *acc);
            }
        }
    }
}
