//! Packing for the `vdpbf16ps` microkernel.
//!
//! The instruction multiplies, in each 32-bit lane, two bf16 pairs and adds both products to an
//! f32 lane. So both operands are stored as pairs of consecutive k values in one `u32` (low half
//! the even k, high half the odd k; an odd k is padded with a zero):
//!
//! * lhs: panels of [`MR`] rows, `[panel][k pair][row]`; a row pair is broadcast to all lanes.
//! * rhs: panels of [`NR`] columns, `[panel][k pair][column]`; 16 columns fill one register.
//!
//! Rows and columns past the matrix are zero, so the microkernel never checks edges. Packing
//! reads at memory speed for the layouts the ops use: when k has stride 1 a pair is one `u32`
//! load; when the other index has stride 1 two k rows are interleaved.

use super::{Threads, MR, NR};
use crate::cpu::{GemmElem, Mat};
use rayon::prelude::*;

/// Two values as the `u32` lane of bf16s `vdpbf16ps` reads (`lo` in the low half; f32 values
/// rounded to nearest even).
#[inline(always)]
fn pair<E: GemmElem>(lo: E, hi: E) -> u32 {
    u32::from(lo.bf16_bits()) | (u32::from(hi.bf16_bits()) << 16)
}

/// A matrix seen as `outer × k`: element `(o, q)` at `data[o·so + q·sk]`.
#[derive(Clone, Copy)]
struct ByOuter<'a, E> {
    data: &'a [E],
    so: usize,
    sk: usize,
}

/// `a[m×k]` as row panels of [`MR`]: `[m/MR][k/2][MR]`, written at the start of `out` (grown to fit).
pub(super) fn lhs<E: GemmElem>(m: usize, k: usize, a: Mat<'_, E>, out: &mut Vec<u32>, threads: Threads) {
    panels::<MR, _>(m, k, ByOuter { data: a.data, so: a.rs, sk: a.cs }, out, threads)
}

/// `b[k×n]` as column panels of [`NR`]: `[n/NR][k/2][NR]`, written at the start of `out` (grown to fit).
pub(super) fn rhs<E: GemmElem>(k: usize, n: usize, b: Mat<'_, E>, out: &mut Vec<u32>, threads: Threads) {
    panels::<NR, _>(n, k, ByOuter { data: b.data, so: b.cs, sk: b.rs }, out, threads)
}

/// [`lhs`] on this thread into `out`, which must hold the panels exactly (`m/MR·k/2·MR` values).
pub(super) fn lhs_into<E: GemmElem>(m: usize, k: usize, a: Mat<'_, E>, out: &mut [u32]) {
    panels_into::<MR, _>(m, k, ByOuter { data: a.data, so: a.rs, sk: a.cs }, out, Threads::Caller)
}

/// [`rhs`] on this thread into `out`, which must hold the panels exactly (`n/NR·k/2·NR` values).
pub(super) fn rhs_into<E: GemmElem>(k: usize, n: usize, b: Mat<'_, E>, out: &mut [u32]) {
    panels_into::<NR, _>(n, k, ByOuter { data: b.data, so: b.cs, sk: b.rs }, out, Threads::Caller)
}

/// Rows `rows` of `a` (the start a multiple of [`MR`]) at k pairs `pairs` as row panels
/// `[panel][pair][MR]` (`pairs.len()` pairs per panel) at the start of `out`, which must hold
/// them: the block of the lhs one tile reads in one k block, packed by the tile itself.
pub(super) fn lhs_block<E: GemmElem>(
    m: usize,
    k: usize,
    a: Mat<'_, E>,
    rows: std::ops::Range<usize>,
    pairs: std::ops::Range<usize>,
    out: &mut [u32],
) {
    block::<MR, _>(m, k, ByOuter { data: a.data, so: a.rs, sk: a.cs }, rows, pairs, out)
}

/// Columns `cols` of `b` (the start a multiple of [`NR`]) at k pairs `pairs` as column panels
/// `[panel][pair][NR]` at the start of `out`, as [`lhs_block`].
pub(super) fn rhs_block<E: GemmElem>(
    k: usize,
    n: usize,
    b: Mat<'_, E>,
    cols: std::ops::Range<usize>,
    pairs: std::ops::Range<usize>,
    out: &mut [u32],
) {
    block::<NR, _>(n, k, ByOuter { data: b.data, so: b.cs, sk: b.rs }, cols, pairs, out)
}

