//! Lion as lion-pytorch's `update_fn` (decoupled weight decay, sign of the interpolated momentum).

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
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let (b1, b2) = (c.betas.0 as f32, c.betas.1 as f32);
    let (w1, w2) = ((1.0 - c.betas.0) as f32, (1.0 - c.betas.1) as f32);
    let neg_lr = (-lr) as f32;
    w.par_chunks_mut(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)).zip(m.par_chunks_mut(PAR_CHUNK)).for_each(
        |((w, g), m)| {
            for ((w, &g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
                let g = g * gs;
                let u = *m * b1 + w1 * g;
                // torch.sgn: 0 stays 0.
                let s = if u > 0.0 {
                    1.0
                } else if u < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                *w = *w * decay + neg_lr * s;
                *m = *m * b2 + w2 * g;
            }
        },
    );
    st.put_f32("exp_avg", m);
    Ok(())
}
