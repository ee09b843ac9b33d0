//! SGD with Nesterov momentum as torch.optim.SGD(nesterov=True, dampening=0).

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
    let first = !st.bufs.contains_key("momentum_buffer");
    let mut buf = st.take_f32("momentum_buffer", n)?;
    let mu = c.momentum as f32;
    let wd = c.weight_decay as f32;
    let neg_lr = (-lr) as f32;
    for i in 0..n {
        let d = if wd != 0.0 { g[i] + wd * w[i] } else { g[i] };
        // torch clones the first gradient into the buffer instead of decaying a zero buffer.
        buf[i] = if first { d } else { buf[i] * mu + d };
        let upd = d + mu * buf[i];
        w[i] += neg_lr * upd;
    }
    st.put_f32("momentum_buffer", buf);
    Ok(())
}