/// Outer indices `outer_range` of `src` at k pairs `pairs` as `[panel][pair][W]` in `out`.
fn block<const W: usize, E: GemmElem>(
    outer: usize,
    k: usize,
    src: ByOuter<'_, E>,
    outer_range: std::ops::Range<usize>,
    pairs: std::ops::Range<usize>,
    out: &mut [u32],
) {
    let len = pairs.len() * W;
    let first = outer_range.start / W;
    let panels = outer_range.len().div_ceil(W);
    // With k rows interleaved, a few pairs of every panel at a time (as `panels` does), so each
    // source row is read as one run across the block.
    let interleaved = src.so == 1 && src.sk != 1;
    let step = if interleaved { PAIR_BLOCK } else { pairs.len() };
    for q0 in pairs.clone().step_by(step.max(1)) {
        let q1 = (q0 + step).min(pairs.end);
        if interleaved {
            // The rows of the next step (of the next k block after the last step).
            prefetch_rows(
                src,
                (2 * q1).min(k)..(2 * (q1 + step)).min(k),
                outer_range.start..outer_range.end.min(outer),
            );
        }
        let at = (q0 - pairs.start) * W..(q1 - pairs.start) * W;
        for (i, panel) in out[..panels * len].chunks_exact_mut(len).enumerate() {
            fill_pairs::<W, E>(outer, k, src, first + i, &mut panel[at.clone()], (q0, q1));
        }
    }
}

/// Asks the cache for k rows `rows` of a source whose outer index is contiguous, at outer indices
/// `outer`: the rows a block packs next, kilobytes apart and read in runs of a few hundred
/// bytes, which the hardware prefetchers pick up late.
fn prefetch_rows<E>(src: ByOuter<'_, E>, rows: std::ops::Range<usize>, outer: std::ops::Range<usize>) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    if outer.is_empty() {
        return;
    }
    let per_line = (64 / std::mem::size_of::<E>()).max(1);
    for kk in rows {
        let run = kk * src.sk;
        for o in outer.clone().step_by(per_line).chain([outer.end - 1]) {
            if let Some(value) = src.data.get(run + o) {
                // SAFETY: the value is inside the slice; a prefetch reads nothing.
                unsafe { _mm_prefetch::<_MM_HINT_T0>((value as *const E).cast()) }
            }
        }
    }
}

/// Pairs `q0..q1` of panel `p` of the `outer × k` source (`lanes`: those pairs' `W` lanes each),
/// zero past the last outer index and the last k.
fn fill_pairs<const W: usize, E: GemmElem>(
    outer: usize,
    k: usize,
    src: ByOuter<'_, E>,
    p: usize,
    lanes: &mut [u32],
    (q0, q1): (usize, usize),
) {
    let o0 = p * W;
    let valid = W.min(outer - o0);
    // The source from k row 2·q0 on, cut at row 2·q1.
    let from = ByOuter { data: src.data.get(2 * q0 * src.sk..).unwrap_or(&[]), ..src };
    fill_panel::<W, E>(lanes, o0, valid, k.min(2 * q1) - 2 * q0, from);
    if valid < W {
        for row in lanes.chunks_exact_mut(W) {
            row[valid..].fill(0);
        }
    }
}

/// Panels of `W` outer indices: `[outer/W][k/2][W]`, zero-padded, at the start of `out`. Every
/// element of them is written, so `out` may be a buffer reused from an earlier call; it only
/// grows (zeroed where it grows), since shrinking it would cost a zero-fill when it grows back.
fn panels<const W: usize, E: GemmElem>(
    outer: usize,
    k: usize,
    src: ByOuter<'_, E>,
    out: &mut Vec<u32>,
    threads: Threads,
) {
    let len = outer.div_ceil(W) * k.div_ceil(2) * W;
    if out.len() < len {
        out.resize(len, 0);
    }
    panels_into::<W, E>(outer, k, src, &mut out[..len], threads)
}

