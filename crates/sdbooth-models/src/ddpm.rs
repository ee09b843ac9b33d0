//! The noise schedule of Stable Diffusion, the one place ᾱ_t is computed: diffusers'
//! DDPMScheduler as kohya builds it (`scaled_linear`, β 0.00085–0.012, 1000 steps), forward
//! noising, v-target, SNR (min-SNR weighting, debiased estimation), and the zero-terminal-SNR
//! rescale (`--zero_terminal_snr`). The trainer and every inference sampler take their ᾱ from
//! here, so samples drawn during training see the schedule the trainer trains with.
//!
//! Values are computed as PyTorch computes them (f32 linspace by fused multiply-add, f32 square,
//! cumulative product accumulated in f64), so they match diffusers' tensors bit for bit. diffusers'
//! inference schedulers (DDIM, Euler, DPM-Solver, ...) build the same f32 tensor the same way, so
//! one rounding serves both sides.

use candle_core::Tensor;

use crate::ModelError;

#[derive(Clone, Debug, PartialEq)]
pub struct DdpmSchedule {
    pub betas: Vec<f32>,
    /// ᾱ_t = Π_{s≤t} (1 − β_s).
    pub alphas_cumprod: Vec<f32>,
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU: the first half counts up from
/// `start`, the second half down from `end`; the step is f32 and each value one fused
/// multiply-add (what PyTorch's kernel compiles to here; bit-exact against its output).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod(1 - betas)`: PyTorch's CPU cumprod accumulates in f64 and stores f32.
fn cumprod_one_minus(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect()
}

impl DdpmSchedule {
    /// Stable Diffusion's training schedule.
    pub fn sd() -> Self {
        Self::scaled_linear(1000, 0.00085, 0.012)
    }

    /// β = linspace(√start, √end, n)².
    pub fn scaled_linear(n: usize, beta_start: f64, beta_end: f64) -> Self {
        let betas: Vec<f32> = linspace_f32(beta_start.sqrt() as f32, beta_end.sqrt() as f32, n)
            .into_iter()
            .map(|b| b * b)
            .collect();
        Self::from_betas(betas)
    }

    pub fn from_betas(betas: Vec<f32>) -> Self {
        let alphas_cumprod = cumprod_one_minus(&betas);
        DdpmSchedule { betas, alphas_cumprod }
    }

    /// The schedule the trainer uses: SD's, rescaled to zero terminal SNR when asked.
    pub fn for_training(zero_terminal_snr: bool) -> Self {
        let sd = Self::sd();
        if zero_terminal_snr {
            sd.with_zero_terminal_snr()
        } else {
            sd
        }
    }

    /// ᾱ as the inference samplers use it: diffusers' schedulers built with
    /// `rescale_betas_zero_snr` replace a terminal ᾱ of 0 by 2⁻²⁴ ("close to 0 without being 0,
    /// so the first sigma is not infinite"); otherwise the training values unchanged.
    pub fn alphas_cumprod_for_sampling(&self) -> Vec<f32> {
        let mut ac = self.alphas_cumprod.clone();
        if let Some(last) = ac.last_mut() {
            if *last == 0.0 {
                *last = 2f32.powi(-24);
            }
        }
        ac
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, as kohya applies it): shifts and
    /// scales √ᾱ so the last step has ᾱ = 0 (pure noise) while the first keeps its value.
    pub fn with_zero_terminal_snr(&self) -> Self {
        let sqrt_ab: Vec<f32> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let (a0, at) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
        let scale = a0 / (a0 - at);
        let ab: Vec<f32> = sqrt_ab
            .iter()
            .map(|s| {
                let s = (s - at) * scale;
                s * s
            })
            .collect();
        let mut betas = Vec::with_capacity(ab.len());
        betas.push(1.0 - ab[0]);
        for t in 1..ab.len() {
            betas.push(1.0 - ab[t] / ab[t - 1]);
        }
        Self::from_betas(betas)
    }

    fn at(&self, t: usize) -> Result<f32, ModelError> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            ModelError::BadInput(format!("timestep {t} outside 0..{}", self.alphas_cumprod.len()))
        })
    }

    /// ᾱ_t.
    pub fn alpha_bar(&self, t: usize) -> Result<f32, ModelError> {
        self.at(t)
    }

    /// √ᾱ_t.
    pub fn sqrt_alpha_prod(&self, t: usize) -> Result<f32, ModelError> {
        Ok(self.at(t)?.sqrt())
    }

    /// √(1 − ᾱ_t).
    pub fn sqrt_one_minus_alpha_prod(&self, t: usize) -> Result<f32, ModelError> {
        Ok((1.0 - self.at(t)?).sqrt())
    }

    /// Signal-to-noise ratio at timestep `t` (see [`snr_of`](Self::snr_of)).
    pub fn snr(&self, t: usize) -> Result<f32, ModelError> {
        Ok(Self::snr_of(self.at(t)?))
    }

    /// SNR = (√ᾱ / √(1 − ᾱ))² in f32, rounded as kohya's `prepare_scheduler_for_custom_training`
    /// computes it (min-SNR weighting, debiased estimation, v-pred-like loss scaling).
    pub fn snr_of(alpha_bar: f32) -> f32 {
        let r = alpha_bar.sqrt() / (1.0 - alpha_bar).sqrt();
        r * r
    }

    /// The forward-noising coefficients (√ᾱ, √(1 − ᾱ)): x_t = √ᾱ x_0 + √(1 − ᾱ) ε.
    pub fn noising_coefficients(alpha_bar: f32) -> (f32, f32) {
        (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt())
    }

    /// Per-sample coefficients `[B, 1, 1, ...]` broadcastable against `like`.
    fn coeffs(
        &self,
        like: &Tensor,
        timesteps: &[usize],
        f: impl Fn(f32) -> f32,
    ) -> Result<Tensor, ModelError> {
        let b = like.dim(0)?;
        if timesteps.len() != b {
            return Err(ModelError::BadInput(format!("{} timesteps for a batch of {b}", timesteps.len())));
        }
        let v = timesteps.iter().map(|&t| Ok(f(self.at(t)?))).collect::<Result<Vec<f32>, ModelError>>()?;
        let mut shape = vec![1usize; like.rank()];
        shape[0] = b;
        Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
    }

    /// x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor, ModelError> {
        let sa = self.coeffs(x0, timesteps, |a| Self::noising_coefficients(a).0)?;
        let so = self.coeffs(x0, timesteps, |a| Self::noising_coefficients(a).1)?;
        Ok((x0.broadcast_mul(&sa)? + noise.broadcast_mul(&so)?)?)
    }

    /// v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (diffusers' `get_velocity`).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor, ModelError> {
        let sa = self.coeffs(x0, timesteps, |a| Self::noising_coefficients(a).0)?;
        let so = self.coeffs(x0, timesteps, |a| Self::noising_coefficients(a).1)?;
        Ok((noise.broadcast_mul(&sa)? - x0.broadcast_mul(&so)?)?)
    }
}
