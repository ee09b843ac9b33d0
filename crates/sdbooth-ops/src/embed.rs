//! Lookups and reshaping ops: embedding, nearest upsampling, timestep embedding. Composed of
//! candle primitives (their backward: index-add for embedding, sum-pooling for upsampling).

use candle_core::{DType, Result, Tensor};

/// Row lookup: `ids` (u32, any shape) into `table` `[vocab, dim]`.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
}

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]`.
///
/// candle's backward of this op is a conv2d with a kernel of ones, which candle's CPU backend
/// cannot run in bf16/f16; other dtypes go through f32 (exact for the copy, and the gradient's
/// four-term sums are then done in f32).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if x.dtype() == DType::F32 {
        return x.upsample_nearest2d(h * 2, w * 2);
    }
    x.to_dtype(DType::F32)?.upsample_nearest2d(h * 2, w * 2)?.to_dtype(x.dtype())
}

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding`.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    // Arguments reach ~1000 rad; computing them in f64 (where the device has it) keeps the f32
    // result within one rounding of the exact value instead of losing ~1e-4 absolute.
    let dt = if t.device().is_metal() { DType::F32 } else { DType::F64 };
    let exponent: Vec<f64> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - downscale_freq_shift)).exp())
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?.to_dtype(dt)?;
    let args = t.to_dtype(dt)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[&cos, &sin], 1)? } else { Tensor::cat(&[&sin, &cos], 1)? };
    let emb = emb.to_dtype(DType::F32)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}
