//! The residual addition `a + b` of two tensors of one shape, on rayon's threads.
//!
//! candle 0.11 runs its element-wise `add` on a thread pool of its own (see [`crate::threads`]):
//! the calling thread takes a share and waits at a barrier for a worker that has usually parked
//! since the previous op, while the GEMM threads sit idle; in the SD1.5 fp32 step those waits
//! were the largest share of the main thread's remaining samples (perf, 2 threads). Here the
//! addition is one pass in fixed chunks on rayon's pool. Same values: the forward adds the same
//! two numbers; the backward hands the output gradient itself to both inputs, as candle's `Add`
//! backward does (no copy). Other dtypes, strided operands and devices without kernels of this
//! crate use candle's `add`.

use crate::alloc::uninit_output;
use crate::backend;
use crate::cpu::storage_f32;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// `a + b` for tensors of the same shape (a residual connection).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ours = backend::has_kernels(a.device())
        && a.device().same_device(b.device())
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims() == b.dims()
        && a.is_contiguous()
        && b.is_contiguous();
    if ours {
        a.apply_op2(b, ResidualAdd)
    } else {
        a + b
    }
}

struct ResidualAdd;

impl CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "sdbooth-residual-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !matches!((s1, s2), (CpuStorage::F32(_), CpuStorage::F32(_))) {
            bail!("{}: the CPU kernel takes f32, got {:?} and {:?}", self.name(), s1.dtype(), s2.dtype());
        }
        backend::expect_dims(self.name(), "second operand", l2.dims(), l1.dims())?;
        let (a, b) = (storage_f32(s1, l1)?, storage_f32(s2, l2)?);
        // SAFETY: `y`, `a` and `b` have the same length: the zipped chunks cover every element.
        let mut y = unsafe { uninit_output(a.len()) };
        y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(y, (a, b))| {
            for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                *y = a + b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((a.track_op().then(|| dy.clone()), b.track_op().then(|| dy.clone())))
    }
}
