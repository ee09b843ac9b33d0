//! Embeddings: the U-Net's timestep embedding (sinusoids + two linear layers) and CLIP's token +
//! position embeddings, with the latter's table gradients written directly.

use candle_core::Tensor;
use sdbooth_ops as ops;

use super::{join, linear_flops, push_linear, ParamShapes};
use crate::params::Weights;
use crate::ModelError;

/// diffusers' `Timesteps` (`time_proj`, no parameters) + `TimestepEmbedding` (`time_embedding`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TimestepEmbedding {
    /// Sinusoid width (the first block's channels).
    pub channels: usize,
    /// Embedding width (4 x channels).
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl TimestepEmbedding {
    pub fn params(&self, p: &str) -> ParamShapes {
        let mut v = Vec::new();
        push_linear(&mut v, &join(p, "time_embedding.linear_1"), self.dim, self.channels, true);
        push_linear(&mut v, &join(p, "time_embedding.linear_2"), self.dim, self.dim, true);
        v
    }

    /// Timesteps `[B]` (f32) → `[B, dim]`.
    pub fn forward(&self, w: &Weights, p: &str, t: &Tensor) -> Result<Tensor, ModelError> {
        // The sinusoids are computed in f32 and then cast, as diffusers does.
        let e = ops::timestep_embedding(t, self.channels, self.flip_sin_to_cos, self.freq_shift)?;
        let e = w.cast(&e)?;
        let (w1, b1) = w.gemm_wb(&join(p, "time_embedding.linear_1"))?;
        let (w2, b2) = w.gemm_wb(&join(p, "time_embedding.linear_2"))?;
        let h = ops::silu(&w1.linear(&e, Some(&b1))?)?;
        w2.linear(&h, Some(&b2))
    }

    /// Forward FLOPs per sample.
    pub fn flops(&self) -> f64 {
        linear_flops(self.dim, self.channels, 1.0) + linear_flops(self.dim, self.dim, 1.0)
    }
}

/// CLIP's `CLIPTextEmbeddings`: token table + position table (positions 0..T).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TextEmbeddings {
    pub vocab: usize,
    pub max_positions: usize,
    pub dim: usize,
}

pub(crate) const TOKEN_EMBEDDING: &str = "text_model.embeddings.token_embedding.weight";
pub(crate) const POSITION_EMBEDDING: &str = "text_model.embeddings.position_embedding.weight";

impl TextEmbeddings {
    /// (`text_model.embeddings.position_ids`, a buffer some checkpoints carry, is not a parameter.)
    pub fn params(&self) -> ParamShapes {
        vec![
            (TOKEN_EMBEDDING.to_string(), vec![self.vocab, self.dim]),
            (POSITION_EMBEDDING.to_string(), vec![self.max_positions, self.dim]),
        ]
    }

    /// Token ids `[N, T]` → `[N, T, dim]`.
    pub fn forward(&self, w: &Weights, ids: &Tensor) -> Result<Tensor, ModelError> {
        let t = ids.dim(1)?;
        let tok = ops::embedding(ids, &w.get(TOKEN_EMBEDDING)?)?;
        // position_ids are 0..T: a narrow of the table is the same lookup, cheaper.
        let pos = w.get(POSITION_EMBEDDING)?.narrow(0, 0, t)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// Gradients of the token and position tables from dLoss/d embeddings `g` `[N, T, D]`,
    /// written directly rather than through autograd: candle's `index_select` backward builds the
    /// dense vocab x D table gradient (152 MB for CLIP-L) several times over (zeros, index_add,
    /// and the leaf's zero accumulator plus a sum); here it is one zeroed table and one
    /// `index_add` ([`ops::embedding_table_grad`]). The gradients come back in each table's dtype.
    pub fn grads(&self, w: &Weights, ids: &Tensor, g: &Tensor) -> Result<Vec<(String, Tensor)>, ModelError> {
        let (n, t, d) = g.dims3()?;
        let tok = w.params.get(TOKEN_EMBEDDING)?;
        let pos = w.params.get(POSITION_EMBEDDING)?;
        let g_tok = g.to_dtype(tok.dtype())?.reshape((n * t, d))?;
        let tok_grad = ops::embedding_table_grad(&ids.flatten_all()?, &g_tok, tok.dim(0)?)?;
        // Every sample uses positions 0..T; rows T.. of the table get nothing.
        let pos_grad = g.to_dtype(pos.dtype())?.sum(0)?.pad_with_zeros(0, 0, pos.dim(0)? - t)?;
        Ok(vec![
            (TOKEN_EMBEDDING.to_string(), tok_grad.detach()),
            (POSITION_EMBEDDING.to_string(), pos_grad.detach()),
        ])
    }
}
