//! dtype conversion between f32 and bf16 with a multi-threaded CPU kernel.
//!
//! `--mixed_precision bf16` casts every f32 master weight to bf16 each time a block runs (forward,
//! and again in the recomputed forward with gradient checkpointing) and casts each weight
//! gradient back to f32: about a billion elements per step for SD1.5. candle's CPU `to_dtype`
//! converts on one thread; this op converts in fixed chunks on rayon's threads (per element, so
//! the result is candle's exactly: round to nearest even).

use crate::backend;
use crate::bf16_gemm::widen;
use crate::cpu::{narrow_bf16, storage_bf16, storage_f32};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `x` in `dtype`, differentiable (the gradient is cast back to `x`'s dtype). Conversions other
/// than f32 ↔ bf16, and devices without kernels of this crate, use candle's `to_dtype`.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let supported = matches!((x.dtype(), dtype), (DType::F32, DType::BF16) | (DType::BF16, DType::F32));
    if !supported || !backend::has_kernels(x.device()) {
        return x.to_dtype(dtype);
    }
    x.contiguous()?.apply_op1(Cast { to: dtype })
}

struct Cast {
    to: DType,
}

impl CustomOp1 for Cast {
    fn name(&self) -> &'static str {
        "sdbooth-cast"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (storage_bf16(s, l)?, self.to) {
            (Some(v), DType::F32) => CpuStorage::F32(widen(v)),
            (None, DType::BF16) => CpuStorage::BF16(narrow_bf16(&storage_f32(s, l)?)),
            (_, to) => bail!("sdbooth-cast: no CPU kernel to {to:?} for this operand"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        if grad.dtype() == arg.dtype() {
            return Ok(Some(grad));
        }
        Ok(Some(grad.apply_op1_no_bwd(&Cast { to: arg.dtype() })?))
    }
}
