//! The sigma ladder shared by the k-diffusion style samplers (diffusers' Euler, Heun, LMS and
//! KDPM2 schedulers with their default "linspace" spacing).

use candle_core::{Result, Tensor};

use super::{lin2, PredictionType};

/// The k-diffusion sigma ladder: `steps` timesteps evenly spaced over [999, 0], sigmas
/// interpolated from the training schedule, then a final 0.
pub(crate) struct SigmaLadder {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
}

impl SigmaLadder {
    pub fn linspace(steps: usize, ac: &[f32]) -> Self {
        let table: Vec<f64> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt() as f64).collect();
        // np.linspace(0, 999, steps, dtype=float32), reversed.
        let timesteps: Vec<f64> = (0..steps)
            .rev()
            .map(|i| if steps == 1 { 0.0 } else { (999.0 * i as f64 / (steps - 1) as f64) as f32 as f64 })
            .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(&table, t) as f32 as f64).collect();
        sigmas.push(0.0);
        SigmaLadder { timesteps, sigmas }
    }

    pub fn max_sigma(&self) -> f64 {
        self.sigmas.iter().cloned().fold(0.0, f64::max)
    }
}

/// Linear interpolation into `table` at fractional index `t` (np.interp on 0..len).
pub(crate) fn interp(table: &[f64], t: f64) -> f64 {
    let lo = (t.floor() as usize).min(table.len() - 1);
    let hi = (lo + 1).min(table.len() - 1);
    let frac = t - lo as f64;
    table[lo] + (table[hi] - table[lo]) * frac
}

/// The model's estimate of the clean latent, from its output at noise level `sigma`.
pub(crate) fn denoised(x: &Tensor, out: &Tensor, sigma: f64, prediction: PredictionType) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => lin2(x, 1.0, out, -sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(out, -sigma / s2.sqrt(), x, 1.0 / s2)
        }
    }
}

pub(crate) fn scale_input(x: &Tensor, sigma: f64) -> Result<Tensor> {
    x / (sigma * sigma + 1.0).sqrt()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating linearly in
/// log-sigma between neighbouring table entries (diffusers' `_sigma_to_t`).
pub(crate) fn sigma_to_t(sigma: f32, log_sigmas: &[f32]) -> f32 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last table entry at or below `log_sigma` (0 when there is none).
    let below = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f32 + w * (low + 1) as f32
}

/// Natural log of each training-schedule sigma, in f32 as numpy computes it.
pub(crate) fn log_sigma_table(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|&a| ((1.0 - a) / a).sqrt().ln()).collect()
}
