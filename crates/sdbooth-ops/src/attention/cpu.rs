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
//!
//! The bf16 GEMM converts and packs its operands into panels of bf16 pairs. Packed per tile
//! product, each key tile would be packed again for every block of queries (64 times per head
//! at 4096 tokens), so under the AVX512_BF16 kernel each head's q, k, v (and output gradient)
//! are packed once, as every product reads them ([`HeadPacks`]), and the products read parts
//! of those panels: the same bf16 pairs summed in the same order, so the same bits.

use super::{Dims, Want};
use crate::bf16_gemm::{Operand, Panels};
use crate::cpu::{self, Mat, Precision};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// Query rows per tile.
const BQ: usize = 64;
/// Key rows per tile.
const BK: usize = 256;

/// How the bf16 tile products get their operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Packing {
    /// Each product packs its operands (always for f32 products, whose GEMM packs its own).
    PerProduct,
    /// Each head's operands are packed once into the bf16 GEMM's panels ([`HeadPacks`]).
    PerHead,
}

impl Packing {
    /// Per head for bf16 products on a kernel that reads packed panels, else per product.
    pub(crate) fn for_precision(precision: Precision) -> Self {
        if precision == Precision::Bf16 && Panels::supported() {
            Packing::PerHead
        } else {
            Packing::PerProduct
        }
    }
}

/// One head's operands packed once for the bf16 products, named by the product that reads
/// them and its operand (scores `S = Q·Kᵀ`, `P·V`; backward `dP = dO·Vᵀ`, `dV += Pᵀ·dO`,
/// `dQ += dS·K`, `dK += dSᵀ·Q`). The lhs panels are cut into blocks of [`BQ`] query rows (a
/// tile's rows start a panel). Kept per worker thread and reused: O((N + M)·d) per thread.
#[derive(Default)]
struct HeadPacks {
    scores_q: Panels,
    scores_k: Panels,
    pv_v: Panels,
    dp_go: Panels,
    dp_v: Panels,
    dv_go: Panels,
    dq_k: Panels,
    dk_q: Panels,
}

thread_local! {
    /// This thread's [`HeadPacks`], taken out while a head uses them.
    static HEAD_PACKS: RefCell<HeadPacks> = RefCell::new(HeadPacks::default());
}

impl HeadPacks {
    /// Runs `f` with this thread's packs under [`Packing::PerHead`] (else with none).
    fn with<R>(packing: Packing, f: impl FnOnce(Option<&mut HeadPacks>) -> R) -> R {
        if packing == Packing::PerProduct {
            return f(None);
        }
        let mut packs = HEAD_PACKS.with(|p| std::mem::take(&mut *p.borrow_mut()));
        let result = f(Some(&mut packs));
        HEAD_PACKS.with(|p| *p.borrow_mut() = packs);
        result
    }

    /// The forward's operands: q and k for the scores, v for `P·V`.
    fn pack_forward(&mut self, q: &[f32], k: &[f32], v: &[f32], dm: &Dims) {
        let (n, m, d, dv) = (dm.n, dm.m, dm.d, dm.dv);
        self.scores_q.pack_lhs(n, d, Mat::rows(q, d), BQ);
        self.scores_k.pack_rhs(d, m, Mat::transposed(k, d));
        self.pv_v.pack_rhs(m, dv, Mat::rows(v, dv));
    }

    /// The backward's operands, for the gradients it computes.
    fn pack_backward(&mut self, (q, k, v, _, go): HeadInputs<'_>, dm: &Dims, want: Want) {
        let (n, m, d, dv) = (dm.n, dm.m, dm.d, dm.dv);
        self.scores_q.pack_lhs(n, d, Mat::rows(q, d), BQ);
        self.scores_k.pack_rhs(d, m, Mat::transposed(k, d));
        if want.dv {
            self.dv_go.pack_rhs(n, dv, Mat::rows(go, dv));
        }
        if want.dq || want.dk {
            self.dp_go.pack_lhs(n, dv, Mat::rows(go, dv), BQ);
            self.dp_v.pack_rhs(dv, m, Mat::transposed(v, dv));
        }
        if want.dq {
            self.dq_k.pack_rhs(m, d, Mat::rows(k, d));
        }
        if want.dk {
            self.dk_q.pack_rhs(n, d, Mat::rows(q, d));
        }
    }
}

