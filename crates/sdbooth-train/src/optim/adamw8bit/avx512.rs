//! The AVX-512 block update: 16 values per vector, the table lookups as scalar loads (a 16-lane
//! gather, `vpgatherdd`, took ~24 cycles on Zen 4: slower than 16 scalar loads). The same IEEE
//! operations in the same order as the portable `update_block` (no fused multiply-adds), so the
//! results are identical (tested). `update_block_vbmi`, for CPUs with AVX512_VBMI, does the
//! lookups of every whole 64 values with the byte permutes of `vbmi.rs` instead (same results).

use std::arch::x86_64::*;

use half::bf16;

use super::{maps, Block, Blocks, Map, Scalars, BLOCK};

pub(super) fn update_block(sc: &Scalars, b: Block<'_>) {
    // SAFETY: `block_kernel` hands this function out only after detecting AVX-512F.
    unsafe { update_block_avx512(sc, b) }
}

/// [`update_block`] with the dequantisation lookups as byte permutes (see [`super::vbmi`]).
pub(super) fn update_block_vbmi(sc: &Scalars, b: Block<'_>) {
    // SAFETY: `block_kernel` hands this function out only after `vbmi_detected`.
    unsafe { update_block_avx512_vbmi(sc, b) }
}

/// [`super::update_blocks`] for CPUs with AVX512_VBMI: see [`update_blocks_avx512_vbmi`].
pub(super) fn update_blocks_vbmi(sc: &Scalars, b: Blocks<'_>) {
    // SAFETY: `task_kernel` hands this function out only after `vbmi_detected`.
    unsafe { update_blocks_avx512_vbmi(sc, b) }
}

#[target_feature(enable = "avx512f")]
unsafe fn update_block_avx512(sc: &Scalars, b: Block<'_>) {
    update_block_with::<false>(sc, b)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn update_block_avx512_vbmi(sc: &Scalars, b: Block<'_>) {
    update_block_with::<true>(sc, b)
}

/// [`super::widen`] compiled for AVX-512: 16 values per instruction.
pub(super) fn widen(src: &[bf16], dst: &mut [f32]) {
    // SAFETY: `widen_kernel` hands this function out only after detecting AVX-512F.
    unsafe { widen_avx512(src, dst) }
}

#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(src: &[bf16], dst: &mut [f32]) {
    super::widen(src, dst)
}

/// The scalar update of one value, for the tail of a block shorter than a multiple of 16.
#[inline(always)]
fn dequant_update(sc: &Scalars, b: &mut Block<'_>, s: (&mut [f32], &mut [f32]), i: usize) {
    let (m1, m2) = maps();
    let (w, n1, n2) =
        sc.update(b.w[i], b.g[i], m1.code[b.q1[i] as usize] * *b.a1, m2.code[b.q2[i] as usize] * *b.a2);
    (b.w[i], s.0[i], s.1[i]) = (w, n1, n2);
}

/// `table[index[j]]` for the 16 lanes, as 16 scalar loads: on Zen 4 a 16-lane gather
/// (`vpgatherdd`) took ~24 cycles, longer than the scalar loads (the table lookups of the
/// dequantisation and quantisation were ~half of this kernel's time with gathers; scalar
/// loads made the kernel ~20 % faster on cached data, same results).
///
/// # Safety
/// Every lane of `index` must be below `table.len()`.
#[inline(always)]
unsafe fn lookup16(table: &[u32], index: __m512i) -> [u32; 16] {
    let mut lanes = [0u32; 16];
    _mm512_storeu_si512(lanes.as_mut_ptr().cast(), index);
    std::array::from_fn(|j| *table.get_unchecked(lanes[j] as usize))
}

