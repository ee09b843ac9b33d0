//! DPM-Solver / DPM-Solver++, second order, multistep and singlestep (diffusers'
//! DPMSolverMultistepScheduler and DPMSolverSinglestepScheduler with their defaults: midpoint
//! solver, lower-order final steps, "linspace" integer timesteps).
//!
//! diffusers 0.32 refuses `algorithm_type="dpmsolver"` with its default zero final sigma, so
//! kohya's `--sample_sampler dpmsolver` fails there; we end that variant at the smallest training
//! sigma, which is what diffusers' error message asks for.

use candle_core::{Result, Tensor};

use super::sigmas::interp;
use super::{lin2, NoiseSource, PredictionType, Sampler};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DpmAlgorithm {
    /// Solves for the noise prediction (the original DPM-Solver).
    Noise,
    /// Solves for the data prediction (DPM-Solver++).
    Data,
}

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    algorithm: DpmAlgorithm,
    prediction: PredictionType,
    /// Converted outputs of the last two calls, newest last.
    history: Vec<Tensor>,
    zero_final_sigma: bool,
}

/// `(alpha_t, sigma_t, lambda_t)` of the VP process at k-diffusion noise level `sigma`.
fn vp(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

impl DpmSolverMultistep {
    pub fn new(steps: usize, algorithm: DpmAlgorithm, prediction: PredictionType, ac: &[f32]) -> Self {
        let zero_final_sigma = algorithm == DpmAlgorithm::Data;
        let (timesteps, sigmas) = schedule(steps, zero_final_sigma, ac);
        DpmSolverMultistep { timesteps, sigmas, algorithm, prediction, history: Vec::new(), zero_final_sigma }
    }
}

/// Integer timesteps and their sigmas, ending at 0 or at the smallest training sigma.
fn schedule(steps: usize, zero_final_sigma: bool, ac: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let table: Vec<f64> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt() as f64).collect();
    // np.linspace(0, 999, steps + 1).round() (ties to even), reversed, without the 0.
    let timesteps: Vec<f64> =
        (1..=steps).rev().map(|i| (999.0 * i as f64 / steps as f64).round_ties_even()).collect();
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(&table, t) as f32 as f64).collect();
    sigmas.push(if zero_final_sigma { 0.0 } else { ((1.0 - ac[0]) / ac[0]).sqrt() as f64 });
    (timesteps, sigmas)
}

/// The model output in the form the algorithm integrates: x0 for ++, ε otherwise.
fn convert(
    algorithm: DpmAlgorithm,
    prediction: PredictionType,
    out: &Tensor,
    x: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    let (alpha, s, _) = vp(sigma);
    match (algorithm, prediction) {
        (DpmAlgorithm::Data, PredictionType::Epsilon) => lin2(x, 1.0 / alpha, out, -s / alpha),
        (DpmAlgorithm::Data, PredictionType::VPrediction) => lin2(x, alpha, out, -s),
        (DpmAlgorithm::Noise, PredictionType::Epsilon) => Ok(out.clone()),
        (DpmAlgorithm::Noise, PredictionType::VPrediction) => lin2(out, alpha, x, s),
    }
}

/// Coefficients of the sample and of the first-order model term for a step from sigma `from`
/// to sigma `to`, and the step's length `h` in log-SNR.
fn first_order(algorithm: DpmAlgorithm, from: f64, to: f64) -> (f64, f64, f64) {
    let (alpha_t, sigma_t, lambda_t) = vp(to);
    let (alpha_s, sigma_s, lambda_s) = vp(from);
    let h = lambda_t - lambda_s;
    match algorithm {
        DpmAlgorithm::Data => (sigma_t / sigma_s, -(alpha_t * ((-h).exp() - 1.0)), h),
        DpmAlgorithm::Noise => (alpha_t / alpha_s, -(sigma_t * (h.exp() - 1.0)), h),
    }
}

impl DpmSolverMultistep {
    /// The model output in the form the algorithm integrates: x0 for ++, ε otherwise.
    fn convert(&self, out: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        convert(self.algorithm, self.prediction, out, x, sigma)
    }
}

impl Sampler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        let m0 = self.convert(out, x, self.sigmas[i])?;
        self.history.push(m0.clone());
        if self.history.len() > 2 {
            self.history.remove(0);
        }
        let last_is_first_order = i == n - 1 && (n < 15 || self.zero_final_sigma);
        let (c_sample, c_model, h) = first_order(self.algorithm, self.sigmas[i], self.sigmas[i + 1]);
        if i == 0 || last_is_first_order {
            return lin2(x, c_sample, &m0, c_model);
        }
        let (_, _, lambda_s0) = vp(self.sigmas[i]);
        let (_, _, lambda_s1) = vp(self.sigmas[i - 1]);
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1 = ((&m0 - &self.history[0])? / r0)?;
        // Midpoint rule: half the first-order coefficient on the difference term.
        lin2(x, c_sample, &m0, c_model)? + (d1 * (0.5 * c_model))?
    }
}

/// Singlestep DPM-Solver++ (order 2): steps alternate between a first-order call, which also
/// remembers its latent, and a second-order call that restarts from that latent over both
/// intervals.
pub struct DpmSolverSinglestep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    orders: Vec<usize>,
    prediction: PredictionType,
    previous_output: Option<Tensor>,
    start: Option<Tensor>,
}

impl DpmSolverSinglestep {
    pub fn new(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        let (timesteps, sigmas) = schedule(steps, true, ac);
        // [1, 2] pairs, and the final step first order (diffusers' lower_order_final).
        let mut orders: Vec<usize> = (0..steps).map(|i| if i % 2 == 0 { 1 } else { 2 }).collect();
        if let Some(last) = orders.last_mut() {
            *last = 1;
        }
        DpmSolverSinglestep { timesteps, sigmas, orders, prediction, previous_output: None, start: None }
    }
}

impl Sampler for DpmSolverSinglestep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        let m0 = convert(DpmAlgorithm::Data, self.prediction, out, x, self.sigmas[i])?;
        let m1 = self.previous_output.replace(m0.clone());
        let second = match m1 {
            Some(m1) if self.orders[i] == 2 => Some(m1),
            _ => None,
        };
        let Some(m1) = second else {
            self.start = Some(x.clone());
            let (c_sample, c_model, _) = first_order(DpmAlgorithm::Data, self.sigmas[i], self.sigmas[i + 1]);
            return lin2(x, c_sample, &m0, c_model);
        };
        let start = self.start.clone().unwrap_or_else(|| x.clone());
        // Over both intervals, from the latent of the first-order call.
        let (c_sample, c_model, h) = first_order(DpmAlgorithm::Data, self.sigmas[i - 1], self.sigmas[i + 1]);
        let (_, _, lambda_s0) = vp(self.sigmas[i]);
        let (_, _, lambda_s1) = vp(self.sigmas[i - 1]);
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1 = ((&m0 - &m1)? / r0)?;
        lin2(&start, c_sample, &m1, c_model)? + (d1 * (0.5 * c_model))?
    }
}
