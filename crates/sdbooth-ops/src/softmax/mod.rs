//! Softmax over the last dimension: the contract and its candle custom ops. Forward is
//! [`SoftmaxOp`]; its backward, [`SoftmaxBackward`], needs only the forward's output.

pub(crate) mod cpu;

use crate::backend::{self, expect_dims};
use crate::cpu::{storage_f32, storage_from_f32};
use crate::reference;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Numerically stable softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if backend::has_kernels(x.device()) {
        x.contiguous()?.apply_op1(SoftmaxOp)
    } else {
        reference::softmax_last_dim(x)
    }
}

fn last_dim(op: &str, dims: &[usize]) -> Result<usize> {
    match dims.last() {
        Some(&d) => Ok(d),
        None => bail!("{op}: scalar input"),
    }
}

/// Forward `x -> y`.
pub(crate) struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "sdbooth-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim("softmax", l.dims())?;
        let y = cpu::forward(d, &storage_f32(s, l)?);
        Ok((storage_from_f32(y, s.dtype())?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        if !backend::has_kernels(dy.device()) {
            let [dx, _, _] =
                backend::reference_vjp(&[(x, true)], dy, |t| reference::softmax_last_dim(&t[0]))?;
            return Ok(dx);
        }
        y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBackward).map(Some)
    }
}

/// Backward `(y, dy) -> dx = y ∘ (dy − Σ dy·y)`.
pub(crate) struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "sdbooth-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        expect_dims(self.name(), "output gradient", l2.dims(), l1.dims())?;
        let d = last_dim(self.name(), l1.dims())?;
        let dx = cpu::backward(d, &storage_f32(s1, l1)?, &storage_f32(s2, l2)?);
        Ok((storage_from_f32(dx, s1.dtype())?, l1.shape().clone()))
    }
}
