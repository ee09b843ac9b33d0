//! Second-order and multistep k-diffusion samplers: Heun, DPM2, DPM2-ancestral and LMS, stepping
//! as diffusers' HeunDiscrete, KDPM2Discrete, KDPM2AncestralDiscrete and LMSDiscrete schedulers.
//!
//! Heun and the DPM2 pair call the model twice per step; like diffusers they list every model
//! call in `timesteps()` and alternate between a first-order call (even index) and a correction
//! call (odd index), keeping the first call's latent in between.

use candle_core::{Result, Tensor};

use super::sigmas::{denoised, log_sigma_table, scale_input, sigma_to_t, SigmaLadder};
use super::{NoiseSource, PredictionType, Sampler};

/// `[s0, s1, s1, s2, s2, …, last]`: every entry but the first and last twice.
fn interleave(v: &[f64]) -> Vec<f64> {
    let mut out = vec![v[0]];
    for x in &v[1..v.len() - 1] {
        out.extend([*x, *x]);
    }
    out.push(v[v.len() - 1]);
    out
}

pub struct Heun {
    timesteps: Vec<f64>,
    /// Interleaved sigmas, one per model call plus the final 0.
    sigmas: Vec<f64>,
    prediction: PredictionType,
    /// First-order derivative, step size and latent, kept for the correction call.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub fn new(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        let ladder = SigmaLadder::linspace(steps, ac);
        let mut timesteps = vec![ladder.timesteps[0]];
        for t in &ladder.timesteps[1..] {
            timesteps.extend([*t, *t]);
        }
        Heun { timesteps, sigmas: interleave(&ladder.sigmas), prediction, pending: None }
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sigmas.iter().cloned().fold(0.0, f64::max)
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        scale_input(x, self.sigmas[i])
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, _noise: &mut NoiseSource) -> Result<Tensor> {
        match self.pending.take() {
            None => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                // kohya turns clip_sample on, which Heun honours.
                let x0 = denoised(x, out, sigma, self.prediction)?.clamp(-1f32, 1f32)?;
                let derivative = ((x - &x0)? / sigma)?;
                let dt = next - sigma;
                let prev = (x + (&derivative * dt)?)?;
                self.pending = Some((derivative, dt, x.clone()));
                Ok(prev)
            }
            Some((first_derivative, dt, first_x)) => {
                let next = self.sigmas[i];
                let x0 = denoised(x, out, next, self.prediction)?.clamp(-1f32, 1f32)?;
                let derivative = ((x - &x0)? / next)?;
                let mean = ((first_derivative + derivative)? / 2.0)?;
                first_x + (mean * dt)?
            }
        }
    }
}

/// The sigma arrays of diffusers' KDPM2 schedulers, one entry per model call.
struct Dpm2Ladder {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
}

impl Dpm2Ladder {
    fn new(steps: usize, ancestral: bool, ac: &[f32]) -> Self {
        let ladder = SigmaLadder::linspace(steps, ac);
        let s: Vec<f32> = ladder.sigmas.iter().map(|&v| v as f32).collect();
        let n = s.len();
        let next = |i: usize| if i + 1 < n { s[i + 1] } else { 0.0 };
        let up: Vec<f32> = (0..n)
            .map(|i| (next(i).powi(2) * (s[i].powi(2) - next(i).powi(2)) / s[i].powi(2)).sqrt())
            .collect();
        let mut down: Vec<f32> = (0..n).map(|i| (next(i).powi(2) - up[i].powi(2)).sqrt()).collect();
        down[n - 1] = 0.0;
        // Geometric midpoint in log space between each sigma and its partner: the next
        // sigma_down for the ancestral sampler, the previous sigma (wrapping round) for DPM2.
        // torch.lerp at weight 0.5 computes `end - (end - start) * 0.5`; with a zero sigma on
        // one side that form decides whether the result is 0 or NaN, so keep it.
        let lerp_log = |a: f32, b: f32| {
            let (la, lb) = (a.ln(), b.ln());
            (lb - (lb - la) * 0.5).exp()
        };
        let mut interpol: Vec<f32> = if ancestral {
            (0..n).map(|i| lerp_log(s[i], down[i])).collect()
        } else {
            (0..n).map(|i| lerp_log(s[i], s[(i + n - 1) % n])).collect()
        };
        if ancestral {
            interpol[n - 2] = 0.0;
            interpol[n - 1] = 0.0;
        }
        let log_sigmas = log_sigma_table(ac);
        let t_interpol: Vec<f64> = interpol.iter().map(|&v| sigma_to_t(v, &log_sigmas) as f64).collect();
        let mut timesteps = vec![ladder.timesteps[0]];
        let partners = if ancestral { &t_interpol[..n - 2] } else { &t_interpol[1..n - 1] };
        for (ti, t) in partners.iter().zip(&ladder.timesteps[1..]) {
            timesteps.extend([*ti, *t]);
        }
        let widen = |v: &[f32]| interleave(&v.iter().map(|&x| x as f64).collect::<Vec<_>>());
        Dpm2Ladder {
            timesteps,
            sigmas: widen(&s),
            sigmas_interpol: widen(&interpol),
            sigmas_up: widen(&up),
            sigmas_down: widen(&down),
        }
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sigmas.iter().cloned().fold(0.0, f64::max)
    }
}

