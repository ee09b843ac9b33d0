//! Element-wise activation kernels on f32 slices: one pass forward, one pass backward, in fixed
//! chunks on rayon's threads (each element is computed alone, so the split never changes a
//! result).
//!
//! They reproduce candle's f32 computation bit for bit: candle's GELU (erf) forward, and the
//! gradient its autograd builds from its primitives (`Op::Unary(GeluErf)`'s backward and the
//! product's), rounding after each of those primitives as candle does, with the same constants
//! (0.398942 for 1/√(2π), as candle has it). The "+ 0.0" in GEGLU's gradient is the zero half of
//! each `narrow`'s padded gradient that candle adds to the other: it turns −0 into +0, nothing
//! else. (candle's gradient store keeps each first gradient as it is: see vendor/README.md.)

use crate::alloc::uninit_output;
use rayon::prelude::*;

/// Elements per rayon task.
pub(crate) const CHUNK: usize = 1 << 14;

/// candle's f32 `gelu_erf`.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    (libm::erff(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// candle's autograd derivative of `gelu_erf` at `x`, as its primitives compute it:
/// `0.5 + 0.398942 · exp(−x²/2) · x + 0.5 · erf(x/√2)`.
#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    let neg_half_square = (-(x * x)) * 0.5 + 0.0;
    let scaled_exp = (neg_half_square.exp() * (0.398942f64 as f32) + 0.0) * x;
    let erf_term = libm::erff(x * ((1.0 / 2f64.sqrt()) as f32) + 0.0) * 0.5 + 0.0;
    (scaled_exp * 1.0 + 0.5) + erf_term
}

/// The gradient candle's `gelu_erf` backward hands to its input for the output gradient `dy`.
#[inline(always)]
fn gelu_grad(x: f32, dy: f32) -> f32 {
    dy * gelu_derivative(x)
}

/// `y = gelu_erf(x)`.
pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    // SAFETY: `y` and `x` have the same length, so the zipped chunks cover every element of `y`.
    let mut y = unsafe { uninit_output(x.len()) };
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gelu(x);
        }
    });
    y
}

/// `dx` of `gelu_erf` for the output gradient `dy`.
pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), dy.len(), "gelu backward: the op checks the shapes");
    // SAFETY: `dx`, `x` and `dy` have the same length: the zipped chunks cover every element.
    let mut dx = unsafe { uninit_output(x.len()) };
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            *dx = gelu_grad(x, dy);
        }
    });
    dx
}

/// Rows per rayon task for rows of `width` elements (about [`CHUNK`] elements, at least one).
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// GEGLU over rows of `2 · half` values `[value, gate]`: `y = value · gelu_erf(gate)`, rows of
/// `half`.
pub fn geglu_forward(half: usize, x: &[f32]) -> Vec<f32> {
    if half == 0 {
        return Vec::new();
    }
    assert_eq!(x.len() % (2 * half), 0, "geglu: the op checks the shapes");
    // SAFETY: `x` is whole rows of `2 · half`, so `y` is as many rows of `half`, and every row
    // of `y` is written from its row of `x`.
    let mut y = unsafe { uninit_output(x.len() / 2) };
    let rows = rows_per_task(half);
    y.par_chunks_mut(rows * half).zip(x.par_chunks(rows * 2 * half)).for_each(|(y, x)| {
        for (y, x) in y.chunks_exact_mut(half).zip(x.chunks_exact(2 * half)) {
            let (value, gate) = x.split_at(half);
            for ((y, &v), &g) in y.iter_mut().zip(value).zip(gate) {
                *y = v * gelu(g);
            }
        }
    });
    y
}

/// GEGLU backward: `dx` rows of `[dvalue, dgate]` from the input rows and the output gradient
/// rows `dy` (of `half`).
pub fn geglu_backward(half: usize, x: &[f32], dy: &[f32]) -> Vec<f32> {
    if half == 0 {
        return vec![0f32; x.len()];
    }
    assert_eq!(
        (x.len() % (2 * half), x.len()),
        (0, 2 * dy.len()),
        "geglu backward: the op checks the shapes"
    );
    // SAFETY: `dx` is as many whole rows of `2 · half` as `dy` has rows of `half`; every row of
    // `dx` (both halves) is written from its rows of `x` and `dy`.
    let mut dx = unsafe { uninit_output(x.len()) };
    let rows = rows_per_task(half);
    dx.par_chunks_mut(rows * 2 * half)
        .zip(x.par_chunks(rows * 2 * half).zip(dy.par_chunks(rows * half)))
        .for_each(|(dx, (x, dy))| {
            for ((dx, x), dy) in
                dx.chunks_exact_mut(2 * half).zip(x.chunks_exact(2 * half)).zip(dy.chunks_exact(half))
            {
                let (value, gate) = x.split_at(half);
                let (dvalue, dgate) = dx.split_at_mut(half);
                for i in 0..half {
                    let (v, g, d) = (value[i], gate[i], dy[i]);
                    dvalue[i] = d * gelu(g) + 0.0;
                    dgate[i] = gelu_grad(g, d * v) + 0.0;
                }
            }
        });
    dx
}
