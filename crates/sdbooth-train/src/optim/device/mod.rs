//! The optimizers as compositions of candle tensor operations: the update of a parameter whose
//! weights live on a device without this crate's host kernels (a GPU), and of every parameter
//! when `SDBOOTH_REFERENCE_OPS=1` sends the CPU down that path so it is tested here.
//!
//! State buffers are tensors on the parameter's device ([`StateBuf::Tensor`]), with the names,
//! lengths and dtypes of the host kernels' buffers, so a saved state has one layout whichever path
//! wrote it, and a state saved on one path resumes on the other (a host buffer read from a file is
//! moved to the device at its parameter's first step). Nothing comes back to the host during a
//! step except, for Adafactor, the scalar RMS of the weights (its step size is logged).
//!
//! Each update repeats its host kernel's f32 arithmetic operation by operation (same operands,
//! same order; a product by a scalar is `affine(s, -0.0)`, which keeps the sign of a zero as a
//! plain product does), so on the CPU the two paths give the same bits (the tests check it).
//! candle's CUDA kernels are built without fast-math and round each of these operations as IEEE
//! f32 does (`affine` contracts to a fused multiply-add whose addend is ±0, or whose factor is 1:
//! still one rounding), so the same bits are expected on a GPU, except where a reduction sums in
//! another order (Adafactor's f64 sums). Not yet measured on a GPU: `sdbooth selftest --device
//! cuda` compares every optimizer there with its CPU kernel (`optim/selftest.rs`).
//!
//! bf16 weights (`--full_bf16`) are updated in f32 and rounded back stochastically with a
//! counter-based stream computed on the device (`rounding.rs`).

mod adafactor;
mod adamw8bit;
mod chunks;
mod elementwise;
mod rounding;

use candle_core::{DType, Device, Tensor, Var};

use super::{OptimizerConfig, OptimizerKind, ParamState, StateBuf};
use crate::error::{Result, TrainError};

use rounding::stochastic_round_bf16_at;
pub use rounding::{key as rounding_key, stochastic_round_bf16};

/// Updates `param` from `grad` (multiplied by `grad_scale`) with learning rate `lr`, on the
/// parameter's device. `st.step` is already the number of this update.
pub(super) fn step(
    config: &OptimizerConfig,
    st: &mut ParamState,
    name: &str,
    param: &Var,
    grad: &Tensor,
    lr: f64,
    grad_scale: f32,
) -> Result<()> {
    let weights = param.as_tensor().detach();
    let dtype = weights.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(TrainError::param(
            name,
            format!("weights of dtype {dtype:?} cannot be trained (f32 or bf16 only)"),
        ));
    }
    let shape = weights.dims().to_vec();
    let weights = weights.flatten_all()?;
    let mut g = grad.detach().to_dtype(DType::F32)?.flatten_all()?;
    if g.device().location() != weights.device().location() {
        return Err(TrainError::param(name, "gradient and weights are on different devices"));
    }
    // The host kernels multiply every gradient value by the scale, 1.0 included: x * 1.0 is x.
    if grad_scale != 1.0 {
        g = mul(&g, grad_scale)?;
    }
    st.last_lr = lr;
    // bf16 weights: updated in f32 and rounded back, chunk by chunk like the update (the stream
    // is indexed by the value's position in the whole tensor, so the split does not matter).
    let key = rounding::key(config.rounding_seed, name, st.step);
    let store = |new_w: Tensor, offset: usize| match dtype {
        DType::BF16 => stochastic_round_bf16_at(&new_w, key, offset),
        _ => Ok(new_w),
    };
    let new_w = match config.kind {
        OptimizerKind::Adafactor => {
            store(adafactor::step(config, st, &weights.to_dtype(DType::F32)?, &g, &shape, lr)?, 0)?
        }
        kind => {
            // Decided for the whole tensor, not per chunk (bitsandbytes' threshold).
            let quantized = weights.elem_count() >= config.min_8bit_size;
            chunks::by_chunks(st, &weights, &g, |part, w, g, offset| {
                let w = w.to_dtype(DType::F32)?;
                let new_w = match kind {
                    OptimizerKind::AdamW => elementwise::adamw(config, part, &w, g, lr),
                    OptimizerKind::AdamW8bit => adamw8bit::step(config, part, &w, g, lr, quantized),
                    OptimizerKind::Lion => elementwise::lion(config, part, &w, g, lr),
                    OptimizerKind::SGDNesterov => elementwise::sgd_nesterov(config, part, &w, g, lr),
                    OptimizerKind::Adafactor => {
                        Err(TrainError::Internal("Adafactor is not elementwise".into()))
                    }
                }?;
                store(new_w, offset)
            })?
        }
    };
    param.set(&new_w.reshape(shape)?)?;
    Ok(())
}

/// `x * s` in f32 for every value of `x`, with the sign of a zero product kept (x * s + (-0.0)).
pub(super) fn mul(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(f64::from(s), -0.0)?)
}

/// `x + s` in f32 for every value of `x` (x * 1 + s: the product is exact).
pub(super) fn add(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(1.0, f64::from(s))?)
}

/// A scalar of `dtype` made on `device` (no host-to-device copy).
pub(super) fn scalar(v: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((), dtype, device)?.affine(0.0, v)?)
}

/// `x / s` with a true division (candle's `x / f64` multiplies by the reciprocal).
pub(super) fn div(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.broadcast_div(&scalar(f64::from(s), x.dtype(), x.device())?)?)
}

/// The state buffer `key` of `n` values of `dtype` on `device`: zeros when absent, moved to the
/// device when it was read from a file (or kept by the host kernels).
pub(super) fn take(
    st: &mut ParamState,
    key: &str,
    dtype: DType,
    n: usize,
    device: &Device,
) -> Result<Tensor> {
    let wrong = |what: String| super::mismatched_buffer(key, what);
    let t = match st.bufs.remove(key) {
        None => return Ok(Tensor::zeros(n, dtype, device)?),
        Some(StateBuf::Tensor(t)) => t.to_device(device)?,
        Some(StateBuf::F32(v)) => {
            let len = v.len();
            Tensor::from_vec(v, len, device)?
        }
        Some(StateBuf::U8(v)) => {
            let len = v.len();
            Tensor::from_vec(v, len, device)?
        }
    };
    if t.dtype() != dtype || t.elem_count() != n {
        return Err(wrong(format!("{:?} × {} where {dtype:?} × {n} is expected", t.dtype(), t.elem_count())));
    }
    Ok(t.flatten_all()?)
}

/// Stores a state buffer.
pub(super) fn put(st: &mut ParamState, key: &str, t: Tensor) {
    st.bufs.insert(key.to_string(), StateBuf::Tensor(t));
}
