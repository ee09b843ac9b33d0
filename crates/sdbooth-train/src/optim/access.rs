//! In-place access to the f32/bf16 storage of CPU tensors, for the host kernels.
//!
//! candle keeps a tensor's storage behind a lock and gives write access only through its
//! `InplaceOp*` traits, so the optimizer wraps its update closure in an `InplaceOp1`: the weights
//! are updated where they live, with no model-size temporaries. Gradients are read through the
//! public `storage_and_layout` read guard. Tensors on other devices never come here: the
//! tensor-operation optimizers (`optim/device/`) update them on their device.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};
use half::bf16;
use rayon::prelude::*;

use crate::error::{Result, TrainError};

/// The mutable contents of one weight tensor.
pub enum WeightsMut<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
}

struct ApplyMut<F> {
    f: RefCell<Option<F>>,
    result: RefCell<Option<Result<()>>>,
}

impl<F: FnOnce(WeightsMut<'_>) -> Result<()>> InplaceOp1 for ApplyMut<F> {
    fn name(&self) -> &'static str {
        "sdbooth-optimizer-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some(f) = self.f.borrow_mut().take() else {
            return Ok(());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            *self.result.borrow_mut() =
                Some(Err(TrainError::Internal("weight tensor is not contiguous".into())));
            return Ok(());
        };
        let r = match storage {
            CpuStorage::F32(v) => f(WeightsMut::F32(&mut v[start..end])),
            CpuStorage::BF16(v) => f(WeightsMut::BF16(&mut v[start..end])),
            other => Err(TrainError::Internal(format!(
                "weights of dtype {:?} cannot be trained (f32 or bf16 only)",
                other.dtype()
            ))),
        };
        *self.result.borrow_mut() = Some(r);
        Ok(())
    }
}

/// The error for a tensor the host kernels were handed although it is not in host memory.
fn not_on_cpu(t: &Tensor) -> TrainError {
    TrainError::Internal(format!("host optimizer kernels given a tensor on {:?}", t.device().location()))
}

/// Runs `f` on the contents of `var` (a CPU tensor), in place.
pub fn with_weights_mut(var: &Var, f: impl FnOnce(WeightsMut<'_>) -> Result<()>) -> Result<()> {
    let t = var.as_tensor();
    if !t.device().is_cpu() {
        return Err(not_on_cpu(t));
    }
    let op = ApplyMut { f: RefCell::new(Some(f)), result: RefCell::new(None) };
    t.inplace_op1(&op)?;
    op.result
        .into_inner()
        .unwrap_or_else(|| Err(TrainError::Internal("the optimizer update did not run".into())))
}

/// A gradient's values as the host kernels read them: in place when f32 or bf16.
#[derive(Clone, Copy)]
pub enum GradRef<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
}

impl GradRef<'_> {
    pub fn len(&self) -> usize {
        match self {
            GradRef::F32(g) => g.len(),
            GradRef::BF16(g) => g.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on the values as f32: borrowed, or bf16 widened (exactly) in parallel.
    pub fn with_f32<R>(self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            GradRef::F32(g) => f(g),
            GradRef::BF16(g) => f(&g.par_iter().map(|x| x.to_f32()).collect::<Vec<f32>>()),
        }
    }
}

/// Runs `f` on the contents of `t` (a CPU tensor) in place when they are contiguous f32 or bf16
/// (`--full_bf16`'s gradients: the 8-bit update widens them chunk by chunk, in parallel, where
/// [`with_f32`] would widen the whole tensor on the calling thread); as [`with_f32`] otherwise.
pub fn with_grad<R>(t: &Tensor, f: impl FnOnce(GradRef<'_>) -> R) -> Result<R> {
    if !t.device().is_cpu() {
        return Err(not_on_cpu(t));
    }
    let mut f = Some(f);
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((s, e))) = (&*storage, layout.contiguous_offsets()) {
            let view = match cpu {
                CpuStorage::F32(v) => Some(GradRef::F32(&v[s..e])),
                CpuStorage::BF16(v) => Some(GradRef::BF16(&v[s..e])),
                _ => None,
            };
            if let (Some(view), Some(f)) = (view, f.take()) {
                return Ok(f(view));
            }
        }
    }
    let f = f.ok_or_else(|| TrainError::Internal("gradient reader ran twice".into()))?;
    with_f32(t, |g| f(GradRef::F32(g)))
}

/// Runs `f` on the contents of `t` (a CPU tensor) as f32; borrows the storage when it is f32,
/// converts (one tensor's worth) otherwise.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if !t.device().is_cpu() {
        return Err(not_on_cpu(t));
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((s, e))) = (&*storage, layout.contiguous_offsets()) {
            // bf16/f16 widen exactly: one f32 copy made here instead of candle's cast and then
            // `to_vec1`'s copy of it (two model-tensor-size temporaries).
            let widened: Option<Vec<f32>> = match cpu {
                CpuStorage::F32(v) => return Ok(f(&v[s..e])),
                CpuStorage::BF16(v) => Some(v[s..e].iter().map(|x| x.to_f32()).collect()),
                CpuStorage::F16(v) => Some(v[s..e].iter().map(|x| x.to_f32()).collect()),
                _ => None,
            };
            if let Some(widened) = widened {
                drop(storage);
                return Ok(f(&widened));
            }
        }
    }
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&v))
}
