//! Inference samplers under kohya's `--sample_sampler` names, each stepping exactly as the
//! diffusers scheduler kohya picks for that name (with kohya's settings: SD's scaled_linear
//! schedule, `clip_sample` forced on where the scheduler has it).
//!
//! A sampler is driven call by call like a diffusers scheduler: for each entry `i` of
//! `timesteps()`, scale the latent with `scale_model_input(x, i)`, run the U-Net at
//! `timesteps()[i]`, and pass its output to `step(output, i, x, noise)`. Samplers that add
//! noise (ancestral ones) draw it through `noise`, so the caller owns the RNG stream.

mod ddim;
mod dpm_solver;
mod euler;
mod kdiffusion;
mod pndm;
mod sigmas;

use candle_core::{Result, Tensor};
use sdbooth_models::ddpm::DdpmSchedule;

pub use ddim::Ddim;
pub use dpm_solver::{DpmAlgorithm, DpmSolverMultistep, DpmSolverSinglestep};
pub use euler::Euler;
pub use kdiffusion::{Heun, KDpm2, Lms};
pub use pndm::Pndm;

/// Draws a standard-normal tensor of the given shape.
pub type NoiseSource<'a> = dyn FnMut(&[usize]) -> Result<Tensor> + 'a;

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

pub trait Sampler {
    /// The U-Net timestep of each model call, in order.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial noise latent (1 for the DDPM-style samplers).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The model input for call `i` (unscaled for the DDPM-style samplers).
    fn scale_model_input(&self, x: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// Advances the latent after call `i`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor>;
}

/// kohya's `--sample_sampler` names that sdbooth implements (aliases included).
pub const SAMPLER_NAMES: &[&str] = &[
    "ddim",
    "pndm",
    "lms",
    "k_lms",
    "euler",
    "k_euler",
    "euler_a",
    "k_euler_a",
    "heun",
    "dpm_2",
    "k_dpm_2",
    "dpm_2_a",
    "k_dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
];

/// Builds the sampler kohya uses for `name` with `steps` inference steps on SD's schedule.
pub fn sampler_by_name(
    name: &str,
    steps: usize,
    prediction: PredictionType,
) -> std::result::Result<Box<dyn Sampler>, String> {
    sampler_for_schedule(name, steps, prediction, &DdpmSchedule::sd())
}

/// Builds the sampler kohya uses for `name` on `schedule` (the trainer's, zero-terminal-SNR
/// included, for samples drawn during training).
pub fn sampler_for_schedule(
    name: &str,
    steps: usize,
    prediction: PredictionType,
    schedule: &DdpmSchedule,
) -> std::result::Result<Box<dyn Sampler>, String> {
    if steps == 0 {
        return Err("the number of sampling steps must be at least 1".into());
    }
    let ac = &schedule.alphas_cumprod_for_sampling();
    Ok(match name {
        "ddim" => Box::new(Ddim::new(steps, prediction, ac)),
        "euler" | "k_euler" => Box::new(Euler::new(steps, prediction, ac)),
        "euler_a" | "k_euler_a" => Box::new(Euler::ancestral(steps, prediction, ac)),
        "lms" | "k_lms" => Box::new(Lms::new(steps, prediction, ac)),
        "heun" => Box::new(Heun::new(steps, prediction, ac)),
        "dpm_2" | "k_dpm_2" => Box::new(KDpm2::new(steps, prediction, ac)),
        "dpm_2_a" | "k_dpm_2_a" => Box::new(KDpm2::ancestral(steps, prediction, ac)),
        "dpmsolver" => Box::new(DpmSolverMultistep::new(steps, DpmAlgorithm::Noise, prediction, ac)),
        "dpmsolver++" => Box::new(DpmSolverMultistep::new(steps, DpmAlgorithm::Data, prediction, ac)),
        "pndm" => Box::new(Pndm::new(steps, prediction, ac)),
        "dpmsingle" => Box::new(DpmSolverSinglestep::new(steps, prediction, ac)),
        other => {
            return Err(format!(
                "unknown sampler {other:?}; kohya's names are ddim, pndm, lms, euler, euler_a, heun, dpm_2, \
                 dpm_2_a, dpmsolver, dpmsolver++, dpmsingle and the k_ aliases"
            ))
        }
    })
}

/// `a*x + b*y` with scalar coefficients.
pub(crate) fn lin2(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    (x * a)? + (y * b)?
}
