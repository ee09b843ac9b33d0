//! Packing f32 sources with AVX512_BF16's `vcvtneps2bf16`, 16 values per instruction.
//!
//! The bf16 GEMM rounds f32 operands (f32 master weights, f32 activations) as it packs them; one
//! value at a time this cost about as much as the products. The instruction rounds to nearest
//! even like [`crate::cast::bf16_bits`] and quiets NaNs; it differs only on subnormal inputs,
//! which it flushes to zero, as `vdpbf16ps` does to subnormal bf16 inputs anyway, so the packed
//! panels give the same products as the scalar packing (tested).

use std::arch::x86_64::*;

/// 16 f32 values (the first `n ≤ 16`, zeros past them) rounded to bf16, in the low half of
/// each 32-bit lane.
///
/// # Safety
/// AVX512F/BW and AVX512_BF16 must be available and `src` must hold `n` readable values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn rounded_lanes(src: *const f32, n: usize) -> __m512i {
    let mask: __mmask16 = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
    let v = _mm512_maskz_loadu_ps(mask, src);
    let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
    _mm512_cvtepu16_epi32(b)
}

/// The outer index has stride 1 (`src[o] ` for the even k row, `src[o + sk]` for the odd one):
/// `panel[q·W + w] = pair(row 2q [o0 + w], row 2q+1 [o0 + w])` for every pair q of `k` values and
/// `w < valid`; lanes past `valid` stay as they are (zero).
///
/// # Safety
/// AVX512F/BW and AVX512_BF16 must be available (the caller runs only under the AVX512_BF16
/// kernel).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn interleave_rows<const W: usize>(
    panel: &mut [u32],
    data: &[f32],
    o0: usize,
    valid: usize,
    k: usize,
    sk: usize,
) {
    assert!(panel.len() >= k.div_ceil(2) * W && valid <= W);
    assert!(k == 0 || valid == 0 || (k - 1) * sk + o0 + valid <= data.len());
    for (q, lanes) in panel.chunks_exact_mut(W).enumerate().take(k.div_ceil(2)) {
        for w in (0..valid).step_by(16) {
            let n = (valid - w).min(16);
            // SAFETY: rows 2q and 2q+1 < k and columns o0+w..o0+w+n lie inside `data` (asserted),
            // lanes w..w+n inside `lanes`.
            let even = rounded_lanes(data.as_ptr().add(2 * q * sk + o0 + w), n);
            let odd = if 2 * q + 1 < k {
                rounded_lanes(data.as_ptr().add((2 * q + 1) * sk + o0 + w), n)
            } else {
                _mm512_setzero_si512()
            };
            let pairs = _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd));
            let mask: __mmask16 = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
            _mm512_mask_storeu_epi32(lanes.as_mut_ptr().add(w) as *mut i32, mask, pairs);
        }
    }
}

/// k has stride 1 (outer index `o` starts its run of k values at `data[o·so]`):
/// `panel[q·W + w] = pair(run[2q], run[2q+1])` for every outer index `w < valid`.
///
/// # Safety
/// As [`interleave_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pairs_contiguous<const W: usize>(
    panel: &mut [u32],
    data: &[f32],
    o0: usize,
    valid: usize,
    k: usize,
    so: usize,
) {
    let kp = k.div_ceil(2);
    assert!(panel.len() >= kp * W && valid <= W);
    assert!(k == 0 || valid == 0 || (o0 + valid - 1) * so + k <= data.len());
    let mut pairs = [0u32; 16];
    for w in 0..valid {
        let run = data.as_ptr().add((o0 + w) * so);
        // 32 values (16 pairs) per step: two rounded halves packed into one register of pairs.
        for q0 in (0..kp).step_by(16) {
            let nq = (kp - q0).min(16);
            let first = 2 * q0;
            let n_lo = (k - first).min(16);
            let n_hi = (k - first).saturating_sub(16).min(16);
            // SAFETY: values first..first+n_lo+n_hi < k of this run lie inside `data` (asserted).
            let lo = _mm512_maskz_loadu_ps(if n_lo >= 16 { 0xFFFF } else { (1u16 << n_lo) - 1 }, run.add(first));
            let hi = if n_hi == 0 {
                _mm512_setzero_ps()
            } else {
                let mask: __mmask16 = if n_hi >= 16 { 0xFFFF } else { (1u16 << n_hi) - 1 };
                _mm512_maskz_loadu_ps(mask, run.add(first + 16))
            };
            // The bf16 of `lo` in the low 16 halves, `hi` in the high 16: in memory order, so the
            // 32-bit lanes are the pairs (2q, 2q+1).
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(pairs.as_mut_ptr() as *mut __m512i, v);
            for (j, p) in pairs.iter().take(nq).enumerate() {
                panel[(q0 + j) * W + w] = *p;
            }
        }
    }
}
