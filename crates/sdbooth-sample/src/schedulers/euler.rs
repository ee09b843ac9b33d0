//! Euler and Euler-ancestral (diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler
//! with their defaults: "linspace" timesteps, linear sigma interpolation, final sigma 0).

use candle_core::{Result, Tensor};

use super::sigmas::{denoised, scale_input, SigmaLadder};
use super::{NoiseSource, PredictionType, Sampler};

/// Euler steps along the probability-flow ODE; the ancestral variant steps down to `sigma_down`
/// and adds fresh noise of `sigma_up`.
pub struct Euler {
    ladder: SigmaLadder,
    prediction: PredictionType,
    ancestral: bool,
}

impl Euler {
    /// `ac`: the schedule's ᾱ as samplers use it (`DdpmSchedule::alphas_cumprod_for_sampling`).
    pub fn new(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        Euler { ladder: SigmaLadder::linspace(steps, ac), prediction, ancestral: false }
    }

    pub fn ancestral(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        Euler { ladder: SigmaLadder::linspace(steps, ac), prediction, ancestral: true }
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

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let (from, to) = (self.ladder.sigmas[i], self.ladder.sigmas[i + 1]);
        let x0 = denoised(x, out, from, self.prediction)?;
        let derivative = ((x - &x0)? / from)?;
        if !self.ancestral {
            return x + (derivative * (to - from))?;
        }
        // Split the step into a deterministic part down to sigma_down and fresh noise of sigma_up.
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let prev = (x + (derivative * (sigma_down - from))?)?;
        let n = noise(x.dims())?;
        prev + (n * sigma_up)?
    }
}
