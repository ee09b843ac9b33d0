//! Lion as lion-pytorch's `update_fn` (decoupled weight decay, sign of the interpolated momentum).

use super::{OptimizerConfig, ParamState};
use crate::error::Result;

pub(crate) fn step(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &mut [f32],
    g: &[f32],
    lr: f64,
) -> Result<()> {
    let n = w.len();
    let mut m = st.take_f32("exp_avg", n)?;
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let (b1, b2) = (c.betas.0 as f32, c.betas.1 as f32);
    let (w1, w2) = ((1.0 - c.betas.0) as f32, (1.0 - c.betas.1) as f32);
    let neg_lr = (-lr) as f32;
    for i in 0..n {
        w[i] *= decay;
        let u = m[i] * b1 + w1 * g[i];
        // torch.sgn: 0 stays 0.
        let s = if u > 0.0 {
            1.0
        } else if u < 0.0 {
            -1.0
        } else {
            0.0
        };
        w[i] += neg_lr * s;
        m[i] = m[i] * b2 + w2 * g[i];
    }
    st.put_f32("exp_avg", m);
    Ok(())
}
