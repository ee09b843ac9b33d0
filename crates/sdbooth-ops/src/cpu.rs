//! Shared plumbing for the CPU kernels: reading candle storage as f32, writing results back in
//! the caller's dtype, and the single GEMM entry point every kernel goes through.
//!
//! All kernels compute in f32. bf16/f16 operands are widened on entry and the result is rounded
//! once on exit, so accumulation is always f32.
//!
//! **AMX plug-in point.** Every matrix product of the conv2d and attention kernels calls
//! [`sgemm`]. A bf16 AMX kernel (Sapphire Rapids `tdpbf16ps`) would replace that function for
//! large enough shapes: pack the f32 operands to bf16 tiles (or take bf16 storage directly when
//! the caller's dtype is bf16) and accumulate in f32 tiles, keeping the strided-matrix contract
//! below unchanged so no kernel has to know.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};
use std::borrow::Cow;

/// Reads a CPU storage as a contiguous f32 slice, borrowing when it already is one.
pub(crate) fn storage_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        // Callers make operands contiguous before applying an op; this is a programming error
        // inside the crate, reported rather than panicking.
        bail!("sdbooth-ops: kernel operand is not contiguous (shape {:?})", l.shape())
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::BF16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F64(v) => Cow::Owned(v[start..end].iter().map(|&x| x as f32).collect()),
        other => bail!("sdbooth-ops: unsupported dtype {:?} for a float kernel", other.dtype()),
    })
}

/// Converts an f32 result into a storage of `dtype`.
pub(crate) fn storage_from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
        other => bail!("sdbooth-ops: unsupported output dtype {other:?}"),
    })
}

/// Contiguous f32 copy (or borrow, inside `f`) of a CPU tensor's data.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => {
            let data = storage_f32(s, layout)?;
            f(&data)
        }
        _ => bail!("sdbooth-ops: CPU kernel called with a non-CPU tensor"),
    }
}

/// Builds a CPU tensor of `dtype` from an f32 result.
pub(crate) fn tensor_from_f32(v: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(v, shape.into(), &candle_core::Device::Cpu)?;
    if dtype == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}

/// Parallelism for GEMMs issued from the calling thread (not from inside a rayon job).
pub(crate) fn par_threads() -> gemm::Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// A strided row-major view of an f32 matrix: element (i, j) is at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Mat { data, rs: row_stride, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `row_stride`.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Mat { data, rs: 1, cs: row_stride }
    }
    fn max_index(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * self.rs + (cols - 1) * self.cs
        }
    }
}

/// `dst[m×n] (row stride dst_rs) = (accumulate ? dst : 0) + a[m×k] · b[k×n]`.
///
/// gemm splits work over m and n only; each output element's k-sum is done by one thread in a
/// fixed order, so results do not depend on the thread count (tested in `tests/determinism.rs`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds are checked here once so the unsafe call below only reads/writes inside slices.
    assert!(m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(), "sgemm: dst too small");
    assert!(k == 0 || a.max_index(m, k) < a.data.len(), "sgemm: lhs too small");
    assert!(k == 0 || b.max_index(k, n) < b.data.len(), "sgemm: rhs too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the kernel touches inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
