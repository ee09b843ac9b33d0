//! Shared plumbing for the CPU kernels: reading candle storage as f32, writing results back in
//! the caller's dtype, and the single GEMM entry point every kernel goes through.
//!
//! Kernels compute in f32: f16 operands are widened on entry and the result is rounded once on
//! exit, so accumulation is always f32. The GEMMs of conv2d and linear take bf16 operands as they
//! are ([`GemmElem`], [`crate::bf16_gemm`]: bf16 products, f32 sums), as PyTorch's autocast does.
//!
//! **AMX plug-in point.** A bf16 AMX kernel (Sapphire Rapids `tdpbf16ps`) is one more
//! [`crate::bf16_gemm::Bf16Kernel`]: same packing idea (bf16 pairs along k), f32 tiles, chosen at
//! run time; no op has to know.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
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
        CpuStorage::BF16(v) => Cow::Owned(crate::cast::widen(&v[start..end])),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F64(v) => Cow::Owned(v[start..end].iter().map(|&x| x as f32).collect()),
        other => bail!("sdbooth-ops: unsupported dtype {:?} for a float kernel", other.dtype()),
    })
}

/// Refuses operands of different dtypes (the kernels widen both to f32, which would hide it),
/// except f32 with bf16: their product runs in bf16 with f32 sums, the f32 operand rounded to
/// bf16 as it is packed (`--mixed_precision bf16` on the CPU: bf16 weights, f32 activations).
pub(crate) fn same_dtype(op: &str, a: &CpuStorage, b: &CpuStorage) -> Result<()> {
    let bf16_mix = matches!((a.dtype(), b.dtype()), (DType::F32, DType::BF16) | (DType::BF16, DType::F32));
    if a.dtype() != b.dtype() && !bf16_mix {
        bail!("{op}: input dtype {:?} differs from weight dtype {:?}", a.dtype(), b.dtype());
    }
    Ok(())
}

/// Converts an f32 result into a storage of `dtype`.
pub(crate) fn storage_from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(narrow_bf16(&v)),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
        other => bail!("sdbooth-ops: unsupported output dtype {other:?}"),
    })
}

/// f32 → bf16 (round to nearest even), in parallel vectorised chunks: bf16 results of every
/// kernel pass here, and a serial pass over each activation would cost a visible share of a bf16
/// step.
pub(crate) fn narrow_bf16(v: &[f32]) -> Vec<bf16> {
    crate::cast::narrow(v)
}

/// Elements per task of the parallel dtype conversions (fixed; conversions are per element, so
/// the split never changes a result).
pub(crate) const CAST_CHUNK: usize = 1 << 14;

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

/// A kernel's f32 result as a tensor of the CPU backend in `dtype` (no copy for f32): for the
/// results an op hands back beside its output (see [`crate::backend::Slot`]).
pub(crate) fn cpu_tensor(v: Vec<f32>, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    if shape.elem_count() != v.len() {
        bail!("sdbooth-ops: {} values do not fill shape {shape:?}", v.len());
    }
    let storage = Storage::Cpu(storage_from_f32(v, dtype)?);
    Ok(Tensor::from_storage(storage, shape, BackpropOp::none(), false))
}

/// The name of the f32 GEMM kernel the `gemm` crate picks on this CPU (it dispatches at run
/// time; the workspace enables its AVX-512 kernels), for `sdbooth bench`'s report.
pub fn f32_gemm_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "f32_avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "f32_avx2";
        }
    }
    "f32_generic"
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

/// A strided row-major view of a matrix (f32 unless said): element (i, j) is at
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T = f32> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub fn rows(data: &'a [T], row_stride: usize) -> Self {
        Mat { data, rs: row_stride, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `row_stride`.
    pub fn transposed(data: &'a [T], row_stride: usize) -> Self {
        Mat { data, rs: 1, cs: row_stride }
    }
    pub(crate) fn max_index(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * self.rs + (cols - 1) * self.cs
        }
    }
}

/// An element type the GEMM-based kernels (conv2d, linear) take: f32 or bf16, each operand on
/// its own. A product with a bf16 operand runs the bf16 GEMM with f32 sums
/// ([`crate::bf16_gemm`]), an f32 operand of it rounded to bf16 while it is packed (no separate
/// cast pass); two f32 operands run the f32 GEMM. Results are f32 either way.
pub trait GemmElem: crate::alloc::Plain + Default {
    /// Whether the values are bf16.
    const BF16: bool;
    /// The value rounded to bf16 (to nearest even), as bits.
    fn bf16_bits(self) -> u16;
    /// The values as f32 (exact; borrowed for f32).
    fn as_f32(v: &[Self]) -> Cow<'_, [f32]>;
    /// The values when they are f32 (the bf16 GEMM then packs them with a vectorised rounding).
    fn f32_values(v: &[Self]) -> Option<&[f32]>;
}

