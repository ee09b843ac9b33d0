//! Copies of strided (transposed, permuted, narrowed) tensors into contiguous memory, on rayon's
//! threads. candle 0.11's CPU `contiguous()` copies on one thread; the attention layers copy
//! q, k, v and the output between `[B, tokens, heads, d]` and `[B, heads, tokens, d]` at every
//! attention of the forward and of the checkpointing recompute.
//!
//! The output is split into fixed chunks of rows (a row: the last dimension); a copy moves
//! values unchanged, so results never depend on the split. Backward hands the gradient through
//! unchanged, as candle's copy does.

use crate::alloc::{uninit_output, Plain};
use crate::backend;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x` in contiguous memory (a no-op when it already is), differentiable.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    let copyable = matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16 | DType::F64);
    if x.is_contiguous() || !copyable || !backend::has_kernels(x.device()) || x.rank() == 0 {
        return x.contiguous();
    }
    x.apply_op1(StridedCopy)
}

/// Elements per rayon task (whole rows, at least one).
const CHUNK: usize = 1 << 14;

/// The values of the strided view `l` of `src`, in row-major order.
fn copy<T: Plain>(src: &[T], l: &Layout) -> Vec<T> {
    let dims = l.dims();
    let strides = l.stride();
    let rank = dims.len();
    let (width, inner_stride) = (dims[rank - 1], strides[rank - 1]);
    let n = l.shape().elem_count();
    if n == 0 {
        return Vec::new();
    }
    // SAFETY: `out` is whole rows of `width`; the tasks' chunks are whole rows and every row is
    // written (copied or gathered) in full.
    let mut out = unsafe { uninit_output(n) };
    let rows_per_task = (CHUNK / width).max(1);
    out.par_chunks_mut(rows_per_task * width).enumerate().for_each(|(task, dst)| {
        for (i, row) in dst.chunks_exact_mut(width).enumerate() {
            // The source offset of this row: its multi-index over the outer dimensions.
            let mut r = task * rows_per_task + i;
            let mut offset = l.start_offset();
            for d in (0..rank - 1).rev() {
                offset += (r % dims[d]) * strides[d];
                r /= dims[d];
            }
            if inner_stride == 1 {
                row.copy_from_slice(&src[offset..offset + width]);
            } else {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = src[offset + j * inner_stride];
                }
            }
        }
    });
    out
}

struct StridedCopy;

impl CustomOp1 for StridedCopy {
    fn name(&self) -> &'static str {
        "sdbooth-contiguous"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(copy(v, l)),
            CpuStorage::BF16(v) => CpuStorage::BF16(copy(v, l)),
            CpuStorage::F16(v) => CpuStorage::F16(copy(v, l)),
            CpuStorage::F64(v) => CpuStorage::F64(copy(v, l)),
            _ => bail!("sdbooth-contiguous: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.clone()))
    }
}
