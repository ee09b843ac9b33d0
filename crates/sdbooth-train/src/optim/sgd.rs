//! SGD with Nesterov momentum as torch.optim.SGD(nesterov=True, dampening=0).

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
    // torch clones the first gradient into the buffer instead of decaying a zero buffer.
    let first = !st.bufs.contains_key("momentum_buffer");
    let mut buf = st.take_f32("momentum_buffer", n)?;
    let mu = c.momentum as f32;
    let wd = c.weight_decay as f32;
    let neg_lr = (-lr) as f32;
    w.par_chunks_mut(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)).zip(buf.par_chunks_mut(PAR_CHUNK)).for_each(
        |((w, g), buf)| {
            for ((w, &g), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
                let g = g * gs;
                let d = if wd != 0.0 { g + wd * *w } else { g };
                *b = if first { d } else { *b * mu + d };
                *w += neg_lr * (d + mu * *b);
            }
        },
    );
    st.put_f32("momentum_buffer", buf);
    Ok(())
}