/// `Map::quantize` on 16 values.
#[inline(always)]
unsafe fn quantize(m: &Map, x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let low16 = _mm512_set1_epi32(0xFFFF);
    let magnitude = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x7FFF));
    let finite = _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(super::NON_FINITE_KEY as i32));
    let negative = sign_mask(bits);
    let (key_min, key_max) = (m.key_min as i32, m.key_max as i32);
    let clamped =
        _mm512_min_epu32(_mm512_max_epu32(magnitude, _mm512_set1_epi32(key_min)), _mm512_set1_epi32(key_max));
    let index = _mm512_sub_epi32(clamped, _mm512_set1_epi32(key_min));
    let index = _mm512_mask_add_epi32(index, negative, index, _mm512_set1_epi32(key_max - key_min + 1));
    // SAFETY: `index` < `rounding.len()` (the key is clamped into the stored range).
    let entry = _mm512_loadu_si512(lookup16(&m.rounding, index).as_ptr().cast());
    // Low bits, reversed for negative values.
    let low =
        _mm512_mask_xor_epi32(_mm512_and_si512(bits, low16), negative, _mm512_and_si512(bits, low16), low16);
    let above = _mm512_cmpgt_epu32_mask(low, _mm512_srli_epi32::<16>(entry));
    let lo = _mm512_and_si512(entry, _mm512_set1_epi32(0xFF));
    let code = _mm512_mask_add_epi32(lo, above, lo, _mm512_set1_epi32(1));
    _mm512_maskz_mov_epi32(finite, code)
}

#[cfg(test)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_for_test(m: &Map, x: __m512) -> __m512i {
    quantize(m, x)
}

/// The sign bits of 16 lanes as a mask (AVX-512F only: `vpmovd2m` needs AVX-512DQ).
#[inline(always)]
unsafe fn sign_mask(bits: __m512i) -> __mmask16 {
    _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512())
}

/// The block update; with `VBMI` (the caller has AVX512_VBMI and AVX-512BW) the moments of every
/// whole 64 values are first dequantised into `s1`/`s2` with byte permutes, else each 16 values'
/// table entries are read with scalar loads where they are used.
#[inline(always)]
unsafe fn update_block_with<const VBMI: bool>(sc: &Scalars, mut b: Block<'_>) {
    let (m1, m2) = maps();
    let len = b.w.len().min(BLOCK);
    let vec_len = len / 16 * 16;
    let mut s1 = [0f32; BLOCK];
    let mut s2 = [0f32; BLOCK];
    let set = _mm512_set1_ps;
    let (abs1, abs2) = (set(*b.a1), set(*b.a2));
    let permuted_len = if VBMI { len / 64 * 64 } else { 0 };
    for i in (0..permuted_len).step_by(64) {
        // SAFETY: i + 64 <= len: 64 codes to read, 64 values to write.
        let d1 = super::vbmi::lookup64(&m1.code_planes, b.q1.as_ptr().add(i));
        let d2 = super::vbmi::lookup64(&m2.code_planes, b.q2.as_ptr().add(i));
        for a in 0..4 {
            _mm512_storeu_ps(s1.as_mut_ptr().add(i + 16 * a), _mm512_mul_ps(d1[a], abs1));
            _mm512_storeu_ps(s2.as_mut_ptr().add(i + 16 * a), _mm512_mul_ps(d2[a], abs2));
        }
    }
    let consts = Consts::new(sc);
    let mut lanes = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for i in (0..vec_len).step_by(16) {
        // SAFETY (all loads and stores here): i + 16 <= len, and every slice has len values.
        let code = |m: &Map, q: &[u8]| {
            let q = &q[i..i + 16];
            let codes: [f32; 16] = std::array::from_fn(|j| m.code[q[j] as usize]);
            _mm512_loadu_ps(codes.as_ptr())
        };
        let (d1, d2) = if i < permuted_len {
            (_mm512_loadu_ps(s1.as_ptr().add(i)), _mm512_loadu_ps(s2.as_ptr().add(i)))
        } else {
            (_mm512_mul_ps(code(m1, b.q1), abs1), _mm512_mul_ps(code(m2, b.q2), abs2))
        };
        let (n1, n2) = update16(&consts, d1, d2, b.w.as_mut_ptr().add(i), b.g.as_ptr().add(i), &mut lanes);
        _mm512_storeu_ps(s1.as_mut_ptr().add(i), n1);
        _mm512_storeu_ps(s2.as_mut_ptr().add(i), n2);
    }
    let (lanes1, lanes2) = lanes;
    let mut max1 = _mm512_reduce_max_ps(lanes1);
    let mut max2 = _mm512_reduce_max_ps(lanes2);
    for i in vec_len..len {
        dequant_update(sc, &mut b, (&mut s1, &mut s2), i);
        max1 = max1.max(s1[i].abs());
        max2 = max2.max(s2[i].abs());
    }
    *b.a1 = max1;
    *b.a2 = max2;
    let (inv1, inv2) = (reciprocal(max1), reciprocal(max2));
    let (vinv1, vinv2) = (set(inv1), set(inv2));
    let tables = if VBMI { m1.vbmi_rounding.as_ref().zip(m2.vbmi_rounding.as_ref()) } else { None };
    let mut i = 0;
    while i < vec_len {
        // SAFETY (all loads and stores here): i + 16 <= len (i + 64 <= len for 64 values).
        match tables {
            Some((r1, r2)) if i + 64 <= len => {
                let (v1, v2) = (load4(&s1, i), load4(&s2, i));
                let c1 = super::vbmi::quantize64(r1, scale4(v1, vinv1));
                let c2 = super::vbmi::quantize64(r2, scale4(v2, vinv2));
                store_codes64(m1, b.q1.as_mut_ptr().add(i), b.q2.as_mut_ptr().add(i), v1, c1, c2);
                i += 64;
            }
            _ => {
                let (v1, v2) = (_mm512_loadu_ps(s1.as_ptr().add(i)), _mm512_loadu_ps(s2.as_ptr().add(i)));
                let c1 = quantize(m1, _mm512_mul_ps(v1, vinv1));
                let c2 = quantize(m2, _mm512_mul_ps(v2, vinv2));
                store_codes(m1, &mut b, i, v1, c1, c2);
                i += 16;
            }
        }
    }
    for i in vec_len..len {
        b.q1[i] = super::quantize_m(m1, s1[i], inv1);
        b.q2[i] = m2.quantize(s2[i] * inv2);
    }
}

