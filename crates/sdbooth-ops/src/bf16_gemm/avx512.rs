//! The AVX512_BF16 microkernel: an [`MR`]×[`NR`] block of f32 sums in 24 zmm registers (or
//! [`MR`]×16 in 12 for a last column panel of at most 16 columns, [`MR`]×8 in 12 ymm for one
//! of at most 8).
//!
//! Per k pair: `V` loads of the packed column panel (16 columns each), then for each of the 12
//! rows a broadcast of its pair and `V` `vdpbf16ps`. 24 accumulators + 2 column registers + 1
//! broadcast fit the 32 zmm registers, and 12 or 24 independent chains hide the instruction's
//! latency. The sums start from the destination (or zero) and are stored straight back to it
//! (masked at the matrix's edges), so no block passes through a buffer. A block of at most 4 or
//! 8 rows (a matrix's last row panel) runs a kernel of that many rows: a 64-row tile (attention's
//! query tiles) is 5 panels of 12 and one of 4, whose 8 missing rows the full kernel would
//! compute for nothing.

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
/// pair dot) for `i < rows`, `j < cols`, with the 8- or 16-wide kernel when `cols` is at most
/// that and one of 4 or 8 rows when `rows` is.
///
/// # Safety
/// The CPU must have AVX512F, AVX512VL and AVX512_BF16; `a` must point at `kc·MR` and `b` at `kc·NR`
/// readable `u32`s; `dst` rows `0..rows` must have `cols` writable values each (row stride
/// `rs`) that no other thread touches.
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
pub(super) unsafe fn kernel(kc: usize, a: *const u32, b: *const u32, out: &Block) {
    match out.rows {
        0..=4 => kernel_rows::<4>(kc, a, b, out),
        5..=8 => kernel_rows::<8>(kc, a, b, out),
        _ => kernel_rows::<MR>(kc, a, b, out),
    }
}

