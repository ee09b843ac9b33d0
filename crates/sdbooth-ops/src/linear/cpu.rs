//! linear's CPU kernels (`x @ wᵀ + b`) on f32 or bf16 slices, each operand on its own
//! ([`GemmElem`]: a product with a bf16 operand runs the bf16 GEMM with f32 sums); results are
//! f32.
//!
//! candle's autograd for `broadcast_matmul(&w.t())` builds the weight gradient through
//! zero-filled buffers and a strided (transposed) add, which made linear's backward 10–15× its
//! forward. Here each product is one GEMM, with `x` flattened to `[M, in]` rows:
//!
//! * forward      `y[M, out]  = x[M, in] · wᵀ[in, out] (+ b per row)`
//! * grad-input   `dx[M, in]  = dy[M, out] · w[out, in]`
//! * grad-weight  `dw[out, in] = dyᵀ[out, M] · x[M, in]`   (written in `[out, in]` layout)
//! * grad-bias    `db[out]    = Σ_rows dy`, summed in fixed row chunks, chunks in order
//!
//! Determinism: gemm never splits the k-sum across threads, and the bias sum is chunked by a
//! fixed row count, so results do not depend on the thread count.

use crate::alloc::uninit_output;
use crate::cpu::{gemm, GemmElem, Mat, Precision};
use rayon::prelude::*;

/// Rows per chunk of the bias-gradient sum (fixed: the sum order must not depend on threads).
const BIAS_ROWS: usize = 64;

/// Forward: `y[M, out] = x · wᵀ + b`.
pub fn forward<X: GemmElem, W: GemmElem>(
    precision: Precision,
    m: usize,
    k: usize,
    n: usize,
    x: &[X],
    w: &[W],
    b: Option<&[f32]>,
) -> Vec<f32> {
    if precision == Precision::Stored && !X::BF16 && !W::BF16 && few_rows(m, k, n) {
        return forward_few_rows(m, k, n, &X::as_f32(x), &W::as_f32(w), b);
    }
    // SAFETY: every row is either filled with the bias (then accumulated into) or written by
    // the GEMM, which with `accumulate == false` stores all of `y[m × n]` without reading it
    // (zeros when k == 0).
    let mut y = unsafe { uninit_output(m * n) };
    if let Some(b) = b {
        y.par_chunks_mut(n).with_min_len(1024usize.div_ceil(n).max(1)).for_each(|r| r.copy_from_slice(b));
    }
    gemm(precision, m, n, k, &mut y, n, b.is_some(), Mat::rows(x, k), Mat::transposed(w, k));
    y
}

/// Whether the f32 forward computes `yᵀ` ([`forward_few_rows`]): few rows (CLIP's 77 tokens,
/// cross-attention keys and values, the U-Net's deepest 4x4 and 8x8 levels), away from the
/// shapes where `gemm` takes paths whose sums depend on the orientation (matrix-vector products,
/// k ≤ 2, tiny products of at most 256 outputs).
fn few_rows(m: usize, k: usize, n: usize) -> bool {
    (2..=FEW_ROWS).contains(&m) && n >= 2 && k > 2 && m * n > 256
}

/// The most rows for which the f32 forward computes `yᵀ` (measured: 77 rows 1.3-4x faster,
/// 256 rows the same either way).
const FEW_ROWS: usize = 128;

/// Forward as `yᵀ[out, M] = w · xᵀ`, then transposed into `y`.
///
/// For `y = x · wᵀ` `gemm` copies `w` into its packed layout serially on the calling thread
/// before its threads start (it pre-packs the left operand of its column-major view when that
/// has at most `2·mc` rows); with few rows of `x` that copy of the whole weight costs more than
/// the product (CLIP's linears: 19 of 69 main-thread samples of the SD1.5 256-px fp32 step,
/// perf). Computing `yᵀ` makes `x` the packed operand and reads `w` in place. Same bits:
/// `gemm` sums each output over k in the same kc blocks (kc depends on k alone) and in k order,
/// with `fma(w, x, acc)` instead of `fma(x, w, acc)`, the same value (tested).
fn forward_few_rows(m: usize, k: usize, n: usize, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    // SAFETY: every row of `yt` is either filled with its bias (then accumulated into) or
    // written by the GEMM, which with `accumulate == false` stores all of `yt[n × m]`.
    let mut yt = unsafe { uninit_output(n * m) };
    if let Some(b) = b {
        yt.par_chunks_mut(m).zip(b).with_min_len(1024usize.div_ceil(m)).for_each(|(r, &v)| r.fill(v));
    }
    gemm(Precision::Stored, n, m, k, &mut yt, m, b.is_some(), Mat::rows(w, k), Mat::transposed(x, k));
    // SAFETY: each row `i` of `y` is written whole from column `i` of `yt`.
    let mut y = unsafe { uninit_output(m * n) };
    y.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = yt[j * m + i];
        }
    });
    y
}

/// `dx[M, in] = dy[M, out] · w[out, in]`.
pub fn grad_input<W: GemmElem, D: GemmElem>(
    precision: Precision,
    m: usize,
    k: usize,
    n: usize,
    w: &[W],
    dy: &[D],
) -> Vec<f32> {
    // SAFETY: the GEMM writes all of `dx[m × k]` (`accumulate == false`; zeros when n == 0).
    let mut dx = unsafe { uninit_output(m * k) };
    gemm(precision, m, k, n, &mut dx, k, false, Mat::rows(dy, n), Mat::rows(w, k));
    dx
}

/// `dw[out, in] = dyᵀ · x`.
pub fn grad_weight<X: GemmElem, D: GemmElem>(
    precision: Precision,
    m: usize,
    k: usize,
    n: usize,
    x: &[X],
    dy: &[D],
) -> Vec<f32> {
    // SAFETY: the GEMM writes all of `dw[n × k]` (`accumulate == false`; zeros when m == 0).
    let mut dw = unsafe { uninit_output(n * k) };
    gemm(precision, n, k, m, &mut dw, k, false, Mat::transposed(dy, n), Mat::rows(x, k));
    dw
}

/// `db[out] = Σ_rows dy[M, out]`, in fixed chunks of rows summed in chunk order.
pub fn grad_bias(n: usize, dy: &[f32]) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(BIAS_ROWS * n.max(1))
        .map(|c| {
            let mut acc = vec![0f32; n];
            for row in c.chunks_exact(n.max(1)) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += *v;
                }
            }
            acc
        })
        .collect();
    let mut db = vec![0f32; n];
    for p in &partials {
        for (a, v) in db.iter_mut().zip(p) {
            *a += *v;
        }
    }
    db
}
