//! softmax's CPU kernels on f32 slices, one row of the last dimension per rayon task.

use crate::alloc::uninit_output;
use crate::cpu;
use rayon::prelude::*;

/// `y = exp(x − max) / Σ exp(x − max)` per row of `d` values; a row of all −∞ yields zeros
/// rather than NaN.
pub fn forward(d: usize, x: &[f32]) -> Vec<f32> {
    if d == 0 {
        return vec![0f32; x.len()];
    }
    // SAFETY: `y` and `x` have the same length; each chunk of `y` is first overwritten by its
    // chunk of `x`, then scaled in place.
    let mut y = unsafe { uninit_output(x.len()) };
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
        let mx = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        yr.copy_from_slice(xr);
        let sum = if mx == f32::NEG_INFINITY { 0.0 } else { cpu::exp_sub_sum(yr, mx) };
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        yr.iter_mut().for_each(|v| *v *= inv);
    });
    y
}

/// `dx = y ∘ (dy − Σ dy·y)` per row, from the forward's output.
pub fn backward(d: usize, y: &[f32], dy: &[f32]) -> Vec<f32> {
    if d == 0 {
        return vec![0f32; y.len()];
    }
    assert_eq!(y.len(), dy.len(), "softmax backward: the op checks the shapes");
    // SAFETY: `dx`, `y` and `dy` have the same length: the zipped rows cover every element.
    let mut dx = unsafe { uninit_output(y.len()) };
    dx.par_chunks_mut(d).zip(y.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(dxr, (yr, dyr))| {
        let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
        for ((o, &yv), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
            *o = yv * (g - dot);
        }
    });
    dx
}
