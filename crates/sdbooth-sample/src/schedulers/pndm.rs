//! PNDM (diffusers' PNDMScheduler defaults: Runge-Kutta warm-up of 4 × 3 calls, then the
//! 4th-order linear multistep; "leading" timesteps; final alpha = alphas_cumprod[0]).

use candle_core::{Result, Tensor};

use super::{lin2, NoiseSource, PredictionType, Sampler};

pub struct Pndm {
    timesteps: Vec<f64>,
    prk_calls: usize,
    step_ratio: usize,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    /// Model outputs kept for the multistep formula (one per Runge-Kutta step, then per call).
    ets: Vec<Tensor>,
    /// Weighted sum of the Runge-Kutta stage outputs so far.
    rk_sum: Option<Tensor>,
    /// The latent at the start of the current Runge-Kutta step.
    rk_start: Option<Tensor>,
}

impl Pndm {
    pub fn new(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        let ratio = 1000 / steps;
        let base: Vec<i64> = (0..steps).map(|i| (i * ratio) as i64).collect();
        // Each of the last four timesteps twice, offset by half a step, then every value
        // doubled and trimmed so each Runge-Kutta step has stages at t, t-½, t-½, t-1.
        let tail = &base[base.len().saturating_sub(4)..];
        let half = (ratio / 2) as i64;
        let shifted: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
        let trimmed = &shifted[..shifted.len() - 1];
        let doubled: Vec<i64> = trimmed.iter().flat_map(|&t| [t, t]).collect();
        let mut prk: Vec<i64> = doubled[1..doubled.len() - 1].to_vec();
        prk.reverse();
        let plms: Vec<i64> = base[..base.len().saturating_sub(3)].iter().rev().cloned().collect();
        let prk_calls = prk.len();
        let timesteps = prk.into_iter().chain(plms).map(|t| t as f64).collect();
        Pndm {
            timesteps,
            prk_calls,
            step_ratio: ratio,
            alphas_cumprod: ac.to_vec(),
            prediction,
            ets: Vec::new(),
            rk_sum: None,
            rk_start: None,
        }
    }

    /// Moves `x` from timestep `t` to `prev` along the model's ε estimate (PNDM's transfer).
    fn transfer(&self, x: &Tensor, t: i64, prev: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = self.alphas_cumprod[t as usize] as f64;
        let a_prev =
            if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.alphas_cumprod[0] } as f64;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            PredictionType::Epsilon => eps.clone(),
            PredictionType::VPrediction => lin2(eps, a_t.sqrt(), x, b_t.sqrt())?,
        };
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        lin2(x, (a_prev / a_t).sqrt(), &eps, -(a_prev - a_t) / denom)
    }

    fn step_rk(&mut self, out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let half = (self.step_ratio / 2) as i64;
        let t_call = self.timesteps[i] as i64;
        let prev = if i % 2 == 1 { t_call } else { t_call - half };
        let t = self.timesteps[i / 4 * 4] as i64;
        let add = |sum: Option<Tensor>, w: f64| -> Result<Tensor> {
            let term = (out * w)?;
            match sum {
                Some(s) => s + term,
                None => Ok(term),
            }
        };
        let eps = match i % 4 {
            0 => {
                self.rk_sum = Some(add(None, 1.0 / 6.0)?);
                self.ets.push(out.clone());
                self.rk_start = Some(x.clone());
                out.clone()
            }
            1 | 2 => {
                self.rk_sum = Some(add(self.rk_sum.take(), 1.0 / 3.0)?);
                out.clone()
            }
            _ => add(self.rk_sum.take(), 1.0 / 6.0)?,
        };
        let start = self.rk_start.clone().unwrap_or_else(|| x.clone());
        self.transfer(&start, t, prev, &eps)
    }

    fn step_lms(&mut self, out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[i] as i64;
        let prev = t - self.step_ratio as i64;
        if self.ets.len() > 3 {
            self.ets.drain(..self.ets.len() - 3);
        }
        self.ets.push(out.clone());
        let e = &self.ets;
        let k = e.len();
        let eps = match k {
            1 => e[0].clone(),
            2 => lin2(&e[1], 1.5, &e[0], -0.5)?,
            3 => (lin2(&e[2], 23.0 / 12.0, &e[1], -16.0 / 12.0)? + (&e[0] * (5.0 / 12.0))?)?,
            _ => {
                let a = lin2(&e[k - 1], 55.0 / 24.0, &e[k - 2], -59.0 / 24.0)?;
                let b = lin2(&e[k - 3], 37.0 / 24.0, &e[k - 4], -9.0 / 24.0)?;
                (a + b)?
            }
        };
        self.transfer(x, t, prev, &eps)
    }
}

impl Sampler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        if i < self.prk_calls {
            self.step_rk(out, i, x)
        } else {
            self.step_lms(out, i, x)
        }
    }
}
