//! Euler and Euler-ancestral (diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler
//! with their defaults: "linspace" timesteps, linear sigma interpolation, final sigma 0).

use candle_core::{Result, Tensor};

use super::{alphas_cumprod, lin2, NoiseSource, PredictionType, Sampler};

/// The k-diffusion sigma ladder: `steps` timesteps evenly spaced over [999, 0], sigmas
/// interpolated from the training schedule, then a final 0.
pub(crate) struct SigmaLadder {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
}

impl SigmaLadder {
    pub fn linspace(steps: usize) -> Self {
        let table: Vec<f64> =
            alphas_cumprod().iter().map(|&a| (((1.0 - a) / a) as f32).sqrt() as f64).collect();
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
fn interp(table: &[f64], t: f64) -> f64 {
    let lo = (t.floor() as usize).min(table.len() - 1);
    let hi = (lo + 1).min(table.len() - 1);
    let frac = t - lo as f64;
    table[lo] + (table[hi] - table[lo]) * frac
}

/// The model's estimate of the clean latent, from its output at noise level `sigma`.
fn denoised(x: &Tensor, out: &Tensor, sigma: f64, prediction: PredictionType) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => lin2(x, 1.0, out, -sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(out, -sigma / s2.sqrt(), x, 1.0 / s2)
        }
    }
}

fn scale_input(x: &Tensor, sigma: f64) -> Result<Tensor> {
    x / (sigma * sigma + 1.0).sqrt()
}

pub struct Euler {
    ladder: SigmaLadder,
    prediction: PredictionType,
}

impl Euler {
    pub fn new(steps: usize, prediction: PredictionType) -> Self {
        Euler { ladder: SigmaLadder::linspace(steps), prediction }
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.ladder.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.ladder.max_sigma()
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        scale_input(x, self.ladder.sigmas[i])
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let (sigma, next) = (self.ladder.sigmas[i], self.ladder.sigmas[i + 1]);
        let x0 = denoised(x, out, sigma, self.prediction)?;
        // x + (x - x0)/sigma * (next - sigma)
        let derivative = ((x - &x0)? / sigma)?;
        x + (derivative * (next - sigma))?
    }
}

pub struct EulerAncestral {
    ladder: SigmaLadder,
    prediction: PredictionType,
}

impl EulerAncestral {
    pub fn new(steps: usize, prediction: PredictionType) -> Self {
        EulerAncestral { ladder: SigmaLadder::linspace(steps), prediction }
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.ladder.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.ladder.max_sigma()
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        scale_input(x, self.ladder.sigmas[i])
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let (from, to) = (self.ladder.sigmas[i], self.ladder.sigmas[i + 1]);
        let x0 = denoised(x, out, from, self.prediction)?;
        // Split the step into a deterministic part down to sigma_down and fresh noise of sigma_up.
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = ((x - &x0)? / from)?;
        let prev = (x + (derivative * (sigma_down - from))?)?;
        let n = noise(x.dims())?;
        prev + (n * sigma_up)?
    }
}
