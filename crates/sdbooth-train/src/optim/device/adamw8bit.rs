//! AdamW8bit as tensor operations, the algorithm of `optim/adamw8bit.rs` (bitsandbytes'
//! block-wise 8-bit kernel): moments stored as u8 indices into the same dynamic maps with one f32
//! absmax per block of 256 values, dequantised, updated in f32, re-quantised to the nearest map
//! entry keeping m's sign. The nearest entry is found by an 8-step binary search over the
//! midpoints between entries (one gather and one comparison per step), which picks exactly the
//! entry the host kernel picks for the same value (a value on a midpoint goes to the lower one).

use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};

use super::{add, mul, put, scalar, take};
use crate::error::{Result, TrainError};
use crate::optim::adamw8bit::{create_dynamic_map, BLOCK};
use crate::optim::{OptimizerConfig, ParamState};

/// A dynamic map on one device: its 256 entries and the 255 midpoints between neighbours
/// (padded with +inf to 256, never probed).
#[derive(Clone)]
struct Map {
    code: Tensor,
    mid: Tensor,
}

impl Map {
    fn new(signed: bool, device: &Device) -> Result<Self> {
        let code = create_dynamic_map(signed);
        // The host kernel's midpoints, in f32.
        let mut mid: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        mid.push(f32::INFINITY);
        Ok(Map { code: Tensor::from_vec(code, 256, device)?, mid: Tensor::from_vec(mid, 256, device)? })
    }

    /// The index (u32) of the nearest entry to each value of `x`: the number of midpoints below it.
    fn quantize(&self, x: &Tensor) -> Result<Tensor> {
        let mut pos = Tensor::zeros(x.elem_count(), DType::U32, x.device())?;
        for bit in [128u32, 64, 32, 16, 8, 4, 2, 1] {
            // pos stays below 256 - 2·bit before this step, so the probe is at most 254.
            let probe = pos.affine(1.0, f64::from(bit - 1))?;
            let below = self.mid.index_select(&probe, 0)?.lt(x)?;
            pos = below.where_cond(&pos.affine(1.0, f64::from(bit))?, &pos)?;
        }
        Ok(pos)
    }

    /// The entries at the u8 indices `q`, as f32.
    fn dequantize(&self, q: &Tensor) -> Result<Tensor> {
        Ok(self.code.index_select(&q.to_dtype(DType::U32)?, 0)?)
    }
}

/// The (signed, unsigned) maps on `device`, made once per device.
fn maps(device: &Device) -> Result<(Map, Map)> {
    static MAPS: OnceLock<Mutex<Vec<(Device, Map, Map)>>> = OnceLock::new();
    let cache = MAPS.get_or_init(|| Mutex::new(Vec::new()));
    let mut cache = cache.lock().map_err(|_| TrainError::Internal("AdamW8bit map cache poisoned".into()))?;
    if let Some((_, m1, m2)) = cache.iter().find(|(d, _, _)| d.same_device(device)) {
        return Ok((m1.clone(), m2.clone()));
    }
    let (m1, m2) = (Map::new(true, device)?, Map::new(false, device)?);
    cache.push((device.clone(), m1.clone(), m2.clone()));
    Ok((m1, m2))
}

/// The per-block absmax of `x` (n values, blocks of 256, the last one partial).
fn block_absmax(x: &Tensor, blocks: usize) -> Result<Tensor> {
    let n = x.elem_count();
    let padded = x.abs()?.pad_with_zeros(0, 0, blocks * BLOCK - n)?;
    Ok(padded.reshape((blocks, BLOCK))?.max(1)?)
}

/// One value per block repeated over its block's values (n of them).
fn per_value(per_block: &Tensor, n: usize) -> Result<Tensor> {
    let blocks = per_block.elem_count();
    let rep = per_block.reshape((blocks, 1))?.broadcast_as((blocks, BLOCK))?.flatten_all()?;
    Ok(rep.narrow(0, 0, n)?)
}

