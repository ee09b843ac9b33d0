//! group_norm (optionally fused with SiLU) and layer_norm CPU kernels on f32 slices.
//!
//! Forward writes each group's/row's mean and 1/std (accumulated in f64 within the group/row,
//! stored as f32 pairs) beside the output; backward reads them instead of recomputing. Parameter
//! gradients are summed per fixed chunk (one (batch, group) or a fixed block of rows) and the
//! chunk partials are added in index order, so results do not depend on rayon's scheduling.
//!
//! Backward computes the gradients it is asked for in one pass: dx (empty when not wanted) and
//! the wanted parameter gradients.

use super::{GnDims, Want};
use crate::alloc::uninit_output;
use rayon::prelude::*;

/// Rows per chunk for layer_norm's parameter-gradient partial sums.
const LN_ROWS: usize = 32;

fn mean_rstd(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Group norm forward: returns `(y, stats)`, stats holding `(mean, rstd)` per (batch, group).
pub fn group_norm_forward(
    gd: &GnDims,
    eps: f64,
    silu: bool,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let cg = gd.c / gd.groups;
    if x.is_empty() || gd.s == 0 {
        return (vec![0f32; x.len()], Vec::new());
    }
    assert_eq!(x.len() % (cg * gd.s), 0, "group norm: the op checks the shapes");
    // SAFETY: `x` is whole groups of `cg · s` values; `y` has as many groups and `stats` two
    // values per group, and each group task writes its group of `y` (every channel's plane of
    // `s`) and its two stats.
    let mut y = unsafe { uninit_output(x.len()) };
    let mut stats = unsafe { uninit_output(2 * (x.len() / (cg * gd.s))) };
    y.par_chunks_mut(cg * gd.s)
        .zip(x.par_chunks(cg * gd.s))
        .zip(stats.par_chunks_mut(2))
        .enumerate()
        .for_each(|(i, ((yg, xg), st))| {
            let g = i % gd.groups;
            let (mean, rstd) = mean_rstd(xg, eps);
            st.copy_from_slice(&[mean, rstd]);
            for j in 0..cg {
                let c = g * cg + j;
                let (a, b) = (rstd * gamma[c], beta[c] - mean * rstd * gamma[c]);
                for (yv, &xv) in yg[j * gd.s..(j + 1) * gd.s].iter_mut().zip(&xg[j * gd.s..(j + 1) * gd.s]) {
                    let z = xv * a + b;
                    *yv = if silu { z * sigmoid(z) } else { z };
                }
            }
        });
    (y, stats)
}

/// The operands of a norm backward, as f32 slices; `beta` is read only by the SiLU-fused group
/// norm.
pub struct NormInputs<'a> {
    pub x: &'a [f32],
    pub dy: &'a [f32],
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub stats: &'a [f32],
}

/// The gradients of a norm backward, f32: dx (empty unless wanted), dγ and dβ (when wanted).
pub struct Grads {
    pub x: Vec<f32>,
    pub gamma: Option<Vec<f32>>,
    pub beta: Option<Vec<f32>>,
}

/// Group norm backward.
pub fn group_norm_backward(gd: &GnDims, silu: bool, inp: &NormInputs<'_>, want: Want) -> Grads {
    let cg = gd.c / gd.groups;
    let gs = cg * gd.s;
    let numel = inp.x.len();
    assert_eq!(numel.checked_rem(gs).unwrap_or(0), 0, "group norm backward: the op checks the shapes");
    // SAFETY: with `numel > 0` (else `dx` is empty) `dx` is whole groups of `gs` values and each
    // group task writes every value of its group; `pg` and `pb` are zeroed.
    let mut dx = unsafe { uninit_output(if want.x { numel } else { 0 }) };
    // Per (batch, channel) partial sums of dz·x̂ and dz (dz = gradient before the affine).
    let bc = numel.checked_div(gd.s).unwrap_or(0);
    let mut pg = vec![0f64; bc];
    let mut pb = vec![0f64; bc];
    if numel > 0 && gd.s > 0 {
        let (xs, dys, gm, bt) = (inp.x, inp.dy, inp.gamma, inp.beta);
        let task = |i: usize, dxg: &mut [f32], pgg: &mut [f64], pbg: &mut [f64]| {
            let g = i % gd.groups;
            let xg = &xs[i * gs..(i + 1) * gs];
            let dyg = &dys[i * gs..(i + 1) * gs];
            let (mean, rstd) = (inp.stats[2 * i], inp.stats[2 * i + 1]);
            let dz_at = |c: usize, xv: f32, d: f32| -> (f32, f32) {
                let xh = (xv - mean) * rstd;
                if silu {
                    let z = xh * gm[c] + bt[c];
                    let sg = sigmoid(z);
                    (xh, d * sg * (1.0 + z * (1.0 - sg)))
                } else {
                    (xh, d)
                }
            };
            let (mut sum_a, mut sum_b) = (0f64, 0f64);
            for j in 0..cg {
                let c = g * cg + j;
                let (mut sg_, mut sb_) = (0f64, 0f64);
                for t in j * gd.s..(j + 1) * gd.s {
                    let (xh, dz) = dz_at(c, xg[t], dyg[t]);
                    sg_ += (dz * xh) as f64;
                    sb_ += dz as f64;
                }
                pgg[j] = sg_;
                pbg[j] = sb_;
                sum_a += gm[c] as f64 * sb_;
                sum_b += gm[c] as f64 * sg_;
            }
            if dxg.is_empty() {
                return;
            }
            // dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)), dx̂ = dz · γ.
            let n = gs as f64;
            let (ma, mb) = ((sum_a / n) as f32, (sum_b / n) as f32);
            for j in 0..cg {
                let c = g * cg + j;
                for t in j * gd.s..(j + 1) * gd.s {
                    let (xh, dz) = dz_at(c, xg[t], dyg[t]);
                    dxg[t] = rstd * (dz * gm[c] - ma - xh * mb);
                }
            }
        };
        if want.x {
            dx.par_chunks_mut(gs)
                .zip(pg.par_chunks_mut(cg))
                .zip(pb.par_chunks_mut(cg))
                .enumerate()
                .for_each(|(i, ((d, a), b))| task(i, d, a, b));
        } else {
            pg.par_chunks_mut(cg)
                .zip(pb.par_chunks_mut(cg))
                .enumerate()
                .take(numel / gs)
                .for_each(|(i, (a, b))| task(i, &mut [], a, b));
        }
    }
    Grads { x: dx, gamma: want.gamma.then(|| reduce(&pg, gd.c)), beta: want.beta.then(|| reduce(&pb, gd.c)) }
}

