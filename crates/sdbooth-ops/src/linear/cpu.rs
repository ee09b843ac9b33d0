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