/// diffusers' KDPM2Discrete and, with `ancestral`, KDPM2AncestralDiscrete: the same two-call
/// step, except that the ancestral one corrects towards `sigma_down` and adds `sigma_up` of fresh
/// noise, and reads its interpolated sigmas one entry earlier.
pub struct KDpm2 {
    ladder: Dpm2Ladder,
    prediction: PredictionType,
    ancestral: bool,
    /// The latent of the first-order call, kept for the correction call.
    first_x: Option<Tensor>,
}

impl KDpm2 {
    pub fn new(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        KDpm2 { ladder: Dpm2Ladder::new(steps, false, ac), prediction, ancestral: false, first_x: None }
    }

    pub fn ancestral(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        KDpm2 { ladder: Dpm2Ladder::new(steps, true, ac), prediction, ancestral: true, first_x: None }
    }

    /// The interpolated sigma paired with the first-order call at `i`.
    fn interpol(&self, i: usize) -> f64 {
        self.ladder.sigmas_interpol[if self.ancestral { i } else { i + 1 }]
    }
}

impl Sampler for KDpm2 {
    fn timesteps(&self) -> &[f64] {
        &self.ladder.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.ladder.init_noise_sigma()
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = if self.first_x.is_none() { self.ladder.sigmas[i] } else { self.interpol(i - 1) };
        scale_input(x, sigma)
    }

    fn step(&mut self, out: &Tensor, i: usize, x: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        match self.first_x.take() {
            None => {
                let (sigma, interpol) = (self.ladder.sigmas[i], self.interpol(i));
                let x0 = denoised(x, out, sigma, self.prediction)?;
                let derivative = ((x - &x0)? / sigma)?;
                self.first_x = Some(x.clone());
                x + (derivative * (interpol - sigma))?
            }
            Some(first_x) => {
                let l = &self.ladder;
                let (sigma, interpol) = (l.sigmas[i - 1], self.interpol(i - 1));
                let x0 = denoised(x, out, interpol, self.prediction)?;
                let derivative = ((x - &x0)? / interpol)?;
                if self.ancestral {
                    let (up, down) = (l.sigmas_up[i - 1], l.sigmas_down[i - 1]);
                    let prev = (first_x + (derivative * (down - sigma))?)?;
                    prev + (noise(x.dims())? * up)?
                } else {
                    first_x + (derivative * (l.sigmas[i] - sigma))?
                }
            }
        }
    }
}

/// Linear multistep (order 4): combines the last derivatives with coefficients that integrate
/// their Lagrange interpolant over the next sigma interval.
pub struct Lms {
    ladder: SigmaLadder,
    prediction: PredictionType,
    derivatives: Vec<Tensor>,
}

const LMS_ORDER: usize = 4;

impl Lms {
    pub fn new(steps: usize, prediction: PredictionType, ac: &[f32]) -> Self {
        Lms { ladder: SigmaLadder::linspace(steps, ac), prediction, derivatives: Vec::new() }
    }

    /// ∫ over [σ_i, σ_{i+1}] of the Lagrange basis polynomial for derivative `current` (0 = newest).
    fn coefficient(&self, order: usize, i: usize, current: usize) -> f64 {
        let s = &self.ladder.sigmas;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s[i - k]) / (s[i - current] - s[i - k]))
                .product::<f64>()
        };
        // 4-point Gauss-Legendre is exact for these polynomials (degree ≤ 3).
        const NODES: [(f64, f64); 4] = [
            (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
            (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
        ];
        let (a, b) = (s[i], s[i + 1]);
        let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
        NODES.iter().map(|(x, w)| w * basis(mid + half * x)).sum::<f64>() * half
    }
}

impl Sampler for Lms {
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
        let sigma = self.ladder.sigmas[i];
        let x0 = denoised(x, out, sigma, self.prediction)?;
        self.derivatives.push(((x - &x0)? / sigma)?);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(LMS_ORDER);
        let mut prev = x.clone();
        for (current, derivative) in self.derivatives.iter().rev().enumerate().take(order) {
            prev = (prev + (derivative * self.coefficient(order, i, current))?)?;
        }
        Ok(prev)
    }
}
