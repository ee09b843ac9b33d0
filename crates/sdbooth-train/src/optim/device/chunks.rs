//! Elementwise updates of a large tensor, chunk by chunk: each operation of an update allocates
//! a tensor-sized temporary, so a 15M-value convolution kernel updated whole would hold about a
//! dozen of them at once (~0.7 GB in f32); by chunks of 2^20 values they stay ~4 MB each. The
//! chunk results are copied into the new weights and state buffers, so the peak is the old and
//! the new state plus one chunk's temporaries. Chunks are whole AdamW8bit blocks (256 values),
//! and every value is updated independently of the others, so results do not depend on the split.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::take;
use crate::error::{Result, TrainError};
use crate::optim::adamw8bit::BLOCK;
use crate::optim::{ParamState, StateBuf};

/// Values per chunk (a multiple of `BLOCK`).
pub(super) const CHUNK: usize = 1 << 20;

/// Where a state buffer's values sit relative to the weights: one per weight, or one per block.
#[derive(Clone, Copy)]
enum Stride {
    PerValue,
    PerBlock,
}

impl Stride {
    fn range(self, offset: usize, len: usize) -> (usize, usize) {
        match self {
            Stride::PerValue => (offset, len),
            Stride::PerBlock => (offset / BLOCK, len.div_ceil(BLOCK)),
        }
    }
    fn total(self, n: usize) -> usize {
        self.range(0, n).1
    }
}

/// Runs `update` (state of the chunk's values, weights, gradient, offset of the chunk's first
/// value → new weights) over `w` and `g` by chunks of `CHUNK` values, assembling the new weights
/// (in the dtype `update` returns) and state. A tensor of at most one chunk is updated in one call.
pub(super) fn by_chunks(
    st: &mut ParamState,
    w: &Tensor,
    g: &Tensor,
    mut update: impl FnMut(&mut ParamState, &Tensor, &Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, dev) = (w.elem_count(), w.device().clone());
    if n <= CHUNK {
        return update(st, w, g, 0);
    }
    // Every existing buffer as a tensor on the device (a state read from a file is on the host).
    let keys: Vec<String> = st.bufs.keys().cloned().collect();
    let mut old: BTreeMap<String, (Tensor, Stride)> = BTreeMap::new();
    for key in keys {
        let len = st.bufs.get(&key).map_or(0, StateBuf::len);
        let dtype = match st.bufs.get(&key) {
            Some(StateBuf::U8(_)) => DType::U8,
            Some(StateBuf::Tensor(t)) => t.dtype(),
            _ => DType::F32,
        };
        let stride = if len == n { Stride::PerValue } else { Stride::PerBlock };
        if len != stride.total(n) {
            return Err(crate::optim::mismatched_buffer(&key, format!("{len} values for {n} weights")));
        }
        old.insert(key.clone(), (take(st, &key, dtype, len, &dev)?, stride));
    }
    let mut new_w: Option<Tensor> = None;
    let mut new: BTreeMap<String, (Tensor, Stride)> = BTreeMap::new();
    for offset in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - offset);
        let mut part = ParamState { step: st.step, bufs: BTreeMap::new(), last_lr: st.last_lr };
        for (key, (t, stride)) in &old {
            let (start, count) = stride.range(offset, len);
            part.bufs.insert(key.clone(), StateBuf::Tensor(t.narrow(0, start, count)?));
        }
        let chunk = update(&mut part, &w.narrow(0, offset, len)?, &g.narrow(0, offset, len)?, offset)?;
        let full = match &new_w {
            Some(full) => full,
            None => new_w.insert(Tensor::zeros(n, chunk.dtype(), &dev)?),
        };
        full.slice_set(&chunk, 0, offset)?;
        st.last_lr = part.last_lr;
        for (key, buf) in part.bufs {
            let StateBuf::Tensor(t) = buf else {
                return Err(TrainError::Internal(format!("optimizer state {key} left on the host")));
            };
            if !new.contains_key(&key) {
                // The first chunk is a whole CHUNK (> BLOCK values): its length tells the stride.
                let stride = if t.elem_count() == len { Stride::PerValue } else { Stride::PerBlock };
                new.insert(key.clone(), (Tensor::zeros(stride.total(n), t.dtype(), &dev)?, stride));
            }
            if let Some((full, stride)) = new.get(&key) {
                full.slice_set(&t, 0, stride.range(offset, len).0)?;
            }
        }
    }
    for (key, (t, _)) in new {
        st.bufs.insert(key, StateBuf::Tensor(t));
    }
    new_w.ok_or_else(|| TrainError::Internal("no chunk was updated".into()))
}
