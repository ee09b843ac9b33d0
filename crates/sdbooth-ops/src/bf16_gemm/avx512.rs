//! The AVX512_BF16 microkernel: an [`MR`]×[`NR`] block of f32 sums in 24 zmm registers.
//!
//! Per k pair: two loads of the packed column panel (32 columns), then for each of the 12 rows a
//! broadcast of its pair and two `vdpbf16ps`. 24 accumulators + 2 column registers + 1 broadcast
//! fit the 32 zmm registers, and 24 independent chains hide the instruction's latency.

use super::{MR, NR};
use std::arch::x86_64::*;

/// `acc[MR×NR] (row-major) = Σ_{q<kc} a[q·MR + i] · b[q·NR + j]` (each term a bf16 pair dot).
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16; `a` must point at `kc·MR` and `b` at `kc·NR`
/// readable `u32`s.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn kernel(kc: usize, a: *const u32, b: *const u32, acc: &mut [f32; MR * NR]) {
    let mut c = [[_mm512_setzero_ps(); 2]; MR];
    for q in 0..kc {
        // SAFETY (whole loop): q < kc, so every offset is inside the panels the caller promised.
        let bq = b.add(q * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(16) as *const __m512i));
        let aq = a.add(q * MR);
        for (i, row) in c.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(i) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    for (i, row) in c.iter().enumerate() {
        _mm512_storeu_ps(acc.as_mut_ptr().add(i * NR), row[0]);
        _mm512_storeu_ps(acc.as_mut_ptr().add(i * NR + 16), row[1]);
    }
}
