//! Memory-efficient scaled-dot-product attention on CPU (FlashAttention-2 style).
//!
//! Forward walks key/value tiles with an online softmax (running row max `m`, running sum `l`)
//! and keeps only the per-row log-sum-exp `lse = m + ln l`. Backward recomputes each score tile
//! from Q, K and the saved lse, so no N×M score matrix ever exists: per worker thread the
//! scratch is a few `BQ×BK` tiles, and the op's own memory is O((N + M)·d) per head.
//!
//! Work is split over batch·heads with rayon; each head is processed sequentially by one task
//! in a fixed tile order, so results are bit-identical whatever the thread count. Tile products
//! go through [`crate::cpu::sgemm`], or the bf16 GEMM under [`Precision::Bf16`] (both
//! single-threaded inside a task); the softmax and its gradient stay in f32.

use super::{Dims, Want};
use crate::cpu::{self, Mat, Precision};
use rayon::prelude::*;

/// Query rows per tile.
const BQ: usize = 64;
/// Key rows per tile.
const BK: usize = 256;

/// A tile product on this thread, `dst[m×n] = (accumulate ? dst : 0) + a · b`: in f32, or with
/// [`Precision::Bf16`] in bf16 with f32 sums (both operands rounded to bf16 as they are packed),
/// as PyTorch's autocast runs attention's two products and their gradients.
#[allow(clippy::too_many_arguments)]
fn product(
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
) {
    match precision {
        Precision::Stored => cpu::sgemm(m, n, k, dst, dst_rs, accumulate, a, b, gemm::Parallelism::None),
        Precision::Bf16 => crate::bf16_gemm::gemm_serial(m, n, k, dst, dst_rs, accumulate, a, b),
    }
}

/// Key tiles a query tile `[q0, q1)` must visit: all of them, or up to the diagonal if causal.
fn key_end(causal: bool, q1: usize, m: usize) -> usize {
    if causal {
        q1.min(m)
    } else {
        m
    }
}

/// Scores tile `s[r, c] = scale · q[q0 + r] · k[k0 + c]`, masked to -inf above the diagonal.
#[allow(clippy::too_many_arguments)]
fn score_tile(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    dm: &Dims,
    (q0, bq): (usize, usize),
    (k0, bk): (usize, usize),
    scale: f32,
    causal: bool,
    precision: Precision,
) {
    let d = dm.d;
    product(
        precision,
        bq,
        bk,
        d,
        s,
        bk,
        false,
        Mat::rows(&q[q0 * d..(q0 + bq) * d], d),
        Mat::transposed(&k[k0 * d..(k0 + bk) * d], d),
    );
    for r in 0..bq {
        let row = &mut s[r * bk..(r + 1) * bk];
        // Keys past the query index are masked (CLIP's causal mask); the first such column:
        let lim = if causal { (q0 + r + 1).saturating_sub(k0).min(bk) } else { bk };
        for x in row[..lim].iter_mut() {
            *x *= scale;
        }
        row[lim..].fill(f32::NEG_INFINITY);
    }
}

/// Forward for one head: writes `o[n, dv]` and `lse[n]`.
#[allow(clippy::too_many_arguments)]
fn head_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
    dm: &Dims,
    scale: f32,
    causal: bool,
    precision: Precision,
) {
    let (n, m, dv) = (dm.n, dm.m, dm.dv);
    let mut s = vec![0f32; BQ * BK];
    let mut acc = vec![0f32; BQ * dv];
    let mut mx = [0f32; BQ];
    let mut l = [0f32; BQ];
    for q0 in (0..n).step_by(BQ) {
        let bq = BQ.min(n - q0);
        mx[..bq].fill(f32::NEG_INFINITY);
        l[..bq].fill(0.0);
        acc[..bq * dv].fill(0.0);
        let kend = key_end(causal, q0 + bq, m);
        for k0 in (0..kend).step_by(BK) {
            let bk = BK.min(kend - k0);
            score_tile(&mut s, q, k, dm, (q0, bq), (k0, bk), scale, causal, precision);
            for r in 0..bq {
                let row = &mut s[r * bk..(r + 1) * bk];
                let tile_max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let new_max = mx[r].max(tile_max);
                if new_max == f32::NEG_INFINITY {
                    // Whole row masked so far: nothing to accumulate.
                    row.fill(0.0);
                    continue;
                }
                let sum = cpu::exp_sub_sum(row, new_max);
                let corr = (mx[r] - new_max).exp();
                l[r] = l[r] * corr + sum;
                mx[r] = new_max;
                if corr != 1.0 {
                    for a in acc[r * dv..(r + 1) * dv].iter_mut() {
                        *a *= corr;
                    }
                }
            }
            // acc += P · V_tile
            product(
                precision,
                bq,
                dv,
                bk,
                &mut acc,
                dv,
                true,
                Mat::rows(&s, bk),
                Mat::rows(&v[k0 * dv..(k0 + bk) * dv], dv),
            );
        }
        for r in 0..bq {
            let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
            for (dst, a) in o[(q0 + r) * dv..(q0 + r + 1) * dv].iter_mut().zip(&acc[r * dv..(r + 1) * dv]) {
                *dst = a * inv;
            }
            lse[q0 + r] = if l[r] > 0.0 { mx[r] + l[r].ln() } else { f32::INFINITY };
        }
    }
}

