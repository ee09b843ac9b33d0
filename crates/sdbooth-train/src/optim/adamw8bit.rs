//! AdamW8bit as bitsandbytes' `kOptimizerStatic8bit2StateBlockwise` CUDA kernel computes it (the
//! implementation kohya users train with): both moments stored as 8-bit indices into bitsandbytes'
//! dynamic quantisation maps (signed for m, unsigned for v), one f32 absmax per block of 256
//! values. Each step dequantises a block, updates it in f32, takes the new block absmax and
//! re-quantises to the nearest map entry, keeping m's sign. Weight decay is applied after the Adam
//! step (multiplicative, as the kernel does). Gradient entries that are NaN/Inf leave the weight
//! unchanged and zero both moments. Tensors with fewer than `min_8bit_size` (4096) elements keep
//! 32-bit moments with the kernel's 32-bit formula, as bitsandbytes does.
//!
//! bitsandbytes' CPU backend differs in two details (weight decay before the step, and a 65536-bin
//! lookup table instead of exact nearest rounding); the golden test states the resulting bound.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::{OptimizerConfig, ParamState};
use crate::error::Result;

pub const BLOCK: usize = 256;

/// torch.linspace(0.1, 1, steps) in f32: an f32 step, each value computed from the nearer end with
/// one rounding (torch's kernel fuses the multiply-add); checked bit-exact against torch.
fn linspace(steps: usize) -> Vec<f32> {
    let (start, end) = (0.1f32, 1.0f32);
    let step = f64::from((end - start) / (steps - 1) as f32);
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                (f64::from(start) + step * i as f64) as f32
            } else {
                (f64::from(end) - step * (steps - i - 1) as f64) as f32
            }
        })
        .collect()
}

/// bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8).
pub fn create_dynamic_map(signed: bool) -> Vec<f32> {
    let (max_exp, total) = (7i32, 8i32);
    let non_sign = total - 1;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..max_exp {
        let items = if signed {
            (1 << (i + non_sign - max_exp)) + 1
        } else {
            (1 << (i + non_sign - max_exp + 1)) + 1
        };
        let b = linspace(items as usize);
        // Python multiplies the f32 tensor of means by a float: an f32 product.
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for k in 0..b.len() - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push(f64::from(scale * mean));
            if signed {
                data.push(f64::from(-scale * mean));
            }
        }
    }
    // additional_items = 2^(non_sign - max_exp) - 1 = 0 for the 8-bit maps.
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    let mut out: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    out.sort_by(f32::total_cmp);
    out
}

struct Map {
    code: Vec<f32>,
    /// Midpoints between neighbouring entries, in f32 as the kernel computes them.
    mid: Vec<f32>,
    /// For each value of the top 16 bits of an f32, the nearest-entry indices at both ends of
    /// that bucket of floats. Nearest rounding is monotone, so any float in the bucket maps
    /// between them: usually they agree and no search is needed (exact, unlike a binned table).
    bucket: Vec<(u8, u8)>,
}

impl Map {
    fn new(signed: bool) -> Self {
        let code = create_dynamic_map(signed);
        let mid: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let search = |x: f32| mid.partition_point(|&m| m < x) as u8;
        let bucket = (0u32..1 << 16)
            .map(|k| {
                let (a, b) = (f32::from_bits(k << 16), f32::from_bits(k << 16 | 0xFFFF));
                if a.is_nan() || b.is_nan() {
                    return (0, 0);
                }
                let (i, j) = (search(a), search(b));
                (i.min(j), i.max(j))
            })
            .collect();
        Map { code, mid, bucket }
    }
    /// Nearest entry; a value exactly on a midpoint goes to the lower entry.
    fn quantize(&self, x: f32) -> u8 {
        let (lo, hi) = self.bucket[(x.to_bits() >> 16) as usize];
        if lo == hi {
            return lo;
        }
        let (lo, hi) = (lo as usize, hi as usize);
        (lo + self.mid[lo..hi].partition_point(|&m| m < x)) as u8
    }
}