/// [`panels`] into `out`, which holds them exactly.
fn panels_into<const W: usize, E: GemmElem>(
    outer: usize,
    k: usize,
    src: ByOuter<'_, E>,
    out: &mut [u32],
    threads: Threads,
) {
    let kp = k.div_ceil(2);
    let len = outer.div_ceil(W) * kp * W;
    assert_eq!(out.len(), len, "bf16 gemm: packed panels buffer of the wrong size");
    let fill = |p: usize, lanes: &mut [u32], pairs: (usize, usize)| {
        fill_pairs::<W, E>(outer, k, src, p, lanes, pairs)
    };
    if src.so == 1 && src.sk != 1 {
        // k rows interleaved: a task takes a group of panels and walks their rows in blocks.
        let group = |(g, panels): (usize, &mut [u32])| {
            for q0 in (0..kp).step_by(PAIR_BLOCK) {
                let q1 = (q0 + PAIR_BLOCK).min(kp);
                for (i, panel) in panels.chunks_mut(kp * W).enumerate() {
                    fill(g * PANEL_GROUP + i, &mut panel[q0 * W..q1 * W], (q0, q1));
                }
            }
        };
        match threads {
            Threads::Pool => out.par_chunks_mut(PANEL_GROUP * kp * W).enumerate().for_each(group),
            Threads::Caller => out.chunks_mut(PANEL_GROUP * kp * W).enumerate().for_each(group),
        }
        return;
    }
    let whole = |(p, panel): (usize, &mut [u32])| fill(p, panel, (0, kp));
    match threads {
        Threads::Pool => out.par_chunks_mut(kp * W).enumerate().for_each(whole),
        Threads::Caller => out.chunks_mut(kp * W).enumerate().for_each(whole),
    }
}

/// Panels per task, and k pairs per block, when the outer index is contiguous (two k rows
/// interleaved per pair): the task reads each source row as one run of `PANEL_GROUP·W` values,
/// a block of rows at a time, instead of walking a strip `W` values wide down the whole matrix
/// per panel (rows kilobytes apart, which the prefetchers follow badly). One thread, SD's weight
/// shapes as the input gradient packs them: 0.50-0.77 -> 0.41-0.46 ns per value.
const PANEL_GROUP: usize = 16;
const PAIR_BLOCK: usize = 8;

/// Lanes `w < valid` of every k pair of one panel (outer indices `o0..o0 + valid`).
fn fill_panel<const W: usize, E: GemmElem>(
    panel: &mut [u32],
    o0: usize,
    valid: usize,
    k: usize,
    src: ByOuter<'_, E>,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(data) = E::f32_values(src.data) {
        if src.sk == 1 || src.so == 1 {
            // SAFETY: panels are packed only for the AVX512_BF16 kernel, which runs only where
            // `gemm_with` found its features (AVX512F, AVX512BW, AVX512_BF16).
            unsafe {
                if src.sk == 1 {
                    super::pack_f32::pairs_contiguous::<W>(panel, data, o0, valid, k, src.so);
                } else {
                    super::pack_f32::interleave_rows::<W>(panel, data, o0, valid, k, src.sk);
                }
            }
            return;
        }
    }
    if src.sk == 1 {
        pairs_contiguous::<W, _>(panel, o0, valid, k, src);
    } else if src.so == 1 {
        interleave_rows::<W, _>(panel, o0, valid, k, src);
    } else {
        for (q, lanes) in panel.chunks_exact_mut(W).enumerate() {
            for (w, lane) in lanes.iter_mut().take(valid).enumerate() {
                let at = |kk: usize| {
                    if kk < k {
                        src.data[(o0 + w) * src.so + kk * src.sk]
                    } else {
                        E::default()
                    }
                };
                *lane = pair(at(2 * q), at(2 * q + 1));
            }
        }
    }
}

/// k has stride 1: each outer index's k values are a contiguous run, read two at a time.
fn pairs_contiguous<const W: usize, E: GemmElem>(
    panel: &mut [u32],
    o0: usize,
    valid: usize,
    k: usize,
    src: ByOuter<'_, E>,
) {
    for w in 0..valid {
        let run = &src.data[(o0 + w) * src.so..][..k];
        let mut pairs = run.chunks_exact(2);
        for (q, two) in (&mut pairs).enumerate() {
            panel[q * W + w] = pair(two[0], two[1]);
        }
        if let [last] = pairs.remainder() {
            panel[(k / 2) * W + w] = pair(*last, E::default());
        }
    }
}

/// The outer index has stride 1: k rows are contiguous runs of outer values; two consecutive
/// rows are interleaved into one row of pairs.
fn interleave_rows<const W: usize, E: GemmElem>(
    panel: &mut [u32],
    o0: usize,
    valid: usize,
    k: usize,
    src: ByOuter<'_, E>,
) {
    for (q, lanes) in panel.chunks_exact_mut(W).enumerate() {
        let even = &src.data[2 * q * src.sk + o0..][..valid];
        if 2 * q + 1 < k {
            let odd = &src.data[(2 * q + 1) * src.sk + o0..][..valid];
            for ((lane, &lo), &hi) in lanes.iter_mut().zip(even).zip(odd) {
                *lane = pair(lo, hi);
            }
        } else {
            for (lane, &lo) in lanes.iter_mut().zip(even) {
                *lane = pair(lo, E::default());
            }
        }
    }
}
