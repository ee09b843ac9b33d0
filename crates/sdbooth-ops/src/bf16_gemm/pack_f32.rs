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
/// `panel[q·W + w] = pair(run_w[2q], run_w[2q+1])` for every outer index `w < valid` (lanes past
/// `valid` get zeros). Blocks of 16 outer indices × 16 pairs are rounded one run at a time
/// (32 values per instruction), transposed in registers and stored as 16 rows of lanes.
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
    for w0 in (0..W).step_by(16) {
        let lanes = (W - w0).min(16);
        let rows = valid.saturating_sub(w0).min(16);
        let store_mask: __mmask16 = if lanes >= 16 { 0xFFFF } else { (1u16 << lanes) - 1 };
        for q0 in (0..kp).step_by(16) {
            let first = 2 * q0;
            let mask = |n: usize| -> __mmask16 {
                if n >= 16 {
                    0xFFFF
                } else {
                    (1u16 << n) - 1
                }
            };
            let (m_lo, m_hi) = (mask((k - first).min(16)), mask((k - first).saturating_sub(16)));
            let mut block = [_mm512_setzero_si512(); 16];
            for (r, row) in block.iter_mut().enumerate().take(rows) {
                // SAFETY: values first.. of run o0+w0+r (< valid) up to k lie inside `data`
                // (asserted); masked-off values are not read.
                let run = data.as_ptr().add((o0 + w0 + r) * so + first);
                let lo = _mm512_maskz_loadu_ps(m_lo, run);
                let hi = _mm512_maskz_loadu_ps(m_hi, run.add(16));
                // bf16 of `lo` in the low 16 halves, `hi` in the high 16: memory order, so the
                // 32-bit lanes are the pairs (2q, 2q+1), q = q0..q0+16.
                *row = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            }
            let cols = transpose16(&block);
            for (j, col) in cols.iter().enumerate().take(kp - q0) {
                // SAFETY: pair q0+j < kp and lanes w0..w0+lanes ≤ W lie inside `panel` (asserted).
                _mm512_mask_storeu_epi32(
                    panel.as_mut_ptr().add((q0 + j) * W + w0) as *mut i32,
                    store_mask,
                    *col,
                );
            }
        }
    }
}

/// The transpose of a 16×16 block of 32-bit values held as 16 rows: `out[j][i] = rows[i][j]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(rows: &[__m512i; 16]) -> [__m512i; 16] {
    // Pairs of rows interleaved per 128-bit lane: t[2i] = (r2i[0], r2i+1[0], r2i[1], r2i+1[1]),
    // t[2i+1] the same for elements 2 and 3.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
    }
    // u[4g + c] holds, in 128-bit lane L, rows 4g..4g+4 at column 4L + c.
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    // Gather lane L of u[c], u[4+c], u[8+c], u[12+c] into column 4L + c.
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xDD>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_i32x4::<0xDD>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
        out[8 + c] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
    }
    out
}