/// The Adam step with the moments in f32, as the host kernel's `upd`: returns (w, m, v). A
/// gradient value that is NaN or infinite leaves its weight unchanged and zeroes both moments.
#[allow(clippy::too_many_arguments)]
fn adam_update(
    c: &OptimizerConfig,
    step: u64,
    lr: f64,
    w: &Tensor,
    g: &Tensor,
    s1: &Tensor,
    s2: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b1, b2) = (c.betas.0 as f32, c.betas.1 as f32);
    let t = step as i32;
    let correction1 = 1.0 - b1.powi(t);
    let correction2 = (1.0 - b2.powi(t)).sqrt();
    let lr32 = lr as f32;
    let step_size = -lr32 * correction2 / correction1;
    let eps = c.eps as f32;
    // g · 0 is 0 for a finite value, NaN otherwise.
    let finite = g.affine(0.0, 0.0)?.broadcast_eq(&scalar(0.0, DType::F32, g.device())?)?;
    let s2n = (mul(s2, b2)? + mul(g, 1.0 - b2)?.mul(g)?)?;
    let s1n = (mul(s1, b1)? + mul(g, 1.0 - b1)?)?;
    let mut wn = (w + mul(&(&s1n / add(&s2n.sqrt()?, correction2 * eps)?)?, step_size)?)?;
    if c.weight_decay > 0.0 {
        wn = mul(&wn, 1.0 - lr32 * c.weight_decay as f32)?;
    }
    let zeros = g.zeros_like()?;
    Ok((finite.where_cond(&wn, w)?, finite.where_cond(&s1n, &zeros)?, finite.where_cond(&s2n, &zeros)?))
}

/// One step of the values `w` (a whole tensor, or a chunk of whole blocks of one): with 8-bit
/// moments when `quantized` (the whole tensor has at least `min_8bit_size` values), else 32-bit.
pub(super) fn step(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &Tensor,
    g: &Tensor,
    lr: f64,
    quantized: bool,
) -> Result<Tensor> {
    let (n, dev) = (w.elem_count(), w.device());
    if !quantized {
        let s1 = take(st, "state1", DType::F32, n, dev)?;
        let s2 = take(st, "state2", DType::F32, n, dev)?;
        let (w, s1, s2) = adam_update(c, st.step, lr, w, g, &s1, &s2)?;
        put(st, "state1", s1);
        put(st, "state2", s2);
        return Ok(w);
    }
    let blocks = n.div_ceil(BLOCK);
    let q1 = take(st, "state1", DType::U8, n, dev)?;
    let q2 = take(st, "state2", DType::U8, n, dev)?;
    let a1 = take(st, "absmax1", DType::F32, blocks, dev)?;
    let a2 = take(st, "absmax2", DType::F32, blocks, dev)?;
    let (m1, m2) = maps(dev)?;
    let s1 = m1.dequantize(&q1)?.mul(&per_value(&a1, n)?)?;
    let s2 = m2.dequantize(&q2)?.mul(&per_value(&a2, n)?)?;
    let (w, s1, s2) = adam_update(c, st.step, lr, w, g, &s1, &s2)?;
    let (a1, a2) = (block_absmax(&s1, blocks)?, block_absmax(&s2, blocks)?);
    // The kernel multiplies by the reciprocal of the absmax; an all-zero block quantises from 0.
    let inv = |a: &Tensor| -> Result<Tensor> {
        let zeros = a.zeros_like()?;
        Ok(a.broadcast_gt(&zeros)?.where_cond(&a.recip()?, &zeros)?)
    };
    let x1 = s1.mul(&per_value(&inv(&a1)?, n)?)?;
    let x2 = s2.mul(&per_value(&inv(&a2)?, n)?)?;
    let c1 = m1.quantize(&x1)?;
    // Keep m's sign through quantisation (the kernel's rule; v is never negative). A map entry
    // is negative or +0; 1/m < 0 tells a negative m, -0 included, as `is_sign_negative` does.
    let zero = scalar(0.0, DType::F32, dev)?;
    let code_negative = m1.dequantize(&c1)?.broadcast_lt(&zero)?;
    let m_negative = s1.recip()?.broadcast_lt(&zero)?;
    let flip = code_negative.ne(&m_negative)?;
    // Saturating at both ends of the map, as the kernel does.
    // (u32 arithmetic: no negative constant, no value below 0.)
    let one = scalar(1.0, DType::U32, dev)?;
    let up = c1.broadcast_add(&one)?.broadcast_minimum(&scalar(255.0, DType::U32, dev)?)?;
    let down = c1.broadcast_maximum(&one)?.broadcast_sub(&one)?;
    let moved = s1.broadcast_gt(&zero)?.where_cond(&up, &down)?;
    let c1 = flip.where_cond(&moved, &c1)?;
    put(st, "state1", c1.to_dtype(DType::U8)?);
    put(st, "state2", m2.quantize(&x2)?.to_dtype(DType::U8)?);
    put(st, "absmax1", a1);
    put(st, "absmax2", a2);
    Ok(w)
}