/// Layer norm forward over rows of `d`: returns `(y, stats)`, stats holding `(mean, rstd)` per row.
pub fn layer_norm_forward(
    d: usize,
    eps: f64,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len().checked_rem(d), Some(0), "layer norm: the op checks the shapes");
    // SAFETY: `x` is whole rows of `d`; each row task writes its row of `y` and its two stats.
    let mut y = unsafe { uninit_output(x.len()) };
    let mut stats = unsafe { uninit_output(2 * x.len() / d) };
    y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(stats.par_chunks_mut(2)).for_each(|((yr, xr), st)| {
        let (mean, rstd) = mean_rstd(xr, eps);
        st.copy_from_slice(&[mean, rstd]);
        for ((yv, &xv), (g, b)) in yr.iter_mut().zip(xr).zip(gamma.iter().zip(beta.iter())) {
            *yv = (xv - mean) * rstd * g + b;
        }
    });
    (y, stats)
}

/// Layer norm backward over rows of `d`.
pub fn layer_norm_backward(d: usize, inp: &NormInputs<'_>, want: Want) -> Grads {
    let numel = inp.x.len();
    let rows = numel / d;
    let chunks = rows.div_ceil(LN_ROWS);
    assert_eq!(numel % d, 0, "layer norm backward: the op checks the shapes");
    // SAFETY: `dx` is whole rows of `d`; each chunk task writes every value of its rows.
    let mut dx = unsafe { uninit_output(if want.x { numel } else { 0 }) };
    // Per row-chunk partial sums of dy·x̂ and dy, then added in chunk order.
    let mut pg = vec![0f64; chunks * d];
    let mut pb = vec![0f64; chunks * d];
    let (xs, dys, gm) = (inp.x, inp.dy, inp.gamma);
    let task = |ci: usize, dxc: &mut [f32], pgc: &mut [f64], pbc: &mut [f64]| {
        let r1 = ((ci + 1) * LN_ROWS).min(rows);
        for r in ci * LN_ROWS..r1 {
            let xr = &xs[r * d..(r + 1) * d];
            let dyr = &dys[r * d..(r + 1) * d];
            let (mean, rstd) = (inp.stats[2 * r], inp.stats[2 * r + 1]);
            let (mut sa, mut sb) = (0f64, 0f64);
            for t in 0..d {
                let xh = (xr[t] - mean) * rstd;
                pgc[t] += (dyr[t] * xh) as f64;
                pbc[t] += dyr[t] as f64;
                let dxh = dyr[t] * gm[t];
                sa += dxh as f64;
                sb += (dxh * xh) as f64;
            }
            if dxc.is_empty() {
                continue;
            }
            let (ma, mb) = ((sa / d as f64) as f32, (sb / d as f64) as f32);
            let dxr = &mut dxc[(r - ci * LN_ROWS) * d..(r - ci * LN_ROWS + 1) * d];
            for t in 0..d {
                let xh = (xr[t] - mean) * rstd;
                dxr[t] = rstd * (dyr[t] * gm[t] - ma - xh * mb);
            }
        }
    };
    if want.x {
        dx.par_chunks_mut(LN_ROWS * d)
            .zip(pg.par_chunks_mut(d))
            .zip(pb.par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, ((a, b), c))| task(i, a, b, c));
    } else {
        pg.par_chunks_mut(d)
            .zip(pb.par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, (b, c))| task(i, &mut [], b, c));
    }
    Grads { x: dx, gamma: want.gamma.then(|| reduce(&pg, d)), beta: want.beta.then(|| reduce(&pb, d)) }
}

/// Adds per-chunk partial sums of `width` values each in chunk order (so the result does not
/// depend on thread scheduling) and rounds once to f32.
fn reduce(partials: &[f64], width: usize) -> Vec<f32> {
    let mut sum = vec![0f64; width];
    for chunk in partials.chunks(width) {
        for (o, v) in sum.iter_mut().zip(chunk) {
            *o += v;
        }
    }
    sum.into_iter().map(|v| v as f32).collect()
}