/// Values `i..i + 64` of `s` as four vectors (no closure: it would not inherit the target
/// features). Safety: `i + 64 <= BLOCK`.
#[inline(always)]
unsafe fn load4(s: &[f32; BLOCK], i: usize) -> [__m512; 4] {
    let p = s.as_ptr().add(i);
    [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p.add(32)), _mm512_loadu_ps(p.add(48))]
}

/// `v[a] * scale` for the four vectors.
#[inline(always)]
unsafe fn scale4(v: [__m512; 4], scale: __m512) -> [__m512; 4] {
    [
        _mm512_mul_ps(v[0], scale),
        _mm512_mul_ps(v[1], scale),
        _mm512_mul_ps(v[2], scale),
        _mm512_mul_ps(v[3], scale),
    ]
}

/// Stores the codes of values `i..i + 16`: `c1` (m's nearest entries, of the moments `v1`) moved
/// one entry towards m's sign where the entry's sign differs (`quantize_m`), and `c2`.
///
/// # Safety
/// `i + 16` must not exceed the block's length.
#[inline(always)]
unsafe fn store_codes(m1: &Map, b: &mut Block<'_>, i: usize, v1: __m512, c1: __m512i, c2: __m512i) {
    let (one, zero, top) = (_mm512_set1_epi32(1), _mm512_setzero_si512(), _mm512_set1_epi32(255));
    let code_negative = _mm512_cmplt_epi32_mask(c1, _mm512_set1_epi32(i32::from(m1.negatives)));
    let s_negative = _mm512_cmplt_epi32_mask(_mm512_castps_si512(v1), zero);
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v1, _mm512_setzero_ps());
    let up = _mm512_min_epi32(_mm512_add_epi32(c1, one), top);
    let down = _mm512_max_epi32(_mm512_sub_epi32(c1, one), zero);
    let moved = _mm512_mask_blend_epi32(positive, down, up);
    let c1 = _mm512_mask_blend_epi32(code_negative ^ s_negative, c1, moved);
    _mm_storeu_si128(b.q1.as_mut_ptr().add(i).cast(), _mm512_cvtepi32_epi8(c1));
    _mm_storeu_si128(b.q2.as_mut_ptr().add(i).cast(), _mm512_cvtepi32_epi8(c2));
}

