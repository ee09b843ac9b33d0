//! Stochastic rounding of f32 weights to bf16 on the device (`--full_bf16`).
//!
//! The host kernel (`optim::rounding`) adds 16 random bits to each f32's bit pattern and
//! truncates. candle has no bit casts, so this computes the same rule from values: the two bf16
//! neighbours `lo` (toward zero) and `hi` of x, the fraction `frac = (|x| - |lo|) / (|hi| - |lo|)`
//! (the 16 low bits of x over 2^16, exactly), and rounds to `hi` when `u + frac >= 1` for a random
//! `u` in {0, 1/2^16, …}: that is the host's rule for the 16 bits `2^16 u`. The random stream is
//! the host's too: a counter-based hash of the element index and a per-update key
//! (`optim::rounding::rounding_bits`), so both paths give the same bits (f32 subnormals aside:
//! here they keep their neighbour toward zero), the result is deterministic, independent of the
//! order parameters are updated in, and a resumed run repeats it exactly. The key depends on the
//! rounding seed, the parameter's name and its step count (see [`key`]) — the state a resume
//! restores.

use candle_core::{DType, Device, Tensor};
use rand::RngCore;
use sdbooth_data::Streams;

use super::scalar;
use crate::error::Result;

/// The key of the rounding stream of parameter `name` at its `step`-th update: the first draw of
/// the host kernels' keyed stream for the same update.
pub fn key(seed: u64, name: &str, step: u64) -> u64 {
    Streams::new(seed).rounding(name, step).next_u64()
}

/// Rounds the f32 values of `x` to bf16, stochastically (unbiased), with the stream of `key`.
pub fn stochastic_round_bf16(x: &Tensor, key: u64) -> Result<Tensor> {
    stochastic_round_bf16_at(x, key, 0)
}

/// As [`stochastic_round_bf16`] for values that start at position `offset` of a larger tensor
/// (a chunk): each value draws the bits of its position in the whole tensor.
pub(super) fn stochastic_round_bf16_at(x: &Tensor, key: u64, offset: usize) -> Result<Tensor> {
    let dev = x.device();
    let x = x.to_dtype(DType::F32)?;
    let to_bf16 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?) };
    let nearest = to_bf16(&x)?;
    // The bf16 neighbours of a bf16 value b != 0: b·(1 ± (2^-8 + 2^-18)) lies a little more than
    // half a spacing away from b (the spacing below a power of two is half the one above, and
    // the margin covers it), so rounding to nearest lands on the neighbour. Sign-symmetric.
    let delta = 2f64.powi(-8) + 2f64.powi(-18);
    let away = to_bf16(&nearest.affine(1.0 + delta, -0.0)?)?;
    let toward = to_bf16(&nearest.affine(1.0 - delta, -0.0)?)?;
    let (ax, an) = (x.abs()?, nearest.abs()?);
    let x_beyond = ax.gt(&an)?;
    let lo = x_beyond.where_cond(&nearest, &toward)?;
    let hi = x_beyond.where_cond(&away, &nearest)?;
    // |hi| - |lo| is a power of two and |x| - |lo| has at most 16 significant bits: frac is exact.
    // It is NaN where hi == lo (x is 0, infinite, NaN or rounds to 0): those keep lo.
    let frac = (ax - lo.abs()?)?.div(&(hi.abs()? - lo.abs()?)?)?;
    let u = uniform16(x.elem_count(), offset, key, dev)?.reshape(x.shape())?;
    let one = scalar(1.0, DType::F32, dev)?;
    let take_hi = (u + frac)?.broadcast_ge(&one)?;
    Ok(take_hi.where_cond(&hi, &lo)?.to_dtype(DType::BF16)?)
}

/// 2^32, the modulus of the hash's 32-bit words (held in i64 so no operation overflows).
const WORD: f64 = 4_294_967_296.0;

/// `x mod 2^32` for x >= 0 (i64).
fn wrap(x: &Tensor, word: &Tensor) -> Result<Tensor> {
    Ok((x - x.broadcast_div(word)?.broadcast_mul(word)?)?)
}

/// `x + (x >> shift)` mod 2^32: the shift-and-mix step of an integer hash, with an addition in
/// place of the exclusive or candle does not have.
fn mix_shift(x: &Tensor, shift: u32, word: &Tensor) -> Result<Tensor> {
    let div = scalar(f64::from(1u32 << shift), DType::I64, x.device())?;
    wrap(&(x + x.broadcast_div(&div)?)?, word)
}

/// `n` values in {0, 1/2^16, …, 1 - 1/2^16}, a hash of (element index, key) for the indices
/// `offset..offset + n`: 32-bit words mixed by multiplications with odd constants below 2^31 and
/// shift-additions, all in i64 with every intermediate below 2^63.
fn uniform16(n: usize, offset: usize, key: u64, dev: &Device) -> Result<Tensor> {
    let word = scalar(WORD, DType::I64, dev)?;
    let (k0, k1) = (key & 0xFFFF_FFFF, key >> 32);
    let index = element_index(n, dev)?.affine(1.0, offset as f64)?;
    let mut h = wrap(&index.affine(1.0, k0 as f64)?, &word)?;
    for (mult, add) in
        [(0x2c1b_3c6d_u32, k1), (0x297a_2d39, k0 ^ 0x9e37_79b9), (0x6b43_a9b5, k1 ^ 0x7f4a_7c15)]
    {
        h = mix_shift(&h, 16, &word)?;
        h = wrap(&h.affine(f64::from(mult), add as f64)?, &word)?;
        h = mix_shift(&h, 15, &word)?;
    }
    // The top 16 bits, over 2^16.
    let top = h.broadcast_div(&scalar(65536.0, DType::I64, dev)?)?;
    Ok(top.to_dtype(DType::F32)?.affine(1.0 / 65536.0, 0.0)?)
}

/// 0, 1, …, n-1 (i64) on `dev`, built from two short ranges so that no tensor-sized index
/// vector crosses from the host.
fn element_index(n: usize, dev: &Device) -> Result<Tensor> {
    const COLS: usize = 4096;
    let rows = n.div_ceil(COLS).max(1);
    let row_start = Tensor::arange(0i64, rows as i64, dev)?.affine(COLS as f64, 0.0)?.reshape((rows, 1))?;
    let col = Tensor::arange(0i64, COLS as i64, dev)?.reshape((1, COLS))?;
    Ok(row_start.broadcast_add(&col)?.flatten_all()?.narrow(0, 0, n)?)
}