/// A product's operand: the part at outer indices `outer` and k values `ks` of the head's
/// packed panels, or else the matrix `mat` (which holds that part).
fn operand<'a>(
    packed: Option<&'a Panels>,
    outer: Range<usize>,
    ks: Range<usize>,
    mat: Mat<'a>,
) -> Operand<'a> {
    match packed {
        Some(panels) => Operand::Packed(panels.part(outer, ks)),
        None => Operand::Mat(mat),
    }
}

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
    a: Operand<'_>,
    b: Operand<'_>,
) {
    match (precision, a, b) {
        (Precision::Stored, Operand::Mat(a), Operand::Mat(b)) => {
            cpu::sgemm(m, n, k, dst, dst_rs, accumulate, a, b, gemm::Parallelism::None)
        }
        (Precision::Bf16, a, b) => crate::bf16_gemm::gemm_serial(m, n, k, dst, dst_rs, accumulate, a, b),
        (Precision::Stored, ..) => unreachable!("attention packs operands only for bf16 products"),
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

/// Scores tile `s[r, c] = scale · q[q0 + r] · k[k0 + c]`, masked to -inf above the diagonal
/// (`packs`: the head's packed operands, if packed).
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
    packs: Option<&HeadPacks>,
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
        operand(packs.map(|p| &p.scores_q), q0..q0 + bq, 0..d, Mat::rows(&q[q0 * d..(q0 + bq) * d], d)),
        operand(packs.map(|p| &p.scores_k), k0..k0 + bk, 0..d, Mat::transposed(&k[k0 * d..(k0 + bk) * d], d)),
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
    packs: Option<&HeadPacks>,
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
            score_tile(&mut s, q, k, dm, (q0, bq), (k0, bk), scale, causal, precision, packs);
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
                Mat::rows(&s, bk).into(),
                operand(
                    packs.map(|p| &p.pv_v),
                    0..dv,
                    k0..k0 + bk,
                    Mat::rows(&v[k0 * dv..(k0 + bk) * dv], dv),
                ),
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
    packs: Option<&HeadPacks>,
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
            score_tile(&mut p, q, k, dm, (q0, bq), (k0, bk), scale, causal, precision, packs);
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
                    Mat::transposed(&p[..bq * bk], bk).into(),
                    operand(
                        packs.map(|p| &p.dv_go),
                        0..dv,
                        q0..q0 + bq,
                        Mat::rows(&go[q0 * dv..(q0 + bq) * dv], dv),
                    ),
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
                operand(
                    packs.map(|p| &p.dp_go),
                    q0..q0 + bq,
                    0..dv,
                    Mat::rows(&go[q0 * dv..(q0 + bq) * dv], dv),
                ),
                operand(
                    packs.map(|p| &p.dp_v),
                    k0..k0 + bk,
                    0..dv,
                    Mat::transposed(&v[k0 * dv..(k0 + bk) * dv], dv),
                ),
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
                    Mat::rows(&dp[..bq * bk], bk).into(),
                    operand(
                        packs.map(|p| &p.dq_k),
                        0..d,
                        k0..k0 + bk,
                        Mat::rows(&k[k0 * d..(k0 + bk) * d], d),
                    ),
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
                    Mat::transposed(&dp[..bq * bk], bk).into(),
                    operand(
                        packs.map(|p| &p.dk_q),
                        0..d,
                        q0..q0 + bq,
                        Mat::rows(&q[q0 * d..(q0 + bq) * d], d),
                    ),
                );
            }
        }
    }
}

/// Forward on f32 slices, with the bf16 products' operands packed as `packing` says
/// ([`Packing::for_precision`]); returns `(o, lse)`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dm: &Dims,
    scale: f32,
    causal: bool,
    precision: Precision,
    packing: Packing,
) -> (Vec<f32>, Vec<f32>) {
    let mut o = vec![0f32; dm.bh * dm.n * dm.dv];
    let mut lse = vec![0f32; dm.bh * dm.n];
    if dm.n == 0 {
        return (o, lse);
    }
    o.par_chunks_mut(dm.n * dm.dv).zip(lse.par_chunks_mut(dm.n)).enumerate().for_each(|(h, (oh, lh))| {
        let q = &q[h * dm.n * dm.d..(h + 1) * dm.n * dm.d];
        let k = &k[h * dm.m * dm.d..(h + 1) * dm.m * dm.d];
        let v = &v[h * dm.m * dm.dv..(h + 1) * dm.m * dm.dv];
        HeadPacks::with(packing, |packs| {
            let packs = packs.map(|p| {
                p.pack_forward(q, k, v, dm);
                &*p
            });
            head_forward(q, k, v, oh, lh, dm, scale, causal, precision, packs)
        })
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

/// Backward on f32 slices, operands packed as in [`forward`]: returns `(dq, dk, dv)` (an
/// unwanted gradient stays zero). Three buffers rather than one: no allocation is larger than
/// the largest operand.
pub fn backward(
    t: &BackwardInputs<'_>,
    dm: &Dims,
    scale: f32,
    causal: bool,
    want: Want,
    precision: Precision,
    packing: Packing,
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
            let inputs = (
                &t.q[h * n * d..(h + 1) * n * d],
                &t.k[h * m * d..(h + 1) * m * d],
                &t.v[h * m * dv..(h + 1) * m * dv],
                &t.o[h * n * dv..(h + 1) * n * dv],
                &t.go[h * n * dv..(h + 1) * n * dv],
            );
            HeadPacks::with(packing, |packs| {
                let packs = packs.map(|p| {
                    p.pack_backward(inputs, dm, want);
                    &*p
                });
                let lse = &t.lse[h * n..(h + 1) * n];
                head_backward(inputs, lse, (dqh, dkh, dvh), dm, scale, causal, want, precision, packs)
            })
        });
    (dq, dk, dvv)
}