impl GemmElem for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        crate::cast::bf16_bits(self)
    }
    fn as_f32(v: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(v)
    }
    fn f32_values(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
}

impl GemmElem for bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }
    fn as_f32(v: &[bf16]) -> Cow<'_, [f32]> {
        Cow::Owned(crate::cast::widen(v))
    }
    fn f32_values(_: &[bf16]) -> Option<&[f32]> {
        None
    }
}

/// What the products of a GEMM-based op (conv2d, linear) are computed in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// The operands' own dtypes: bf16 products with f32 sums when either operand is bf16, else
    /// f32 (see [`GemmElem`]).
    #[default]
    Stored,
    /// bf16 products with f32 sums whatever the operands are stored in: f32 values are rounded
    /// to bf16 (to nearest even) as the GEMM packs them. `--mixed_precision bf16` on the CPU
    /// passes the f32 master weights this way, so no weight is cast per use and the weight
    /// gradients come out in f32 without a bf16 tensor in between.
    Bf16,
}

/// `dst[m×n] (row stride dst_rs) = (accumulate ? dst : 0) + a[m×k] · b[k×n]`, multi-threaded:
/// in bf16 with f32 sums when `precision` asks for it or an operand is bf16 (see [`GemmElem`]),
/// else in f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<A: GemmElem, B: GemmElem>(
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
) {
    if precision == Precision::Bf16 || A::BF16 || B::BF16 {
        crate::bf16_gemm::gemm(m, n, k, dst, dst_rs, accumulate, a, b)
    } else {
        let (a32, b32) = (A::as_f32(a.data), B::as_f32(b.data));
        let a = Mat { data: &a32[..], rs: a.rs, cs: a.cs };
        let b = Mat { data: &b32[..], rs: b.rs, cs: b.cs };
        sgemm(m, n, k, dst, dst_rs, accumulate, a, b, par_threads())
    }
}

/// A kernel operand read from candle storage: bf16 as it is, every other dtype as f32.
pub(crate) enum Operand<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(&'a [bf16]),
}

/// The operand of a contiguous CPU storage (see [`Operand`]).
pub(crate) fn operand<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Operand<'a>> {
    Ok(match storage_bf16(s, l)? {
        Some(v) => Operand::Bf16(v),
        None => Operand::F32(storage_f32(s, l)?),
    })
}

/// Runs `$body` with `$x` and `$y` bound to the two [`Operand`]s as typed slices (`&[f32]` or
/// `&[bf16]`): the body is a call of a kernel generic over [`GemmElem`].
macro_rules! with_operands {
    (($a:expr, $b:expr), |$x:ident, $y:ident| $body:expr) => {{
        use $crate::cpu::Operand::{Bf16, F32};
        match ($a, $b) {
            (F32(a), F32(b)) => {
                let ($x, $y) = (&a[..], &b[..]);
                $body
            }
            (F32(a), Bf16(b)) => {
                let ($x, $y) = (&a[..], b);
                $body
            }
            (Bf16(a), F32(b)) => {
                let ($x, $y) = (a, &b[..]);
                $body
            }
            (Bf16(a), Bf16(b)) => {
                let ($x, $y) = (a, b);
                $body
            }
        }
    }};
}
pub(crate) use with_operands;

/// A CPU storage's data as a bf16 slice when it is bf16 storage (the GEMM kernels then compute in
/// bf16 with f32 sums), `None` for other dtypes (they are widened to f32 by [`storage_f32`]).
pub(crate) fn storage_bf16<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Option<&'a [bf16]>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("sdbooth-ops: kernel operand is not contiguous (shape {:?})", l.shape())
    };
    Ok(match s {
        CpuStorage::BF16(v) => Some(&v[start..end]),
        _ => None,
    })
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
    sgemm_strided(m, n, k, dst, (dst_rs, 1), accumulate, a, b, par)
}

