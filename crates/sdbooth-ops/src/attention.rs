//! Memory-efficient scaled-dot-product attention on CPU (FlashAttention-2 style).
//!
//! Forward walks key/value tiles with an online softmax (running row max `m`, running sum `l`)
//! and keeps only the per-row log-sum-exp `lse = m + ln l`. Backward recomputes each score tile
//! from Q, K and the saved lse, so no N×M score matrix ever exists: per worker thread the
//! scratch is a few `BQ×BK` tiles, and the op's own memory is O((N + M)·d) per head.
//!
//! Work is split over batch·heads with rayon; each head is processed sequentially by one task
//! in a fixed tile order, so results are bit-identical whatever the thread count. Tile products
//! go through [`crate::cpu::sgemm`] (single-threaded inside a task).

use crate::cpu::{self, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Query rows per tile.
const BQ: usize = 64;
/// Key rows per tile.
const BK: usize = 256;

#[derive(Clone, Copy, Debug)]
struct Dims {
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
}

fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    let (&[b, h, n, d], &[bk, hk, m, dk], &[bv, hv, mv, dv]) = (q, k, v) else {
        bail!("attention: expected 4-D q, k, v ([B, H, tokens, head_dim]), got {q:?}, {k:?}, {v:?}")
    };
    if (b, h) != (bk, hk) || (b, h) != (bv, hv) || m != mv || d != dk {
        bail!("attention: incompatible shapes q {q:?}, k {k:?}, v {v:?}");
    }
    if m == 0 || d == 0 || dv == 0 {
        bail!("attention: empty key set or head dimension (k {k:?}, v {v:?})");
    }
    Ok(Dims { bh: b * h, n, m, d, dv })
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
) {
    let d = dm.d;
    cpu::sgemm(
        bq,
        bk,
        d,
        s,
        bk,
        false,
        Mat::rows(&q[q0 * d..(q0 + bq) * d], d),
        Mat::transposed(&k[k0 * d..(k0 + bk) * d], d),
        gemm::Parallelism::None,
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
            score_tile(&mut s, q, k, dm, (q0, bq), (k0, bk), scale, causal);
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
            cpu::sgemm(
                bq,
                dv,
                bk,
                &mut acc,
                dv,
                true,
                Mat::rows(&s, bk),
                Mat::rows(&v[k0 * dv..(k0 + bk) * dv], dv),
                gemm::Parallelism::None,
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

/// Which gradients backward must produce.
#[derive(Clone, Copy)]
struct Want {
    dq: bool,
    dk: bool,
    dv: bool,
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
            score_tile(&mut p, q, k, dm, (q0, bq), (k0, bk), scale, causal);
            for r in 0..bq {
                cpu::exp_sub_sum(&mut p[r * bk..(r + 1) * bk], lse[q0 + r]);
            }
            if want.dv {
                // dV_tile += Pᵀ · dO_rows
                cpu::sgemm(
                    bk,
                    dv,
                    bq,
                    dv_t,
                    dv,
                    true,
                    Mat::transposed(&p[..bq * bk], bk),
                    Mat::rows(&go[q0 * dv..(q0 + bq) * dv], dv),
                    gemm::Parallelism::None,
                );
            }
            if !(want.dq || want.dk) {
                continue;
            }
            // dP = dO_rows · V_tileᵀ
            cpu::sgemm(
                bq,
                bk,
                dv,
                &mut dp,
                bk,
                false,
                Mat::rows(&go[q0 * dv..(q0 + bq) * dv], dv),
                Mat::transposed(&v[k0 * dv..(k0 + bk) * dv], dv),
                gemm::Parallelism::None,
            );
            // dS = P ∘ (dP − delta) · scale, stored in dp.
            for r in 0..bq {
                let dl = delta[q0 + r];
                for (g, pv) in dp[r * bk..(r + 1) * bk].iter_mut().zip(&p[r * bk..(r + 1) * bk]) {
                    *g = pv * (*g - dl) * scale;
                }
            }
            if want.dq {
                cpu::sgemm(
                    bq,
                    d,
                    bk,
                    &mut dq[q0 * d..(q0 + bq) * d],
                    d,
                    true,
                    Mat::rows(&dp[..bq * bk], bk),
                    Mat::rows(&k[k0 * d..(k0 + bk) * d], d),
                    gemm::Parallelism::None,
                );
            }
            if want.dk {
                cpu::sgemm(
                    bk,
                    d,
                    bq,
                    dk_t,
                    d,
                    true,
                    Mat::transposed(&dp[..bq * bk], bk),
                    Mat::rows(&q[q0 * d..(q0 + bq) * d], d),
                    gemm::Parallelism::None,
                );
            }
        }
    }
}

/// The custom op. The per-row log-sum-exp of the forward is kept here for the backward
/// (candle's `bwd` only sees inputs, output and output gradient).
pub(crate) struct AttentionOp {
    pub causal: bool,
    pub scale: f32,
    pub lse: Arc<Mutex<Option<Vec<f32>>>>,
}

impl AttentionOp {
    pub fn new(causal: bool, head_dim: usize) -> Self {
        AttentionOp { causal, scale: 1.0 / (head_dim as f32).sqrt(), lse: Arc::new(Mutex::new(None)) }
    }
}

/// Forward on f32 slices; returns `(o, lse)`.
fn forward(q: &[f32], k: &[f32], v: &[f32], dm: &Dims, scale: f32, causal: bool) -> (Vec<f32>, Vec<f32>) {
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
        )
    });
    (o, lse)
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sdbooth-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims(l1.dims(), l2.dims(), l3.dims())?;
        if s1.dtype() != s2.dtype() || s1.dtype() != s3.dtype() {
            bail!("attention: q, k, v dtypes differ");
        }
        let (q, k, v) = (cpu::storage_f32(s1, l1)?, cpu::storage_f32(s2, l2)?, cpu::storage_f32(s3, l3)?);
        let (o, lse) = forward(&q, &k, &v, &dm, self.scale, self.causal);
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        let sh = l1.dims();
        Ok((cpu::storage_from_f32(o, s1.dtype())?, Shape::from((sh[0], sh[1], dm.n, dm.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = Want { dq: q.track_op(), dk: k.track_op(), dv: v.track_op() };
        if !(want.dq || want.dk || want.dv) {
            return Ok((None, None, None));
        }
        let dm = dims(q.dims(), k.dims(), v.dims())?;
        let (dq, dk, dv) = cpu::with_f32(q, |qs| {
            cpu::with_f32(k, |ks| {
                cpu::with_f32(v, |vs| {
                    cpu::with_f32(o, |os| {
                        cpu::with_f32(go, |gos| {
                            // The saved lse, or (if this op object lost it) a recomputation.
                            let saved = self.lse.lock().ok().and_then(|s| s.clone());
                            let lse = match saved {
                                Some(l) if l.len() == dm.bh * dm.n => l,
                                _ => forward(qs, ks, vs, &dm, self.scale, self.causal).1,
                            };
                            Ok(backward(qs, ks, vs, os, gos, &lse, &dm, self.scale, self.causal, want))
                        })
                    })
                })
            })
        })?;
        let wrap = |want: bool, data: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            if want {
                Ok(Some(cpu::tensor_from_f32(data, like.shape().clone(), like.dtype())?))
            } else {
                Ok(None)
            }
        };
        Ok((wrap(want.dq, dq, q)?, wrap(want.dk, dk, k)?, wrap(want.dv, dv, v)?))
    }
}

#[allow(clippy::too_many_arguments)]
fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    go: &[f32],
    lse: &[f32],
    dm: &Dims,
    scale: f32,
    causal: bool,
    want: Want,
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
                    &q[h * n * d..(h + 1) * n * d],
                    &k[h * m * d..(h + 1) * m * d],
                    &v[h * m * dv..(h + 1) * m * dv],
                    &o[h * n * dv..(h + 1) * n * dv],
                    &go[h * n * dv..(h + 1) * n * dv],
                ),
                &lse[h * n..(h + 1) * n],
                (dqh, dkh, dvh),
                dm,
                scale,
                causal,
                want,
            )
        });
    (dq, dk, dvv)
}