fn maps() -> &'static (Map, Map) {
    static MAPS: OnceLock<(Map, Map)> = OnceLock::new();
    MAPS.get_or_init(|| (Map::new(true), Map::new(false)))
}

pub(crate) fn step(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &mut [f32],
    g: &[f32],
    gs: f32,
    lr: f64,
) -> Result<()> {
    let n = w.len();
    let (b1, b2) = (c.betas.0 as f32, c.betas.1 as f32);
    let t = st.step as i32;
    let correction1 = 1.0 - b1.powi(t);
    let correction2 = (1.0 - b2.powi(t)).sqrt();
    let lr32 = lr as f32;
    let step_size = -lr32 * correction2 / correction1;
    let eps = c.eps as f32;
    let decay = if c.weight_decay > 0.0 { Some(1.0 - lr32 * c.weight_decay as f32) } else { None };
    let upd = move |w: &mut f32, g: f32, s1: &mut f32, s2: &mut f32| {
        let g = g * gs;
        if !g.is_finite() {
            *s1 = 0.0;
            *s2 = 0.0;
            return;
        }
        *s2 = *s2 * b2 + (1.0 - b2) * g * g;
        *s1 = *s1 * b1 + (1.0 - b1) * g;
        *w += step_size * (*s1 / (s2.sqrt() + correction2 * eps));
        if let Some(d) = decay {
            *w *= d;
        }
    };

    if n < c.min_8bit_size {
        let mut m = st.take_f32("state1", n)?;
        let mut v = st.take_f32("state2", n)?;
        for i in 0..n {
            upd(&mut w[i], g[i], &mut m[i], &mut v[i]);
        }
        st.put_f32("state1", m);
        st.put_f32("state2", v);
        return Ok(());
    }

    let blocks = n.div_ceil(BLOCK);
    let mut q1 = st.take_u8("state1", n)?;
    let mut q2 = st.take_u8("state2", n)?;
    let mut a1 = st.take_f32("absmax1", blocks)?;
    let mut a2 = st.take_f32("absmax2", blocks)?;
    let (m1, m2) = maps();
    w.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .zip(q1.par_chunks_mut(BLOCK).zip(q2.par_chunks_mut(BLOCK)))
        .zip(a1.par_iter_mut().zip(a2.par_iter_mut()))
        .for_each(|(((w, g), (q1, q2)), (a1, a2))| {
            let mut s1 = [0f32; BLOCK];
            let mut s2 = [0f32; BLOCK];
            let (mut max1, mut max2) = (0f32, 0f32);
            for i in 0..w.len() {
                s1[i] = m1.code[q1[i] as usize] * *a1;
                s2[i] = m2.code[q2[i] as usize] * *a2;
                upd(&mut w[i], g[i], &mut s1[i], &mut s2[i]);
                max1 = max1.max(s1[i].abs());
                max2 = max2.max(s2[i].abs());
            }
            *a1 = max1;
            *a2 = max2;
            // The kernel divides with __fdividef, i.e. multiplies by the reciprocal; so do we (and
            // save two divisions per value). An all-zero block has absmax 0: its values quantise
            // from 0.0 instead of NaN.
            let inv1 = if max1 > 0.0 { 1.0 / max1 } else { 0.0 };
            let inv2 = if max2 > 0.0 { 1.0 / max2 } else { 0.0 };
            for i in 0..w.len() {
                let x1 = s1[i] * inv1;
                let x2 = s2[i] * inv2;
                let mut c1 = m1.quantize(x1);
                // Keep m's sign through quantisation (the kernel's rule; v is never negative).
                if m1.code[c1 as usize].is_sign_negative() != s1[i].is_sign_negative() {
                    c1 = if s1[i] > 0.0 { c1.saturating_add(1) } else { c1.saturating_sub(1) };
                }
                q1[i] = c1;
                q2[i] = m2.quantize(x2);
            }
        });
    st.put_u8("state1", q1);
    st.put_u8("state2", q2);
    st.put_f32("absmax1", a1);
    st.put_f32("absmax2", a2);
    Ok(())
}