/// [`store_codes`] for 64 values, at `q1` and `q2`, their codes `c1` and `c2` given as 64 bytes
/// in order (the moves by one entry saturate at 0 and 255 as `store_codes`' clamps do).
///
/// # Safety
/// AVX-512BW must be present; `q1` and `q2` must point at 64 writable bytes.
#[inline(always)]
unsafe fn store_codes64(m1: &Map, q1: *mut u8, q2: *mut u8, v1: [__m512; 4], c1: __m512i, c2: __m512i) {
    let one = _mm512_set1_epi8(1);
    let code_negative = _mm512_cmplt_epu8_mask(c1, _mm512_set1_epi8(m1.negatives as i8));
    // (No closures: they would not inherit the target features.)
    let (mut s_negative, mut positive) = ([0; 4], [0; 4]);
    for a in 0..4 {
        s_negative[a] = sign_mask(_mm512_castps_si512(v1[a]));
        positive[a] = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v1[a], _mm512_setzero_ps());
    }
    let (s_negative, positive) = (super::vbmi::join_masks(s_negative), super::vbmi::join_masks(positive));
    let moved = _mm512_mask_blend_epi8(positive, _mm512_subs_epu8(c1, one), _mm512_adds_epu8(c1, one));
    let c1 = _mm512_mask_blend_epi8(code_negative ^ s_negative, c1, moved);
    _mm512_storeu_si512(q1.cast(), c1);
    _mm512_storeu_si512(q2.cast(), c2);
}

/// The step's scalars as vectors.
struct Consts {
    b1: __m512,
    b2: __m512,
    omb1: __m512,
    omb2: __m512,
    step: __m512,
    eps_term: __m512,
    decay: __m512,
    gs: __m512,
    inf: __m512,
}

impl Consts {
    #[inline(always)]
    unsafe fn new(sc: &Scalars) -> Self {
        let set = _mm512_set1_ps;
        Consts {
            b1: set(sc.b1),
            b2: set(sc.b2),
            omb1: set(sc.one_minus_b1),
            omb2: set(sc.one_minus_b2),
            step: set(sc.step_size),
            eps_term: set(sc.eps_term),
            decay: set(sc.decay),
            gs: set(sc.grad_scale),
            inf: set(f32::INFINITY),
        }
    }
}

/// The update of 16 values: the weights at `w` (read and written) with the gradient at `g` and
/// the dequantised moments `d1`, `d2`; returns the new moments and takes their magnitudes into the
/// running maxima `lanes`.
///
/// # Safety
/// `w` and `g` must point at 16 values.
#[inline(always)]
unsafe fn update16(
    c: &Consts,
    d1: __m512,
    d2: __m512,
    w_at: *mut f32,
    g_at: *const f32,
    lanes: &mut (__m512, __m512),
) -> (__m512, __m512) {
    let w = _mm512_loadu_ps(w_at);
    let g = _mm512_mul_ps(_mm512_loadu_ps(g_at), c.gs);
    // The scalar `Scalars::update`, operation for operation.
    let n2 = _mm512_add_ps(_mm512_mul_ps(d2, c.b2), _mm512_mul_ps(_mm512_mul_ps(c.omb2, g), g));
    let n1 = _mm512_add_ps(_mm512_mul_ps(d1, c.b1), _mm512_mul_ps(c.omb1, g));
    let denom = _mm512_add_ps(_mm512_sqrt_ps(n2), c.eps_term);
    let nw = _mm512_mul_ps(_mm512_add_ps(w, _mm512_mul_ps(c.step, _mm512_div_ps(n1, denom))), c.decay);
    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(g), c.inf);
    _mm512_storeu_ps(w_at, _mm512_mask_blend_ps(finite, w, nw));
    let n1 = _mm512_maskz_mov_ps(finite, n1);
    let n2 = _mm512_maskz_mov_ps(finite, n2);
    // max_ps returns its second operand when either is NaN: NaN values are skipped, as
    // f32::max skips them.
    lanes.0 = _mm512_max_ps(_mm512_abs_ps(n1), lanes.0);
    lanes.1 = _mm512_max_ps(_mm512_abs_ps(n2), lanes.1);
    (n1, n2)
}

/// The reciprocal absmax a block's moments are quantised with: the kernel divides with
/// __fdividef, i.e. multiplies by the reciprocal. An all-zero block has absmax 0: its values
/// quantise from 0.0 instead of NaN.
#[inline(always)]
fn reciprocal(absmax: f32) -> f32 {
    if absmax > 0.0 {
        1.0 / absmax
    } else {
        0.0
    }
}