/// One head's q, k, v, o and dO.
type HeadInputs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// Backward for one head (FlashAttention-2 order: key tiles outer, query tiles inner).
#[allow(clippy::too_many_arguments)]
fn head_backward(
    (q, k, v, o, go): HeadInputs<'_>,
    lse: &[f32],
    (dq, dk, dvv): (&mut [f32], &mut [f32], &mut [f32]),
    dm: &Dims,
    scale: f32,
    causal: bool,
    want: Want,
    precision: Precision,
) {
    let (n, m, d, dv) = (dm.n, dm.m, dm.d, dm.dv);
    // delta[i] = rowsum(dO ∘ O): the softmax-backward correction, computed once per row.
    let delta: Vec<f32> = (0..n)
        .map(|i| go[i * dv..(i + 1) * dv].iter().zip(&o[i * dv..(i + 1) * dv]).map(|(a, b)| a * b).sum())
        .collect();
    let mut p = vec![0f32; BQ * BK];
    let mut dp = vec![0f32; BQ * BK];
    dq.fill(0.0);
    for k0 in (0..m).step_by(BK) {
        let bk = BK.min(m - k0);
        let dk_t = &mut dk[k0 * d..(k0 + bk) * d];
        let dv_t = &mut dvv[k0 * dv..(k0 + bk) * dv];
        dk_t.fill(0.0);
        dv_t.fill(0.0);
        // With a causal mask, query rows before k0 see none of this tile.
        let qstart = if causal { (k0 / BQ) * BQ } else { 0 };
        for q0 in (qstart..n).step_by(BQ) {
            let bq = BQ.min(n - q0);
            if causal && q0 + bq <= k0 {
                continue;
            }
            score_tile(&mut p, q, k, dm, (q0, bq), (k0, bk), scale, causal, precision);
            for r in 0..bq {
                cpu::exp_sub_sum(&mut p[r * bk..(r + 1) * bk], lse[q0 + r]);
            }
            if want.dv {
                // dV_tile += Pᵀ · dO_rows
                product(
                    precision,
                    bk,
                    dv,
                    bq,
                    dv_t,
                    dv,
                    true,
                    Mat::transposed(&p[..bq * bk], bk),
                    Mat::rows(&go[q0 * dv..(q0 + bq) * dv], dv),
                );
            }
            if !(want.dq || want.dk) {
                continue;
            }
            // dP = dO_rows · V_tileᵀ
            product(
                precision,
                bq,
                bk,
                dv,
                &mut dp,
                bk,
                false,
                Mat::rows(&go[q0 * dv..(q0 + bq) * dv], dv),
                Mat::transposed(&v[k0 * dv..(k0 + bk) * dv], dv),
            );
            // dS = P ∘ (dP − delta) · scale, stored in dp.
            for r in 0..bq {
                let dl = delta[q0 + r];
                for (g, pv) in dp[r * bk..(r + 1) * bk].iter_mut().zip(&p[r * bk..(r + 1) * bk]) {
                    *g = pv * (*g - dl) * scale;
                }
            }
            if want.dq {
                product(
                    precision,
                    bq,
                    d,
                    bk,
                    &mut dq[q0 * d..(q0 + bq) * d],
                    d,
                    true,
                    Mat::rows(&dp[..bq * bk], bk),
                    Mat::rows(&k[k0 * d..(k0 + bk) * d], d),
                );
            }
            if want.dk {
                product(
                    precision,
                    bk,
                    d,
                    bq,
                    dk_t,
                    d,
                    true,
                    Mat::transposed(&dp[..bq * bk], bk),
                    Mat::rows(&q[q0 * d..(q0 + bq) * d], d),
                );
            }
        }
    }
}

/// Forward on f32 slices; returns `(o, lse)`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dm: &Dims,
    scale: f32,
    causal: bool,
    precision: Precision,
) -> (Vec<f32>, Vec<f32>) {
    let mut o = vec![0f32; dm.bh * dm.n * dm.dv];
    let mut lse = vec![0f32; dm.bh * dm.n];
    if dm.n == 0 {
        return (o, lse);
    }
    o.par_chunks_mut(dm.n * dm.dv).zip(lse.par_chunks_mut(dm.n)).enumerate().for_each(|(h, (oh, lh))| {
        head_forward(
            &q[h * dm.n * dm.d..(h + 1) * dm.n * dm.d],
            &k[h * dm.m * dm.d..(h + 1) * dm.m * dm.d],
            &v[h * dm.m * dm.dv..(h + 1) * dm.m * dm.dv],
            oh,
            lh,
            dm,
            scale,
            causal,
            precision,
        )
    });
    (o, lse)
}

/// The operands of the backward, as f32 slices of all heads.
pub struct BackwardInputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub o: &'a [f32],
    pub go: &'a [f32],
    pub lse: &'a [f32],
}

/// Backward on f32 slices: returns `(dq, dk, dv)` (an unwanted gradient stays zero). Three
/// buffers rather than one: no allocation is larger than the largest operand.
pub fn backward(
    t: &BackwardInputs<'_>,
    dm: &Dims,
    scale: f32,
    causal: bool,
    want: Want,
    precision: Precision,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, m, d, dv) = (dm.n, dm.m, dm.d, dm.dv);
    let mut dq = vec![0f32; dm.bh * n * d];
    let mut dk = vec![0f32; dm.bh * m * d];
    let mut dvv = vec![0f32; dm.bh * m * dv];
    if n == 0 {
        return (dq, dk, dvv);
    }
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d))
        .zip(dvv.par_chunks_mut(m * dv))
        .enumerate()
        .for_each(|(h, ((dqh, dkh), dvh))| {
            head_backward(
                (
                    &t.q[h * n * d..(h + 1) * n * d],
                    &t.k[h * m * d..(h + 1) * m * d],
                    &t.v[h * m * dv..(h + 1) * m * dv],
                    &t.o[h * n * dv..(h + 1) * n * dv],
                    &t.go[h * n * dv..(h + 1) * n * dv],
                ),
                &t.lse[h * n..(h + 1) * n],
                (dqh, dkh, dvh),
                dm,
                scale,
                causal,
                want,
                precision,
            )
        });
    (dq, dk, dvv)
}
