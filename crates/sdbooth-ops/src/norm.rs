//! group_norm (optionally fused with SiLU), layer_norm and softmax as CPU custom ops.
//!
//! Nothing is saved for backward: mean and 1/std are recomputed from the input, which costs one
//! extra read of x and keeps the graph free of per-op statistics tensors. Statistics accumulate
//! in f64 within one group/row. Parameter gradients are summed per fixed chunk (one (batch,
//! group) or a fixed block of rows) and the chunk partials are added in index order, so results
//! do not depend on rayon's scheduling.

use crate::cpu;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
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

/// `[B, C, ...]` geometry of a group norm.
#[derive(Clone, Copy)]
struct GnDims {
    c: usize,
    groups: usize,
    /// Elements per channel (H·W).
    s: usize,
}

fn gn_dims(x: &[usize], groups: usize, gamma: &[usize], beta: &[usize]) -> Result<GnDims> {
    if x.len() < 2 {
        bail!("group_norm: input must be [B, C, ...], got {x:?}");
    }
    let c = x[1];
    // `% != 0` rather than `is_multiple_of`: the workspace's rust-version is 1.80.
    #[allow(clippy::manual_is_multiple_of)]
    let uneven = groups == 0 || c % groups != 0;
    if uneven {
        bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    if gamma.iter().product::<usize>() != c || beta.iter().product::<usize>() != c {
        bail!("group_norm: gamma {gamma:?} / beta {beta:?} must hold {c} values");
    }
    Ok(GnDims { c, groups, s: x[2..].iter().product() })
}

pub(crate) struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu {
            "sdbooth-group-norm-silu"
        } else {
            "sdbooth-group-norm"
        }
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
        let gd = gn_dims(l1.dims(), self.groups, l2.dims(), l3.dims())?;
        let (x, gamma, beta) =
            (cpu::storage_f32(s1, l1)?, cpu::storage_f32(s2, l2)?, cpu::storage_f32(s3, l3)?);
        let cg = gd.c / gd.groups;
        let mut y = vec![0f32; x.len()];
        if !x.is_empty() && gd.s > 0 {
            y.par_chunks_mut(cg * gd.s).zip(x.par_chunks(cg * gd.s)).enumerate().for_each(|(i, (yg, xg))| {
                let g = i % gd.groups;
                let (mean, rstd) = mean_rstd(xg, self.eps);
                for j in 0..cg {
                    let c = g * cg + j;
                    let (a, b) = (rstd * gamma[c], beta[c] - mean * rstd * gamma[c]);
                    for (yv, &xv) in
                        yg[j * gd.s..(j + 1) * gd.s].iter_mut().zip(&xg[j * gd.s..(j + 1) * gd.s])
                    {
                        let z = xv * a + b;
                        *yv = if self.silu { z * sigmoid(z) } else { z };
                    }
                }
            });
        }
        Ok((cpu::storage_from_f32(y, s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_g, want_b) = (x.track_op(), gamma.track_op(), beta.track_op());
        if !(want_x || want_g || want_b) {
            return Ok((None, None, None));
        }
        let gd = gn_dims(x.dims(), self.groups, gamma.dims(), beta.dims())?;
        let cg = gd.c / gd.groups;
        let gs = cg * gd.s;
        let numel = x.elem_count();
        let mut dx = vec![0f32; if want_x { numel } else { 0 }];
        // Per (batch, channel) partial sums of dz·x̂ and dz (dz = gradient before the affine).
        let bc = numel.checked_div(gd.s).unwrap_or(0);
        let mut pg = vec![0f64; bc];
        let mut pb = vec![0f64; bc];
        cpu::with_f32(x, |xs| {
            cpu::with_f32(gamma, |gm| {
                cpu::with_f32(beta, |bt| {
                    cpu::with_f32(dy, |dys| {
                        if numel == 0 || gd.s == 0 {
                            return Ok(());
                        }
                        let task = |i: usize, dxg: &mut [f32], pgg: &mut [f64], pbg: &mut [f64]| {
                            let g = i % gd.groups;
                            let xg = &xs[i * gs..(i + 1) * gs];
                            let dyg = &dys[i * gs..(i + 1) * gs];
                            let (mean, rstd) = mean_rstd(xg, self.eps);
                            let dz_at = |c: usize, xv: f32, d: f32| -> (f32, f32) {
                                let xh = (xv - mean) * rstd;
                                if self.silu {
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
                        let groups_total = numel / gs;
                        if want_x {
                            dx.par_chunks_mut(gs)
                                .zip(pg.par_chunks_mut(cg))
                                .zip(pb.par_chunks_mut(cg))
                                .enumerate()
                                .for_each(|(i, ((d, a), b))| task(i, d, a, b));
                        } else {
                            pg.par_chunks_mut(cg)
                                .zip(pb.par_chunks_mut(cg))
                                .enumerate()
                                .take(groups_total)
                                .for_each(|(i, (a, b))| task(i, &mut [], a, b));
                        }
                        Ok(())
                    })
                })
            })
        })?;
        norm_grads(dx, &pg, &pb, gd.c, (x, gamma, beta), (want_x, want_g, want_b))
    }
}

pub(crate) struct LayerNormOp {
    pub eps: f64,
}

fn ln_dims(x: &[usize], gamma: &[usize], beta: &[usize]) -> Result<usize> {
    let Some(&d) = x.last() else { bail!("layer_norm: scalar input") };
    if gamma.iter().product::<usize>() != d || beta.iter().product::<usize>() != d || d == 0 {
        bail!("layer_norm: gamma {gamma:?} / beta {beta:?} must hold the last dim {d} of {x:?}");
    }
    Ok(d)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sdbooth-layer-norm"
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
        let d = ln_dims(l1.dims(), l2.dims(), l3.dims())?;
        let (x, gamma, beta) =
            (cpu::storage_f32(s1, l1)?, cpu::storage_f32(s2, l2)?, cpu::storage_f32(s3, l3)?);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
            let (mean, rstd) = mean_rstd(xr, self.eps);
            for ((yv, &xv), (g, b)) in yr.iter_mut().zip(xr).zip(gamma.iter().zip(beta.iter())) {
                *yv = (xv - mean) * rstd * g + b;
            }
        });
        Ok((cpu::storage_from_f32(y, s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_g, want_b) = (x.track_op(), gamma.track_op(), beta.track_op());
        if !(want_x || want_g || want_b) {
            return Ok((None, None, None));
        }
        let d = ln_dims(x.dims(), gamma.dims(), beta.dims())?;
        let numel = x.elem_count();
        let rows = numel / d;
        let chunks = rows.div_ceil(LN_ROWS);
        let mut dx = vec![0f32; if want_x { numel } else { 0 }];
        // Per row-chunk partial sums of dy·x̂ and dy, then added in chunk order.
        let mut pg = vec![0f64; chunks * d];
        let mut pb = vec![0f64; chunks * d];
        cpu::with_f32(x, |xs| {
            cpu::with_f32(gamma, |gm| {
                cpu::with_f32(dy, |dys| {
                    let task = |ci: usize, dxc: &mut [f32], pgc: &mut [f64], pbc: &mut [f64]| {
                        let r1 = ((ci + 1) * LN_ROWS).min(rows);
                        for r in ci * LN_ROWS..r1 {
                            let xr = &xs[r * d..(r + 1) * d];
                            let dyr = &dys[r * d..(r + 1) * d];
                            let (mean, rstd) = mean_rstd(xr, self.eps);
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
                    if want_x {
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
                    Ok(())
                })
            })
        })?;
        norm_grads(dx, &pg, &pb, d, (x, gamma, beta), (want_x, want_g, want_b))
    }
}

/// Softmax over the last dimension; backward uses the saved output: dx = y ∘ (dy − Σ dy·y).
pub(crate) struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "sdbooth-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(&d) = l.dims().last() else { bail!("softmax: scalar input") };
        let x = cpu::storage_f32(s, l)?;
        let mut y = vec![0f32; x.len()];
        if d > 0 {
            y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
                let mx = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                yr.copy_from_slice(xr);
                // A row of all -inf yields zeros rather than NaN.
                let sum = if mx == f32::NEG_INFINITY { 0.0 } else { cpu::exp_sub_sum(yr, mx) };
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                yr.iter_mut().for_each(|v| *v *= inv);
            });
        }
        Ok((cpu::storage_from_f32(y, s.dtype())?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let d = x.dim(candle_core::D::Minus1)?;
        let mut dx = vec![0f32; x.elem_count()];
        cpu::with_f32(y, |ys| {
            cpu::with_f32(dy, |dys| {
                if d > 0 {
                    dx.par_chunks_mut(d).zip(ys.par_chunks(d).zip(dys.par_chunks(d))).for_each(
                        |(dxr, (yr, dyr))| {
                            let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                            for ((o, &yv), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
                                *o = yv * (g - dot);
                            }
                        },
                    );
                }
                Ok(())
            })
        })?;
        Ok(Some(cpu::tensor_from_f32(dx, x.shape().clone(), x.dtype())?))
    }
}

type NormGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The gradients of a normalisation op as tensors in their operands' dtypes. The scale and shift
/// gradients arrive as per-chunk partial sums of `width` values each (`pg`, `pb`); they are
/// added in chunk order, so the result does not depend on thread scheduling.
fn norm_grads(
    dx: Vec<f32>,
    pg: &[f64],
    pb: &[f64],
    width: usize,
    (x, gamma, beta): (&Tensor, &Tensor, &Tensor),
    (want_x, want_g, want_b): (bool, bool, bool),
) -> Result<NormGrads> {
    let reduce = |p: &[f64]| -> Vec<f32> {
        let mut out = vec![0f64; width];
        for chunk in p.chunks(width) {
            for (o, v) in out.iter_mut().zip(chunk) {
                *o += v;
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    };
    let to_tensor = |want: bool, values: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
        if want {
            Ok(Some(cpu::tensor_from_f32(values, like.shape().clone(), like.dtype())?))
        } else {
            Ok(None)
        }
    };
    Ok((
        to_tensor(want_x, dx, x)?,
        to_tensor(want_g, if want_g { reduce(pg) } else { Vec::new() }, gamma)?,
        to_tensor(want_b, if want_b { reduce(pb) } else { Vec::new() }, beta)?,
    ))
}
