//! AdamW, Lion and SGD with Nesterov momentum as tensor operations: each line is the f32
//! expression of the host kernel of the same name (`optim/adamw.rs`, `lion.rs`, `sgd.rs`), in the
//! same order. Each takes the flattened f32 weights and (scaled) gradient and returns the new
//! weights; its state buffers are replaced in `st`.

use candle_core::{DType, Tensor};

use super::{add, div, mul, put, take};
use crate::error::Result;
use crate::optim::{OptimizerConfig, ParamState};

/// torch.optim.AdamW (single-tensor path), as `optim/adamw.rs`.
pub(super) fn adamw(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &Tensor,
    g: &Tensor,
    lr: f64,
) -> Result<Tensor> {
    let (n, dev) = (w.elem_count(), w.device());
    let m = take(st, "exp_avg", DType::F32, n, dev)?;
    let v = take(st, "exp_avg_sq", DType::F32, n, dev)?;
    let (b1, b2) = c.betas;
    let t = st.step as i32;
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let w1 = (1.0 - b1) as f32;
    let w2 = (1.0 - b2) as f32;
    let bc1 = 1.0 - b1.powi(t);
    let bc2_sqrt = ((1.0 - b2.powi(t)).sqrt()) as f32;
    let neg_step = (-(lr / bc1)) as f32;
    // torch's lerp: m + w1 * (g - m) for a weight below 0.5, else g - (g - m) * (1 - w1).
    let m = if w1 < 0.5 { (&m + mul(&(g - &m)?, w1)?)? } else { (g - mul(&(g - &m)?, 1.0 - w1)?)? };
    let v = (mul(&v, b2 as f32)? + mul(g, w2)?.mul(g)?)?;
    let denom = add(&div(&v.sqrt()?, bc2_sqrt)?, c.eps as f32)?;
    let new_w = (mul(w, decay)? + mul(&(&m / denom)?, neg_step)?)?;
    put(st, "exp_avg", m);
    put(st, "exp_avg_sq", v);
    Ok(new_w)
}

/// lion-pytorch's update_fn, as `optim/lion.rs` (torch.sgn: 0 stays 0, as candle's `sign`).
pub(super) fn lion(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &Tensor,
    g: &Tensor,
    lr: f64,
) -> Result<Tensor> {
    let m = take(st, "exp_avg", DType::F32, w.elem_count(), w.device())?;
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let (b1, b2) = (c.betas.0 as f32, c.betas.1 as f32);
    let (w1, w2) = ((1.0 - c.betas.0) as f32, (1.0 - c.betas.1) as f32);
    let u = (mul(&m, b1)? + mul(g, w1)?)?;
    let new_w = (mul(w, decay)? + mul(&u.sign()?, (-lr) as f32)?)?;
    put(st, "exp_avg", (mul(&m, b2)? + mul(g, w2)?)?);
    Ok(new_w)
}

/// torch.optim.SGD(nesterov=True, dampening=0), as `optim/sgd.rs`: the first step takes the
/// gradient itself as the momentum buffer.
pub(super) fn sgd_nesterov(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &Tensor,
    g: &Tensor,
    lr: f64,
) -> Result<Tensor> {
    let first = !st.bufs.contains_key("momentum_buffer");
    let buf = take(st, "momentum_buffer", DType::F32, w.elem_count(), w.device())?;
    let mu = c.momentum as f32;
    let wd = c.weight_decay as f32;
    let d = if wd != 0.0 { (g + mul(w, wd)?)? } else { g.clone() };
    let buf = if first { d.clone() } else { (mul(&buf, mu)? + &d)? };
    let new_w = (w + mul(&(&d + mul(&buf, mu)?)?, (-lr) as f32)?)?;
    put(st, "momentum_buffer", buf);
    Ok(new_w)
}
