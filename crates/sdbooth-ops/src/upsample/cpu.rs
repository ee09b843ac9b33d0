//! Nearest 2x upsampling kernels on f32 planes, in parallel over fixed groups of rows (every
//! element is computed alone, so the split never changes a result).
//!
//! The backward sums each 2x2 block of the output gradient in the order candle's autograd did
//! (its backward was a grouped conv2d with a 2x2 kernel of ones: one GEMM dot product per output,
//! summing the four taps row by row from zero), so the result is bit for bit candle's (tested).

use crate::alloc::uninit_output;
use rayon::prelude::*;

/// Output rows per rayon task (fixed, so the split does not depend on the thread count).
const ROWS_PER_TASK: usize = 64;

/// `y[p, 2i + a, 2j + b] = x[p, i, j]` for each of the planes of `x` (`h x w` values each).
pub fn forward(x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let (w2, rows) = (2 * w, 2 * h * (x.len() / (h * w).max(1)));
    // SAFETY: `y` holds `rows` rows of `w2`; the tasks below cover every row and write every value.
    let mut y = unsafe { uninit_output(rows * w2) };
    if w == 0 {
        return y;
    }
    y.par_chunks_mut(ROWS_PER_TASK * w2).enumerate().for_each(|(task, chunk)| {
        for (r, out) in chunk.chunks_mut(w2).enumerate() {
            // Output row `row` of the whole stack reads input row `row / 2`.
            let row = task * ROWS_PER_TASK + r;
            let src = &x[(row / 2) * w..(row / 2 + 1) * w];
            for (pair, &v) in out.chunks_exact_mut(2).zip(src) {
                pair[0] = v;
                pair[1] = v;
            }
        }
    });
    y
}

/// `dx[p, i, j] = Σ dy[p, 2i..2i+2, 2j..2j+2]` for output gradients of `2h x 2w` per plane.
pub fn backward(dy: &[f32], h: usize, w: usize) -> Vec<f32> {
    let w2 = 2 * w;
    let rows = dy.len() / (2 * w2).max(1);
    // SAFETY: `dx` holds `rows` rows of `w`; the tasks below cover every row and write every value.
    let mut dx = unsafe { uninit_output(rows * w) };
    if w == 0 || h == 0 {
        return dx;
    }
    dx.par_chunks_mut(ROWS_PER_TASK * w).enumerate().for_each(|(task, chunk)| {
        for (r, out) in chunk.chunks_mut(w).enumerate() {
            let row = task * ROWS_PER_TASK + r;
            let top = &dy[2 * row * w2..(2 * row + 1) * w2];
            let bottom = &dy[(2 * row + 1) * w2..(2 * row + 2) * w2];
            for ((o, t), b) in out.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                *o = (((0.0 + t[0]) + t[1]) + b[0]) + b[1];
            }
        }
    });
    dx
}