/// [`sgemm`] with a destination of any (row, column) strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds are checked here once so the unsafe call below only reads/writes inside slices.
    let dmat = Mat { data: dst, rs: dst_rs, cs: dst_cs };
    assert!(dmat.max_index(m, n) < dst.len(), "sgemm: dst too small");
    assert!(k == 0 || a.max_index(m, k) < a.data.len(), "sgemm: lhs too small");
    assert!(k == 0 || b.max_index(k, n) < b.data.len(), "sgemm: rhs too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    let gemm_rows = serially_packed_rows(m, n, k, (dst_rs, dst_cs), a, b, par);
    let base = Ptrs { dst: dst.as_mut_ptr(), a: a.data.as_ptr(), b: b.data.as_ptr() };
    let call = |p: Ptrs, m: usize, n: usize, par: gemm::Parallelism| {
        // SAFETY: the asserts above keep every index of the whole product inside the slices,
        // and each call below covers a block of it (or all of it).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                p.dst,
                dst_cs as isize,
                dst_rs as isize,
                accumulate,
                p.a,
                a.cs as isize,
                a.rs as isize,
                p.b,
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
    };
    match gemm_rows {
        None => call(base, m, n, par),
        Some(GemmRows::OfB) => (0..n / SPLIT_ROWS).into_par_iter().for_each(|c| {
            let (j0, j1) = split_block(c, n);
            // Columns j0..j1 of dst and b (rows of gemm's transposed view).
            call(base.offset(j0 * dst_cs, 0, j0 * b.cs), m, j1 - j0, gemm::Parallelism::None)
        }),
        Some(GemmRows::OfA) => (0..m / SPLIT_ROWS).into_par_iter().for_each(|c| {
            let (i0, i1) = split_block(c, m);
            call(base.offset(i0 * dst_rs, i0 * a.rs, 0), i1 - i0, n, gemm::Parallelism::None)
        }),
    }
}

/// Block `c` of `rows / SPLIT_ROWS` blocks: [`SPLIT_ROWS`] rows each, the last one also taking
/// the remainder (so every block has 64 to 127 rows).
fn split_block(c: usize, rows: usize) -> (usize, usize) {
    let start = c * SPLIT_ROWS;
    let end = if c + 1 == rows / SPLIT_ROWS { rows } else { start + SPLIT_ROWS };
    (start, end)
}

/// The operand pointers of one block of a product (shared with rayon's tasks, which write
/// disjoint blocks of `dst`).
#[derive(Clone, Copy)]
struct Ptrs {
    dst: *mut f32,
    a: *const f32,
    b: *const f32,
}

impl Ptrs {
    /// The block starting `dst`, `a` and `b` elements further.
    fn offset(self, dst: usize, a: usize, b: usize) -> Ptrs {
        Ptrs { dst: self.dst.wrapping_add(dst), a: self.a.wrapping_add(a), b: self.b.wrapping_add(b) }
    }
}

// SAFETY: the pointers are only dereferenced by `gemm` inside `sgemm_strided`'s bounds-checked
// slices, while those borrows are alive; tasks write disjoint blocks of `dst`.
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

/// Rows of `gemm`'s left operand per task when [`sgemm_strided`] splits a product.
const SPLIT_ROWS: usize = 64;

/// Which operand's rows are `gemm`'s left operand (in its column-major view: `b`'s columns when
/// `dst` is row-major), when the product is better split by hand.
#[derive(Clone, Copy)]
enum GemmRows {
    OfA,
    OfB,
}

/// `Some` when `gemm` would copy its whole left operand into its packed layout serially, on the
/// calling thread, before its threads start: it pre-packs that operand when it has at most
/// `2·mc` rows (`mc` ≤ 512) and its rows are not contiguous. A linear forward `x · wᵀ` (the
/// weight is that operand) then left the pool idle for a copy of the weight: 15 of the 140
/// main-thread samples of the SD1.5 256-px fp32 step (perf, 2 threads). Split into blocks of
/// [`SPLIT_ROWS`] rows ([`split_block`]), each a single-threaded `gemm` on one of rayon's
/// tasks, every block packs its own rows, in parallel.
///
/// Same bits: each output is summed over k in the same `kc` blocks (they depend on k alone
/// here: neither the whole product nor a block falls in `gemm`'s `m, n ≤ 64` path, which takes
/// k up to 512 at once) and in k order, whichever block or thread computes it; no block takes
/// `gemm`'s matrix-vector (a side of 1), outer-product (k ≤ 2) or ≤ 256-output paths (a block
/// has at least 64 × 65 outputs). Only when the other operand's rows are contiguous (it is then read
/// in place, not packed per block).
fn serially_packed_rows(
    m: usize,
    n: usize,
    k: usize,
    (dst_rs, dst_cs): (usize, usize),
    a: Mat<'_>,
    b: Mat<'_>,
    par: gemm::Parallelism,
) -> Option<GemmRows> {
    if !matches!(par, gemm::Parallelism::Rayon(t) if t > 1) || k <= 2 {
        return None;
    }
    // gemm computes the transpose when dst is row-major: its left operand is then bᵀ.
    let (rows, cols, lhs_rs, rhs_rs, which) =
        if dst_cs < dst_rs { (n, m, b.cs, a.cs, GemmRows::OfB) } else { (m, n, a.rs, b.rs, GemmRows::OfA) };
    let prepacked = lhs_rs != 1 && (2 * SPLIT_ROWS..=1024).contains(&rows);
    (prepacked && rhs_rs == 1 && cols > 64).then_some(which)
}

