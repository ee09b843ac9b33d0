//! AdamW as torch.optim.AdamW computes it on the CPU (single-tensor path, f32 arithmetic with
//! the scalars rounded to f32), so trajectories match PyTorch to rounding.

use rayon::prelude::*;

use super::{OptimizerConfig, ParamState, PAR_CHUNK};
use crate::error::Result;

pub(crate) fn step(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &mut [f32],
    g: &[f32],
    gs: f32,
    lr: f64,
) -> Result<()> {
    let n = w.len();
    let mut m = st.take_f32("exp_avg", n)?;
    let mut v = st.take_f32("exp_avg_sq", n)?;
    let (b1, b2) = c.betas;
    let t = st.step as i32;
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let w1 = (1.0 - b1) as f32;
    let b2f = b2 as f32;
    let w2 = (1.0 - b2) as f32;
    let bc1 = 1.0 - b1.powi(t);
    let bc2_sqrt = ((1.0 - b2.powi(t)).sqrt()) as f32;
    let neg_step = (-(lr / bc1)) as f32;
    let eps = c.eps as f32;
    w.par_chunks_mut(PAR_CHUNK)
        .zip(g.par_chunks(PAR_CHUNK))
        .zip(m.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks_mut(PAR_CHUNK)))
        .for_each(|((w, g), (m, v))| {
            // Zipped iterators (no bounds checks) and the lerp branch hoisted out of the loop, so
            // the compiler vectorises the body.
            let it = w.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut()));
            // torch's lerp: self + weight * (end - self) for weight < 0.5, else from the end.
            if w1 < 0.5 {
                for ((w, &g), (m, v)) in it {
                    let g = g * gs;
                    *m += w1 * (g - *m);
                    *v = *v * b2f + w2 * g * g;
                    *w = *w * decay + neg_step * (*m / (v.sqrt() / bc2_sqrt + eps));
                }
            } else {
                let w1c = 1.0 - w1;
                for ((w, &g), (m, v)) in it {
                    let g = g * gs;
                    *m = g - (g - *m) * w1c;
                    *v = *v * b2f + w2 * g * g;
                    *w = *w * decay + neg_step * (*m / (v.sqrt() / bc2_sqrt + eps));
                }
            }
        });
    st.put_f32("exp_avg", m);
    st.put_f32("exp_avg_sq", v);
    Ok(())
}
