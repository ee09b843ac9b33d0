//! Adafactor as tensor operations, the algorithm and f32/f64 arithmetic of `optim/adafactor.rs`
//! (sums in f64, as there). The RMS of the weights comes back to the host as one scalar: the
//! step size derived from it is logged.

use candle_core::{DType, Tensor};

use super::{div, mul, put, scalar, take};
use crate::error::{Result, TrainError};
use crate::optim::adafactor::effective_lr;
use crate::optim::{OptimizerConfig, ParamState};

/// The root mean square of `x` (f64 sum of squares), as an f32 scalar tensor.
fn rms(x: &Tensor) -> Result<Tensor> {
    let ss = x.to_dtype(DType::F64)?.sqr()?.sum_all()?;
    div(&ss.sqrt()?.to_dtype(DType::F32)?, (x.elem_count() as f32).sqrt())
}

/// The f64 mean of `x` (f32) along `dim`, rounded to f32.
fn mean_f64(x: &Tensor, dim: usize) -> Result<Tensor> {
    let len = x.dim(dim)? as f64;
    let sum = x.to_dtype(DType::F64)?.sum(dim)?;
    Ok(sum.broadcast_div(&scalar(len, DType::F64, x.device())?)?.to_dtype(DType::F32)?)
}

pub(super) fn step(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &Tensor,
    g: &Tensor,
    shape: &[usize],
    lr: f64,
) -> Result<Tensor> {
    let (n, dev) = (w.elem_count(), w.device().clone());
    if shape.iter().product::<usize>() != n {
        return Err(TrainError::Internal(format!("Adafactor: shape {shape:?} does not match {n} elements")));
    }
    let lr_t = effective_lr(c, st.step, rms(w)?.to_scalar::<f32>()?, lr);
    st.last_lr = f64::from(lr_t);
    let beta2t = 1.0 - (st.step as f64).powf(c.decay_rate);
    let (b2, w2) = (beta2t as f32, (1.0 - beta2t) as f32);
    let eps1 = c.adafactor_eps.0 as f32;
    let sq = super::add(&g.sqr()?, eps1)?;
    let update = if shape.len() >= 2 {
        let cols = shape[shape.len() - 1];
        let rows = shape[shape.len() - 2];
        let batch = n / (rows * cols).max(1);
        let sq = sq.reshape((batch, rows, cols))?;
        let row = take(st, "exp_avg_sq_row", DType::F32, batch * rows, &dev)?.reshape((batch, rows))?;
        let col = take(st, "exp_avg_sq_col", DType::F32, batch * cols, &dev)?.reshape((batch, cols))?;
        let row = (mul(&row, b2)? + mul(&mean_f64(&sq, 2)?, w2)?)?;
        let col = (mul(&col, b2)? + mul(&mean_f64(&sq, 1)?, w2)?)?;
        let row_mean = mean_f64(&row, 1)?.reshape((batch, 1))?;
        let row_factor = row.broadcast_div(&row_mean)?.sqrt()?.recip()?.reshape((batch, rows, 1))?;
        let col_factor = col.sqrt()?.recip()?.reshape((batch, 1, cols))?;
        let factors = row_factor.broadcast_mul(&col_factor)?;
        let update = factors.mul(&g.reshape((batch, rows, cols))?)?.flatten_all()?;
        put(st, "exp_avg_sq_row", row.flatten_all()?);
        put(st, "exp_avg_sq_col", col.flatten_all()?);
        update
    } else {
        let v = take(st, "exp_avg_sq", DType::F32, n, &dev)?;
        let v = (mul(&v, b2)? + mul(&sq, w2)?)?;
        let update = v.sqrt()?.recip()?.mul(g)?;
        put(st, "exp_avg_sq", v);
        update
    };
    let one = scalar(1.0, DType::F32, &dev)?;
    let denom = div(&rms(&update)?, c.clip_threshold as f32)?.broadcast_maximum(&one)?;
    let mut update = mul(&update.broadcast_div(&denom)?, lr_t)?;
    if let Some(beta1) = c.beta1 {
        let m = take(st, "exp_avg", DType::F32, n, &dev)?;
        let m = (mul(&m, beta1 as f32)? + mul(&update, (1.0 - beta1) as f32)?)?;
        update = m.clone();
        put(st, "exp_avg", m);
    }
    let mut w = w.clone();
    if c.weight_decay != 0.0 {
        w = (&w + mul(&w, (-c.weight_decay as f32) * lr_t)?)?;
    }
    Ok((w - update)?)
}
