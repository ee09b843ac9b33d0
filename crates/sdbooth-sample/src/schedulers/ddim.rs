//! DDIM (diffusers' DDIMScheduler with its defaults: "leading" timesteps, final alpha 1, eta 0)
//! with `clip_sample` on, as kohya sets it.

use candle_core::{Result, Tensor};

use super::{lin2, NoiseSource, PredictionType, Sampler};

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    step_ratio: usize,
    prediction: PredictionType,
}

impl Ddim {
    pub fn new(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        let step_ratio = 1000 / steps;
        let timesteps = (0..steps).rev().map(|i| (i * step_ratio) as f64).collect();
        Ddim { timesteps, alphas_cumprod: ac.to_vec(), step_ratio, prediction }
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let a_t = self.alphas_cumprod[t] as f64;
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(p) => self.alphas_cumprod[p] as f64,
            None => 1.0,
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => {
                (lin2(x, 1.0 / a_t.sqrt(), out, -(b_t.sqrt()) / a_t.sqrt())?, out.clone())
            }
            PredictionType::VPrediction => {
                (lin2(x, a_t.sqrt(), out, -b_t.sqrt())?, lin2(out, a_t.sqrt(), x, b_t.sqrt())?)
            }
        };
        let x0 = x0.clamp(-1f32, 1f32)?;
        lin2(&x0, a_prev.sqrt(), &eps, (1.0 - a_prev).sqrt())
    }
}
