//! Lookups: embedding, timestep embedding. Composed of candle primitives (their backward:
//! index-add for embedding), except the embedding table's gradient on the CPU in f32
//! ([`embedding_table_grad`]).

use crate::alloc::uninit_output;
use crate::backend;
use crate::cpu::{cpu_tensor, with_f32};
use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

/// Values per task of the table gradient's parallel zero fill.
const ZERO_CHUNK: usize = 1 << 16;

/// Row lookup: `ids` (u32, any shape) into `table` `[vocab, dim]`.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
}

/// The gradient of [`embedding`]'s `[vocab, dim]` table for the output gradient `g` `[N, dim]`
/// of the lookup of `ids` (u32 `[N]`): zeros, with row `i` of `g` added to row `ids[i]`, rows
/// taken in order (candle's `zeros` + `index_add`, bit for bit).
///
/// On the CPU in f32 that is one buffer zero-filled in parallel and the `N` rows added in place:
/// candle's `index_add` copied its zero-filled input into a second buffer first, two serial
/// passes over a 152 MB table (CLIP-L's 49408 x 768) on the main thread each step.
pub fn embedding_table_grad(ids: &Tensor, g: &Tensor, vocab: usize) -> Result<Tensor> {
    let (n, dim) = g.dims2()?;
    if ids.dims() != [n] {
        bail!(
            "embedding gradient: ids have shape {:?}, expected [{n}] (one per row of the gradient)",
            ids.dims()
        );
    }
    if !(backend::has_kernels(g.device()) && g.dtype() == DType::F32 && ids.dtype() == DType::U32) {
        return Tensor::zeros((vocab, dim), g.dtype(), g.device())?.index_add(ids, g, 0);
    }
    let ids = ids.to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("embedding gradient: id {bad} is outside the table of {vocab} rows");
    }
    // SAFETY: the parallel fill below writes every value before anything reads the buffer.
    let mut table = unsafe { uninit_output(vocab * dim) };
    table.par_chunks_mut(ZERO_CHUNK).for_each(|c| c.fill(0.0));
    with_f32(g, |g| {
        for (row, &id) in g.chunks_exact(dim.max(1)).zip(&ids) {
            let start = id as usize * dim;
            for (t, &v) in table[start..start + dim].iter_mut().zip(row) {
                *t += v;
            }
        }
        Ok(())
    })?;
    cpu_tensor(table, (vocab, dim), DType::F32)
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