/// `row[i] = exp(row[i] − sub)` and returns the sum of the results; inputs at or below −87
/// (including −∞ from masks) give exactly 0.
///
/// The softmax exponentials are as many as the attention scores, so they cost as much as a
/// GEMM if done with scalar `expf`. This polynomial form (Cody–Waite range reduction, degree-6
/// Taylor on |r| ≤ ln2/2, relative error ≈ 2e-7) auto-vectorises; on AVX-512 CPUs the same loop
/// is compiled a second time with 16-wide vectors and picked at run time.
pub(crate) fn exp_sub_sum(row: &mut [f32], sub: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features this function is compiled for were just detected.
            return unsafe { exp_sub_sum_avx512(row, sub) };
        }
    }
    exp_sub_sum_generic(row, sub)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_sub_sum_avx512(row: &mut [f32], sub: f32) -> f32 {
    exp_sub_sum_generic(row, sub)
}

#[inline(always)]
fn exp_sub_sum_generic(row: &mut [f32], sub: f32) -> f32 {
    // Sum in 16 lanes so the reduction vectorises; the lane order is fixed, so the result does
    // not depend on anything but the data.
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (v, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *v = exp_approx(*v - sub);
            *l += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_approx(*v - sub);
        tail += *v;
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ from integer operations only: `shifted` = ROUND + n with n in [-126, 127] has ROUND's
    // exponent and ulp 1, so its bits are ROUND's bits + n. (`n as i32`, Rust's saturating
    // conversion, compiled to one scalar convert and two conditional moves per lane and made this
    // loop ~3× slower; the value is the same.)
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x <= -87.0 {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_approx` as written before the integer-only 2ⁿ (Rust's float-to-int conversion): the
    /// reference for "same bits".
    fn exp_approx_by_conversion(x: f32) -> f32 {
        let xc = x.clamp(-87.0, 88.0);
        let n = (xc * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = (xc - n * 0.693_145_75) - n * 1.428_606_8e-6;
        let p = 1.0
            + r * (1.0
                + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        if x <= -87.0 {
            0.0
        } else {
            p * scale
        }
    }

    /// Same bits as the conversion form for every f32 in [-100, 100] (every 7th bit pattern: all
    /// exponents, every n) and ±inf; within 4e-7 relative of f64's exp where that is normal.
    #[test]
    fn exp_approx_same_bits_as_the_conversion_form_and_accurate() {
        let mut checked = 0u64;
        for bits in (0..u32::MAX).step_by(7) {
            let x = f32::from_bits(bits);
            if x.is_nan() || x.abs() > 100.0 {
                continue;
            }
            let got = exp_approx(x);
            assert_eq!(got.to_bits(), exp_approx_by_conversion(x).to_bits(), "x = {x:e}");
            let want = f64::from(x).exp();
            if (-87.0..88.0).contains(&x) && want > f64::from(f32::MIN_POSITIVE) {
                let rel = ((f64::from(got) - want) / want).abs();
                assert!(rel < 4e-7, "x = {x:e}: {got:e} vs {want:e} (rel {rel:e})");
            }
            checked += 1;
        }
        assert!(checked > 100_000_000, "{checked}");
        for x in [f32::INFINITY, f32::NEG_INFINITY, 88.0, -87.0] {
            assert_eq!(exp_approx(x).to_bits(), exp_approx_by_conversion(x).to_bits(), "x = {x:e}");
        }
    }

    /// The AVX-512 build of `exp_sub_sum` and the portable one agree bit for bit (row values and
    /// sum), on lengths with and without a 16-value remainder.
    #[test]
    fn exp_sub_sum_dispatch_matches_portable() {
        let mut state = 0x9E37_79B9u32;
        for len in [1, 15, 16, 17, 64, 77, 256, 1000] {
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state as f32 / u32::MAX as f32) * 40.0 - 30.0
                })
                .collect();
            let (mut a, mut b) = (row.clone(), row);
            let sa = exp_sub_sum(&mut a, 3.5);
            let sb = exp_sub_sum_generic(&mut b, 3.5);
            assert_eq!(sa.to_bits(), sb.to_bits(), "len {len}");
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "len {len}");
        }
    }
}
