//! Element-wise activation kernels on f32 slices: one pass forward, one pass backward, in fixed
//! chunks on rayon's threads (each element is computed alone, so the split never changes a
//! result).
//!
//! They reproduce candle's f32 computation bit for bit: candle's GELU (erf) forward and CLIP's
//! QuickGELU as composed in [`crate::reference`], and the
//! gradient its autograd builds from its primitives (`Op::Unary(GeluErf)`'s backward and the
//! product's), rounding after each of those primitives as candle does, with the same constants
//! (0.398942 for 1/√(2π), as candle has it). The "+ 0.0" in GEGLU's gradient is the zero half of
//! each `narrow`'s padded gradient that candle adds to the other: it turns −0 into +0, nothing
//! else. (candle's gradient store keeps each first gradient as it is: see vendor/README.md.)

use crate::alloc::uninit_output;
use rayon::prelude::*;

/// Elements per rayon task.
pub(crate) const CHUNK: usize = 1 << 14;

/// How GELU and its gradient are computed: [`Exact`] (candle's arithmetic, bit for bit) or
/// [`super::fast::Fast`] (a vectorised erfc, for bf16 compute). The kernels below are generic
/// over it; each applies it to one run of values at a time ([`Runs`]).
pub(crate) trait GeluMath: Runs {
    fn gelu(x: f32) -> f32;
    /// The gradient handed to `x` for the output gradient `dy`.
    fn grad(x: f32, dy: f32) -> f32;
}

/// The inner loops over one run of values (a chunk, or a GEGLU row), so an implementation can
/// compile them for wider vectors; the defaults are plain loops over [`GeluMath`].
pub(crate) trait Runs: Sized {
    fn gelu_run(y: &mut [f32], x: &[f32])
    where
        Self: GeluMath,
    {
        gelu_run::<Self>(y, x)
    }
    fn gelu_grad_run(dx: &mut [f32], x: &[f32], dy: &[f32])
    where
        Self: GeluMath,
    {
        gelu_grad_run::<Self>(dx, x, dy)
    }
    fn geglu_run(y: &mut [f32], value: &[f32], gate: &[f32])
    where
        Self: GeluMath,
    {
        geglu_run::<Self>(y, value, gate)
    }
    fn geglu_grad_run(dvalue: &mut [f32], dgate: &mut [f32], value: &[f32], gate: &[f32], dy: &[f32])
    where
        Self: GeluMath,
    {
        geglu_grad_run::<Self>(dvalue, dgate, value, gate, dy)
    }
}

#[inline(always)]
pub(crate) fn gelu_run<M: GeluMath>(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = M::gelu(x);
    }
}

#[inline(always)]
pub(crate) fn gelu_grad_run<M: GeluMath>(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        *dx = M::grad(x, dy);
    }
}

#[inline(always)]
pub(crate) fn geglu_run<M: GeluMath>(y: &mut [f32], value: &[f32], gate: &[f32]) {
    for ((y, &v), &g) in y.iter_mut().zip(value).zip(gate) {
        *y = v * M::gelu(g);
    }
}

#[inline(always)]
pub(crate) fn geglu_grad_run<M: GeluMath>(
    dvalue: &mut [f32],
    dgate: &mut [f32],
    value: &[f32],
    gate: &[f32],
    dy: &[f32],
) {
    for i in 0..dy.len().min(value.len()).min(gate.len()).min(dvalue.len()).min(dgate.len()) {
        let (v, g, d) = (value[i], gate[i], dy[i]);
        dvalue[i] = d * M::gelu(g) + 0.0;
        dgate[i] = M::grad(g, d * v) + 0.0;
    }
}

/// candle's f32 arithmetic (the f32 path: bit-identical to candle's composition).
pub(crate) struct Exact;

impl Runs for Exact {}

impl GeluMath for Exact {
    #[inline(always)]
    fn gelu(x: f32) -> f32 {
        gelu(x)
    }
    #[inline(always)]
    fn grad(x: f32, dy: f32) -> f32 {
        gelu_grad(x, dy)
    }
}

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
pub fn gelu_forward<M: GeluMath>(x: &[f32]) -> Vec<f32> {
    // SAFETY: `y` and `x` have the same length, so the zipped chunks cover every element of `y`.
    let mut y = unsafe { uninit_output(x.len()) };
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| M::gelu_run(y, x));
    y
}

/// `dx` of `gelu_erf` for the output gradient `dy`.
pub fn gelu_backward<M: GeluMath>(x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), dy.len(), "gelu backward: the op checks the shapes");
    // SAFETY: `dx`, `x` and `dy` have the same length: the zipped chunks cover every element.
    let mut dx = unsafe { uninit_output(x.len()) };
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| M::gelu_grad_run(dx, x, dy));
    dx
}

/// candle's f32 `x * -1.702`, `exp`, `+ 1`, `recip` of [`crate::reference::quick_gelu`]: the
/// sigmoid factor `r` and the two intermediates its gradient reads (`e = exp(−1.702·x)`,
/// `p = e + 1`). The `+ 0.0` and `* 1.0` are candle's affine maps (`v * mul + add`).
#[inline(always)]
fn quick_gelu_parts(x: f32) -> (f32, f32, f32) {
    let e = (x * QUICK_GELU_MUL + 0.0).exp();
    let p = e * 1.0 + 1.0;
    (e, p, p.recip())
}

/// CLIP's constant as candle's `affine` converts it to f32.
const QUICK_GELU_MUL: f32 = -1.702f64 as f32;

/// `y = x · sigmoid(1.702 x)`, as candle computes `x * recip(exp(x * -1.702) + 1)`.
pub fn quick_gelu_forward(x: &[f32]) -> Vec<f32> {
    // SAFETY: `y` and `x` have the same length, so the zipped chunks cover every element of `y`.
    let mut y = unsafe { uninit_output(x.len()) };
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * quick_gelu_parts(x).2;
        }
    });
    y
}

/// The gradient candle's autograd hands to `x` through the five primitives of
/// [`crate::reference::quick_gelu`], in its order: the product gives `dy·r` first (stored), then
/// `recip`'s backward `0 − (dy·x)/(p·p)` (subtracted from a zero entry), the affine `+ 1` (`·1 +
/// 0`), `exp`'s (`· e`) and the affine `· −1.702` (`+ 0`), added to the stored one.
pub fn quick_gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), dy.len(), "quick_gelu backward: the op checks the shapes");
    // SAFETY: `dx`, `x` and `dy` have the same length: the zipped chunks cover every element.
    let mut dx = unsafe { uninit_output(x.len()) };
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let (e, p, r) = quick_gelu_parts(x);
            let through_product = dy * r;
            let d_p = 0.0 - (dy * x) / (p * p);
            let d_e = d_p * 1.0 + 0.0;
            let through_sigmoid = (d_e * e) * QUICK_GELU_MUL + 0.0;
            *dx = through_product + through_sigmoid;
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
pub fn geglu_forward<M: GeluMath>(half: usize, x: &[f32]) -> Vec<f32> {
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
            M::geglu_run(y, value, gate);
        }
    });
    y
}

/// GEGLU backward: `dx` rows of `[dvalue, dgate]` from the input rows and the output gradient
/// rows `dy` (of `half`).
pub fn geglu_backward<M: GeluMath>(half: usize, x: &[f32], dy: &[f32]) -> Vec<f32> {
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
                M::geglu_grad_run(dvalue, dgate, value, gate, dy);
            }
        });
    dx
}
