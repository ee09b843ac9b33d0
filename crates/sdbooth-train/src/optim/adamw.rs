//! AdamW as torch.optim.AdamW computes it on the CPU (single-tensor path, f32 arithmetic with
//! the scalars rounded to f32), so trajectories match PyTorch to rounding.
//!
//! The update per value needs a square root and two divisions, which dominate its cost when the
//! loop is compiled for the baseline x86-64 target (4-wide SSE: ~3 cycles per value, about
//! 0.9 CPU-s per SD1.5 step). The same loop is therefore also compiled for AVX2 and AVX-512 and
//! picked at run time. Every variant gives the same bits: square roots and divisions are
//! correctly rounded at any vector width, and Rust never fuses a multiply and an add into an FMA.

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
    let s = Scalars::new(c, st.step as i32, gs, lr);
    let kernel = chunk_kernel();
    w.par_chunks_mut(PAR_CHUNK)
        .zip(g.par_chunks(PAR_CHUNK))
        .zip(m.par_chunks_mut(PAR_CHUNK).zip(v.par_chunks_mut(PAR_CHUNK)))
        .for_each(|((w, g), (m, v))| kernel(&s, w, g, m, v));
    st.put_f32("exp_avg", m);
    st.put_f32("exp_avg_sq", v);
    Ok(())
}

/// The step's constants, rounded to f32 as torch rounds them.
pub(crate) struct Scalars {
    /// Gradient scale (clipping, loss scaling).
    gs: f32,
    /// `1 - beta1`: the lerp weight of the first moment.
    w1: f32,
    b2: f32,
    /// `1 - beta2`.
    w2: f32,
    /// `1 - lr * weight_decay`.
    decay: f32,
    bc2_sqrt: f32,
    /// `-lr / (1 - beta1^t)`.
    neg_step: f32,
    eps: f32,
}

impl Scalars {
    pub(crate) fn new(c: &OptimizerConfig, t: i32, gs: f32, lr: f64) -> Self {
        let (b1, b2) = c.betas;
        let bc1 = 1.0 - b1.powi(t);
        Scalars {
            gs,
            w1: (1.0 - b1) as f32,
            b2: b2 as f32,
            w2: (1.0 - b2) as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            bc2_sqrt: ((1.0 - b2.powi(t)).sqrt()) as f32,
            neg_step: (-(lr / bc1)) as f32,
            eps: c.eps as f32,
        }
    }
}

/// Updates one chunk of weights `w` and moments `m`, `v` from gradients `g`.
pub(crate) type ChunkKernel = fn(&Scalars, &mut [f32], &[f32], &mut [f32], &mut [f32]);

/// The widest variant of [`update_chunk`] this CPU runs (all give the same bits).
pub(crate) fn chunk_kernel() -> ChunkKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above.
            return |s, w, g, m, v| unsafe { update_chunk_avx512(s, w, g, m, v) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected just above.
            return |s, w, g, m, v| unsafe { update_chunk_avx2(s, w, g, m, v) };
        }
    }
    update_chunk
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update_chunk_avx512(s: &Scalars, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    update_chunk(s, w, g, m, v)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn update_chunk_avx2(s: &Scalars, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    update_chunk(s, w, g, m, v)
}

/// torch's AdamW update of one chunk (inlined into each variant above, which the compiler then
/// vectorises at that variant's width).
#[inline(always)]
fn update_chunk(s: &Scalars, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    // Zipped iterators (no bounds checks) and the lerp branch hoisted out of the loop, so the
    // compiler vectorises the body.
    let it = w.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut()));
    let &Scalars { gs, w1, b2, w2, decay, bc2_sqrt, neg_step, eps } = s;
    // torch's lerp: self + weight * (end - self) for weight < 0.5, else from the end.
    if w1 < 0.5 {
        for ((w, &g), (m, v)) in it {
            let g = g * gs;
            *m += w1 * (g - *m);
            *v = *v * b2 + w2 * g * g;
            *w = *w * decay + neg_step * (*m / (v.sqrt() / bc2_sqrt + eps));
        }
    } else {
        let w1c = 1.0 - w1;
        for ((w, &g), (m, v)) in it {
            let g = g * gs;
            *m = g - (g - *m) * w1c;
            *v = *v * b2 + w2 * g * g;
            *w = *w * decay + neg_step * (*m / (v.sqrt() / bc2_sqrt + eps));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values spanning many magnitudes and both signs, with zeros (reproducible).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 97 == 0 {
                    return 0.0;
                }
                let mantissa = (x >> 9) as f32 / (1u32 << 23) as f32 - 0.5;
                mantissa * 2f32.powi((x % 40) as i32 - 30)
            })
            .collect()
    }

    /// The variant the CPU runs gives the baseline loop's bits, for both lerp branches and a
    /// length that leaves a remainder after every vector width.
    #[test]
    fn dispatched_kernel_matches_the_baseline_loop_bit_for_bit() {
        let n = 16 * 1024 + 13;
        for (beta1, t) in [(0.9, 1), (0.9, 7), (0.3, 3)] {
            let mut c = OptimizerConfig::new(super::super::OptimizerKind::AdamW);
            c.betas = (beta1, 0.999);
            let s = Scalars::new(&c, t, 0.75, 1e-3);
            let g = values(n, 1);
            let (mut w_a, mut m_a, mut v_a) = (values(n, 2), values(n, 3), values(n, 4));
            v_a.iter_mut().for_each(|v| *v = v.abs());
            let (mut w_b, mut m_b, mut v_b) = (w_a.clone(), m_a.clone(), v_a.clone());
            update_chunk(&s, &mut w_a, &g, &mut m_a, &mut v_a);
            chunk_kernel()(&s, &mut w_b, &g, &mut m_b, &mut v_b);
            for (name, a, b) in [("w", &w_a, &w_b), ("m", &m_a, &m_b), ("v", &v_a, &v_b)] {
                let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                assert_eq!(differ, 0, "beta1 {beta1}, t {t}: {differ} values of {name} differ");
            }
            assert!(w_a.iter().zip(&values(n, 2)).any(|(new, old)| new != old), "the update changed nothing");
        }
    }
}