/// The blocks of a task, whole blocks software-pipelined: each 64 values of block `k` are
/// dequantised and updated (their division and square root wait on the one FP divider), then the
/// same 64 values of block `k − 1` are quantised (byte permutes and integer compares on the other
/// units), so the core runs both kinds of work at once instead of one block's two phases after
/// each other (the quantisation needs the block's absmax, known only after its whole update). A
/// shorter last block goes through [`update_block_with`]. Every value sees the same operations
/// as in [`update_block_vbmi`], so the results are the same (tested).
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn update_blocks_avx512_vbmi(sc: &Scalars, b: Blocks<'_>) {
    let (m1, m2) = maps();
    let (Some(r1), Some(r2)) = (m1.vbmi_rounding.as_ref(), m2.vbmi_rounding.as_ref()) else {
        return super::update_blocks(sc, b);
    };
    let consts = Consts::new(sc);
    let n = b.w.len();
    let (w, g, q1, q2) = (b.w.as_mut_ptr(), b.g.as_ptr(), b.q1.as_mut_ptr(), b.q2.as_mut_ptr());
    // The new moments of the block being updated and of the one being quantised.
    let mut s1 = [[0f32; BLOCK]; 2];
    let mut s2 = [[0f32; BLOCK]; 2];
    // The block waiting for its quantisation: its first value and reciprocal absmaxes.
    let mut pending: Option<(usize, __m512, __m512)> = None;
    // Quantises values `i..i + 64` of the pending block from its moments in `s1[at]`, `s2[at]`
    // (a macro: a closure would not inherit the target features).
    macro_rules! quantize_pending {
        ($at:expr, $i:expr) => {
            if let Some((first, inv1, inv2)) = pending {
                let (v1, v2) = (load4(&s1[$at], $i), load4(&s2[$at], $i));
                let c1 = super::vbmi::quantize64(r1, scale4(v1, inv1));
                let c2 = super::vbmi::quantize64(r2, scale4(v2, inv2));
                store_codes64(m1, q1.add(first + $i), q2.add(first + $i), v1, c1, c2);
            }
        };
    }
    for k in 0..b.a1.len() {
        let (first, end) = (k * BLOCK, ((k + 1) * BLOCK).min(n));
        let (at, pending_at) = (k % 2, (k + 1) % 2);
        if end - first < BLOCK {
            for i in (0..BLOCK).step_by(64) {
                quantize_pending!(pending_at, i);
            }
            pending = None;
            let block = Block {
                w: std::slice::from_raw_parts_mut(w.add(first), end - first),
                g: std::slice::from_raw_parts(g.add(first), end - first),
                q1: std::slice::from_raw_parts_mut(q1.add(first), end - first),
                q2: std::slice::from_raw_parts_mut(q2.add(first), end - first),
                a1: &mut b.a1[k],
                a2: &mut b.a2[k],
            };
            update_block_with::<true>(sc, block);
            continue;
        }
        let (abs1, abs2) = (_mm512_set1_ps(b.a1[k]), _mm512_set1_ps(b.a2[k]));
        let mut lanes = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in (0..BLOCK).step_by(64) {
            // SAFETY (all pointers): values first..first + BLOCK are in the task.
            let d1 = super::vbmi::lookup64(&m1.code_planes, q1.add(first + i));
            let d2 = super::vbmi::lookup64(&m2.code_planes, q2.add(first + i));
            for a in 0..4 {
                let j = first + i + 16 * a;
                let (d1, d2) = (_mm512_mul_ps(d1[a], abs1), _mm512_mul_ps(d2[a], abs2));
                let (n1, n2) = update16(&consts, d1, d2, w.add(j), g.add(j), &mut lanes);
                _mm512_storeu_ps(s1[at].as_mut_ptr().add(i + 16 * a), n1);
                _mm512_storeu_ps(s2[at].as_mut_ptr().add(i + 16 * a), n2);
            }
            quantize_pending!(pending_at, i);
        }
        let (max1, max2) = (_mm512_reduce_max_ps(lanes.0), _mm512_reduce_max_ps(lanes.1));
        (b.a1[k], b.a2[k]) = (max1, max2);
        pending = Some((first, _mm512_set1_ps(reciprocal(max1)), _mm512_set1_ps(reciprocal(max2))));
    }
    let last = (b.a1.len() + 1) % 2;
    for i in (0..BLOCK).step_by(64) {
        quantize_pending!(last, i);
    }
}