/// [`kernel`] computing `ROWS ≥ out.rows` rows.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
unsafe fn kernel_rows<const ROWS: usize>(kc: usize, a: *const u32, b: *const u32, out: &Block) {
    match (out.cols, out.next_b.is_null()) {
        (0..=8, true) => kernel_v::<__m256, ROWS, 1, false>(kc, a, b, out),
        (0..=8, false) => kernel_v::<__m256, ROWS, 1, true>(kc, a, b, out),
        (9..=16, true) => kernel_v::<__m512, ROWS, 1, false>(kc, a, b, out),
        (9..=16, false) => kernel_v::<__m512, ROWS, 1, true>(kc, a, b, out),
        (_, true) => kernel_v::<__m512, ROWS, 2, false>(kc, a, b, out),
        (_, false) => kernel_v::<__m512, ROWS, 2, true>(kc, a, b, out),
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

/// A register of f32 sums: 16 lanes (zmm), or 8 (ymm) for a last column panel of at most 8
/// columns (attention's 40-wide heads), which on CPUs that run a 512-bit instruction as two
/// 256-bit halves (Zen 4) takes half the time of the zmm kernel's half-empty register. Each
/// lane sums the same terms in the same order either way.
trait Sums: Copy {
    /// Lanes of f32 sums.
    const LANES: usize;
    /// A register of bf16 pairs as wide.
    type Pairs: Copy;
    unsafe fn zero() -> Self;
    /// The first lanes of `mask` from `src`, zeros in the others.
    unsafe fn load(src: *const f32, mask: __mmask16) -> Self;
    unsafe fn store(self, dst: *mut f32, mask: __mmask16);
    unsafe fn pairs(src: *const u32) -> Self::Pairs;
    /// One pair in every lane.
    unsafe fn broadcast(pair: u32) -> Self::Pairs;
    /// `self + a·b`, pair by pair (`vdpbf16ps`).
    unsafe fn dot(self, a: Self::Pairs, b: Self::Pairs) -> Self;
}

impl Sums for __m512 {
    const LANES: usize = 16;
    type Pairs = __m512bh;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn load(src: *const f32, mask: __mmask16) -> Self {
        _mm512_maskz_loadu_ps(mask, src)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn store(self, dst: *mut f32, mask: __mmask16) {
        _mm512_mask_storeu_ps(dst, mask, self)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pairs(src: *const u32) -> Self::Pairs {
        std::mem::transmute(_mm512_loadu_si512(src as *const __m512i))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn broadcast(pair: u32) -> Self::Pairs {
        std::mem::transmute(_mm512_set1_epi32(pair as i32))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot(self, a: Self::Pairs, b: Self::Pairs) -> Self {
        _mm512_dpbf16_ps(self, a, b)
    }
}

impl Sums for __m256 {
    const LANES: usize = 8;
    type Pairs = __m256bh;
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    unsafe fn zero() -> Self {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    unsafe fn load(src: *const f32, mask: __mmask16) -> Self {
        _mm256_maskz_loadu_ps(mask as __mmask8, src)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    unsafe fn store(self, dst: *mut f32, mask: __mmask16) {
        _mm256_mask_storeu_ps(dst, mask as __mmask8, self)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    unsafe fn pairs(src: *const u32) -> Self::Pairs {
        std::mem::transmute(_mm256_loadu_si256(src as *const __m256i))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    unsafe fn broadcast(pair: u32) -> Self::Pairs {
        std::mem::transmute(_mm256_set1_epi32(pair as i32))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
    unsafe fn dot(self, a: Self::Pairs, b: Self::Pairs) -> Self {
        _mm256_dpbf16_ps(self, a, b)
    }
}

/// [`kernel`] on the first `V` registers of `S` lanes of columns and `ROWS` rows of the panels
/// (`NEXT_B`: prefetch `out.next_b`).
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bf16")]
unsafe fn kernel_v<S: Sums, const ROWS: usize, const V: usize, const NEXT_B: bool>(
    kc: usize,
    a: *const u32,
    b: *const u32,
    out: &Block,
) {
    debug_assert!(out.rows <= ROWS && ROWS <= MR && out.cols <= S::LANES * V);
    let masks: [__mmask16; V] = std::array::from_fn(|v| lanes(out.cols.saturating_sub(S::LANES * v)));
    let mut c = [[S::zero(); V]; ROWS];
    // Every row index is a constant of the unrolled loops (rows past `out.rows` are skipped by a
    // branch, not by a shorter loop), so the accumulators stay in registers.
    if out.load {
        for (i, row) in c.iter_mut().enumerate() {
            if i < out.rows {
                for (v, acc) in row.iter_mut().enumerate() {
                    // SAFETY: row i < rows, columns LANES·v.. masked to cols (caller's contract).
                    *acc = S::load(out.dst.add(i * out.rs + S::LANES * v), masks[v]);
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
                _mm_prefetch::<_MM_HINT_T0>(out.next_b.wrapping_add(q * NR + S::LANES * v) as *const i8);
            }
        }
        // SAFETY (rest of the loop): q < kc, so every offset is inside the panels the caller
        // promised.
        let bq = b.add(q * NR);
        let bv: [S::Pairs; V] = std::array::from_fn(|v| S::pairs(bq.add(S::LANES * v)));
        let aq = a.add(q * MR);
        for (i, row) in c.iter_mut().enumerate() {
            let ai = S::broadcast(*aq.add(i));
            for (acc, bv) in row.iter_mut().zip(&bv) {
                *acc = acc.dot(ai, *bv);
            }
        }
    }
    for (i, row) in c.iter().enumerate() {
        if i < out.rows {
            for (v, acc) in row.iter().enumerate() {
                // SAFETY: as the loads above.
                acc.store(out.dst.add(i * out.rs + S::LANES * v), masks[v]);
            }
        }
    }
}
