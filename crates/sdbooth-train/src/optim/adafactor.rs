//! Adafactor as transformers.optimization.Adafactor (factored second moment for tensors of rank 2
//! or more, relative step, parameter scaling, update clipping). kohya's defaults: relative_step=True,
//! scale_parameter=True, warmup_init=False, no first moment.
//!
//! Needs whole-tensor statistics (RMS of the weights and of the update, row/column means), so it
//! holds one tensor-sized update buffer while it runs: per tensor, never model-size.

use super::{OptimizerConfig, ParamState};
use crate::error::{Result, TrainError};

fn rms(x: &[f32]) -> f32 {
    // f64 accumulation: torch's vectorised f32 norm is close to exact; a naive f32 loop is not.
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    (ss.sqrt() as f32) / (x.len() as f32).sqrt()
}

/// The step size Adafactor uses for this parameter at this step (for logging as well).
pub(crate) fn effective_lr(c: &OptimizerConfig, step: u64, param_rms: f32, lr: f64) -> f32 {
    let mut rel = lr;
    if c.relative_step {
        let min_step = if c.warmup_init { 1e-6 * step as f64 } else { 1e-2 };
        rel = min_step.min(1.0 / (step as f64).sqrt());
    }
    if c.scale_parameter {
        // transformers multiplies the f32 RMS tensor by the Python float: f32 arithmetic.
        let scale = if (c.adafactor_eps.1 as f32) > param_rms { c.adafactor_eps.1 as f32 } else { param_rms };
        scale * rel as f32
    } else {
        rel as f32
    }
}

pub(crate) fn step(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &mut [f32],
    g: &[f32],
    gs: f32,
    shape: &[usize],
    lr: f64,
) -> Result<()> {
    let n = w.len();
    // Adafactor reads the gradient several times: scale a copy when clipping (it holds a
    // tensor-sized buffer anyway).
    let scaled;
    let g = if gs != 1.0 {
        scaled = g.iter().map(|&x| x * gs).collect::<Vec<f32>>();
        &scaled[..]
    } else {
        g
    };
    if shape.iter().product::<usize>() != n {
        return Err(TrainError::Internal(format!("Adafactor: shape {shape:?} does not match {n} elements")));
    }
    let lr_t = effective_lr(c, st.step, rms(w), lr);
    st.last_lr = f64::from(lr_t);
    let beta2t = 1.0 - (st.step as f64).powf(c.decay_rate);
    let (b2, w2) = (beta2t as f32, (1.0 - beta2t) as f32);
    let eps1 = c.adafactor_eps.0 as f32;
    let mut update: Vec<f32> = g.iter().map(|&x| x * x + eps1).collect();
    if shape.len() >= 2 {
        let cols = shape[shape.len() - 1];
        let rows = shape[shape.len() - 2];
        let batch = n / (rows * cols).max(1);
        let mut row = st.take_f32("exp_avg_sq_row", batch * rows)?;
        let mut col = st.take_f32("exp_avg_sq_col", batch * cols)?;
        for b in 0..batch {
            let blk = &update[b * rows * cols..(b + 1) * rows * cols];
            for r in 0..rows {
                let s: f64 = blk[r * cols..(r + 1) * cols].iter().map(|&x| f64::from(x)).sum();
                let mean = (s / cols as f64) as f32;
                let i = b * rows + r;
                row[i] = row[i] * b2 + w2 * mean;
            }
            // Column sums row by row (contiguous reads), not column by column.
            let mut sums = vec![0f64; cols];
            for r in 0..rows {
                for (s, &x) in sums.iter_mut().zip(&blk[r * cols..(r + 1) * cols]) {
                    *s += f64::from(x);
                }
            }
            for (cc, s) in sums.into_iter().enumerate() {
                let mean = (s / rows as f64) as f32;
                let i = b * cols + cc;
                col[i] = col[i] * b2 + w2 * mean;
            }
        }
        for b in 0..batch {
            let rrow = &row[b * rows..(b + 1) * rows];
            let row_mean = (rrow.iter().map(|&x| f64::from(x)).sum::<f64>() / rows as f64) as f32;
            let cfs: Vec<f32> = col[b * cols..(b + 1) * cols].iter().map(|&c| 1.0 / c.sqrt()).collect();
            for (r, &rv) in rrow.iter().enumerate() {
                let rf = 1.0 / (rv / row_mean).sqrt();
                let base = (b * rows + r) * cols;
                for ((u, &gi), &cf) in
                    update[base..base + cols].iter_mut().zip(&g[base..base + cols]).zip(&cfs)
                {
                    *u = rf * cf * gi;
                }
            }
        }
        st.put_f32("exp_avg_sq_row", row);
        st.put_f32("exp_avg_sq_col", col);
    } else {
        let mut v = st.take_f32("exp_avg_sq", n)?;
        for i in 0..n {
            v[i] = v[i] * b2 + w2 * update[i];
            update[i] = (1.0 / v[i].sqrt()) * g[i];
        }
        st.put_f32("exp_avg_sq", v);
    }
    let denom = (rms(&update) / c.clip_threshold as f32).max(1.0);
    for u in update.iter_mut() {
        *u = *u / denom * lr_t;
    }
    if let Some(beta1) = c.beta1 {
        let mut m = st.take_f32("exp_avg", n)?;
        let (b1, w1) = (beta1 as f32, (1.0 - beta1) as f32);
        for i in 0..n {
            m[i] = m[i] * b1 + w1 * update[i];
            update[i] = m[i];
        }
        st.put_f32("exp_avg", m);
    }
    let wd = (-c.weight_decay as f32) * lr_t;
    for i in 0..n {
        if c.weight_decay != 0.0 {
            w[i] += w[i] * wd;
        }
        w[i] -= update[i];
    }
    Ok(())
}
