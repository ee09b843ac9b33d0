//! kohya's noise pipeline (`get_noise_noisy_latents_and_timesteps`): Gaussian noise, noise
//! offset (optionally random strength, adaptive to the latent mean), multires (pyramid) noise,
//! timestep sampling in [min_timestep, max_timestep), input-perturbation noise (ip_noise_gamma),
//! and the forward diffusion `add_noise`.
//!
//! Random numbers come from a `Draws` source in the same order kohya draws them, so a recorded
//! list of draws (tests) or a seeded stream (training) can drive it. The noise is drawn on the
//! host (the seeded stream) and uploaded; the latents are noised on their device, and only their
//! B·C channel means come back, for `--adaptive_noise_scale`.

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use sdbooth_models::ddpm::DdpmSchedule;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The random draws the pipeline makes.
pub trait Draws {
    /// `n` standard normal values (torch.randn).
    fn normal(&mut self, n: usize) -> Vec<f32>;
    /// One uniform value in [0, 1) (torch.rand(1) / Python's random.random()).
    fn uniform(&mut self) -> f64;
    /// One integer in [lo, hi) (torch.randint).
    fn randint(&mut self, lo: u64, hi: u64) -> u64;
}

impl Draws for ChaCha8Rng {
    fn normal(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(self)).collect()
    }
    fn uniform(&mut self) -> f64 {
        self.gen::<f64>()
    }
    fn randint(&mut self, lo: u64, hi: u64) -> u64 {
        self.gen_range(lo..hi)
    }
}

/// kohya's noise flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseArgs {
    pub noise_offset: Option<f64>,
    pub noise_offset_random_strength: bool,
    pub adaptive_noise_scale: Option<f64>,
    pub multires_noise_iterations: Option<usize>,
    pub multires_noise_discount: f64,
    pub ip_noise_gamma: Option<f64>,
    pub ip_noise_gamma_random_strength: bool,
    pub min_timestep: Option<u64>,
    pub max_timestep: Option<u64>,
}

impl Default for NoiseArgs {
    fn default() -> Self {
        NoiseArgs {
            noise_offset: None,
            noise_offset_random_strength: false,
            adaptive_noise_scale: None,
            multires_noise_iterations: None,
            // kohya's default for --multires_noise_discount.
            multires_noise_discount: 0.3,
            ip_noise_gamma: None,
            ip_noise_gamma_random_strength: false,
            min_timestep: None,
            max_timestep: None,
        }
    }
}

/// The result of one draw: the training target noise, the noised latents and the timesteps.
pub struct NoisedBatch {
    pub noise: Tensor,
    pub noisy_latents: Tensor,
    pub timesteps: Vec<u64>,
}

fn dims4(t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    Ok(t.dims4()?)
}

/// custom_train_functions.apply_noise_offset: noise + offset × N(0,1) per (sample, channel), the
/// offset raised by `adaptive_noise_scale` × |channel mean of the latents| (clamped at 0).
/// `channel_means` holds the B·C means ([`channel_means`]) when the scale is set.
pub fn apply_noise_offset(
    channel_means: &[f32],
    noise: &mut [f32],
    shape: (usize, usize, usize, usize),
    offset: f64,
    adaptive_noise_scale: Option<f64>,
    offset_noise: &[f32],
) {
    let (b, c, h, w) = shape;
    let hw = h * w;
    for bc in 0..b * c {
        let mut off = offset as f32;
        if let Some(a) = adaptive_noise_scale {
            off = (off + a as f32 * channel_means[bc].abs()).max(0.0);
        }
        let add = off * offset_noise[bc];
        noise[bc * hw..(bc + 1) * hw].iter_mut().for_each(|x| *x += add);
    }
}

/// The mean of each (sample, channel) plane of (B, C, H, W) latents, B·C values: summed in f64 on
/// the latents' device, so only the means come back to the host, not the latents.
pub fn channel_means(latents: &Tensor) -> Result<Vec<f32>> {
    let means = latents.to_dtype(DType::F64)?.mean((2, 3))?.flatten_all()?.to_vec1::<f64>()?;
    Ok(means.into_iter().map(|m| m as f32).collect())
}

/// torch's bilinear interpolation with align_corners=False, one (h, w) plane.
pub fn upsample_bilinear(src: &[f32], sh: usize, sw: usize, dh: usize, dw: usize) -> Vec<f32> {
    let coord = |i: usize, s: usize, d: usize| -> (usize, usize, f32) {
        let scale = s as f32 / d as f32;
        let x = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (x as usize).min(s - 1);
        let i1 = if i0 < s - 1 { i0 + 1 } else { i0 };
        (i0, i1, x - i0 as f32)
    };
    let mut out = vec![0f32; dh * dw];
    for y in 0..dh {
        let (y0, y1, ly) = coord(y, sh, dh);
        for x in 0..dw {
            let (x0, x1, lx) = coord(x, sw, dw);
            let top = (1.0 - lx) * src[y0 * sw + x0] + lx * src[y0 * sw + x1];
            let bot = (1.0 - lx) * src[y1 * sw + x0] + lx * src[y1 * sw + x1];
            out[y * dw + x] = (1.0 - ly) * top + ly * bot;
        }
    }
    out
}

/// custom_train_functions.pyramid_noise_like: adds upsampled lower-resolution noise with weights
/// discount^i at random scale factors r ∈ [2, 4), then rescales to unit (unbiased) std.
pub fn pyramid_noise(
    noise: &mut [f32],
    shape: (usize, usize, usize, usize),
    iterations: usize,
    discount: f64,
    draws: &mut impl Draws,
) {
    let (b, c, h, w) = shape;
    for i in 0..iterations {
        let r = draws.uniform() * 2.0 + 2.0;
        let f = r.powi(i as i32);
        let hn = ((h as f64 / f) as usize).max(1);
        let wn = ((w as f64 / f) as usize).max(1);
        let low = draws.normal(b * c * hn * wn);
        let d = discount.powi(i as i32) as f32;
        for bc in 0..b * c {
            let up = upsample_bilinear(&low[bc * hn * wn..(bc + 1) * hn * wn], hn, wn, h, w);
            for (x, u) in noise[bc * h * w..(bc + 1) * h * w].iter_mut().zip(up) {
                *x += u * d;
            }
        }
        if hn == 1 || wn == 1 {
            break;
        }
    }
    let n = noise.len() as f64;
    let mean = noise.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = noise.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let std = var.sqrt() as f32;
    noise.iter_mut().for_each(|x| *x /= std);
}

/// diffusers DDPMScheduler.add_noise: sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise per sample.
pub fn add_noise(
    x0: &[f32],
    noise: &[f32],
    per_sample: usize,
    timesteps: &[u64],
    alphas_cumprod: &[f32],
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(x0.len());
    for (i, &t) in timesteps.iter().enumerate() {
        let ac = *alphas_cumprod
            .get(t as usize)
            .ok_or_else(|| TrainError::Internal(format!("timestep {t} out of the schedule's range")))?;
        let (a, s) = DdpmSchedule::noising_coefficients(ac);
        let r = i * per_sample..(i + 1) * per_sample;
        out.extend(x0[r.clone()].iter().zip(&noise[r]).map(|(&x, &n)| a * x + s * n));
    }
    Ok(out)
}

/// The whole of kohya's get_noise_noisy_latents_and_timesteps, drawing in kohya's order.
pub fn noise_noisy_latents_and_timesteps(
    args: &NoiseArgs,
    latents: &Tensor,
    alphas_cumprod: &[f32],
    draws: &mut impl Draws,
) -> Result<NoisedBatch> {
    let shape = dims4(latents)?;
    let (b, c, h, w) = shape;
    let mut noise = draws.normal(b * c * h * w);
    if let Some(off) = args.noise_offset.filter(|&o| o != 0.0) {
        let off = if args.noise_offset_random_strength { draws.uniform() * off } else { off };
        let offset_noise = draws.normal(b * c);
        // Only the adaptive scale reads the latents: their B·C channel means, made on the device.
        let means = match args.adaptive_noise_scale {
            Some(_) => channel_means(latents)?,
            None => Vec::new(),
        };
        apply_noise_offset(&means, &mut noise, shape, off, args.adaptive_noise_scale, &offset_noise);
    }
    if let Some(it) = args.multires_noise_iterations.filter(|&i| i > 0) {
        pyramid_noise(&mut noise, shape, it, args.multires_noise_discount, draws);
    }
    let min_t = args.min_timestep.unwrap_or(0);
    let max_t = args.max_timestep.unwrap_or(alphas_cumprod.len() as u64);
    if max_t as usize > alphas_cumprod.len() || min_t > max_t {
        return Err(TrainError::Config(format!(
            "--min_timestep {min_t} / --max_timestep {max_t}: need 0 <= min <= max <= {} (the schedule's steps)",
            alphas_cumprod.len()
        )));
    }
    let timesteps: Vec<u64> =
        (0..b).map(|_| if min_t < max_t { draws.randint(min_t, max_t) } else { max_t }).collect();
    let dev: &Device = latents.device();
    let x0 = latents.to_dtype(DType::F32)?;
    let noise_tensor = Tensor::from_vec(noise, (b, c, h, w), dev)?;
    let noisy = if let Some(g) = args.ip_noise_gamma.filter(|&g| g != 0.0) {
        let strength = if args.ip_noise_gamma_random_strength { draws.uniform() * g } else { g };
        let extra = Tensor::from_vec(draws.normal(b * c * h * w), (b, c, h, w), dev)?;
        let perturbed = (&noise_tensor + (extra * strength)?)?;
        add_noise_on_device(&x0, &perturbed, &timesteps, alphas_cumprod)?
    } else {
        add_noise_on_device(&x0, &noise_tensor, &timesteps, alphas_cumprod)?
    };
    Ok(NoisedBatch { noise: noise_tensor, noisy_latents: noisy, timesteps })
}

/// [`add_noise`] on the latents' device: the noise is uploaded, the latents never leave the
/// device. The same f32 operations in the same order (`a·x`, `s·n`, their sum, each rounded), so
/// on the CPU the result is bit for bit [`add_noise`]'s.
fn add_noise_on_device(
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &[u64],
    alphas_cumprod: &[f32],
) -> Result<Tensor> {
    let (mut sqrt_ab, mut sqrt_1mab) = (Vec::new(), Vec::new());
    for &t in timesteps {
        let ac = *alphas_cumprod
            .get(t as usize)
            .ok_or_else(|| TrainError::Config(format!("timestep {t} out of the schedule's range")))?;
        let (a, s) = DdpmSchedule::noising_coefficients(ac);
        sqrt_ab.push(a);
        sqrt_1mab.push(s);
    }
    let per_sample = |v: Vec<f32>| Tensor::from_vec(v, (timesteps.len(), 1, 1, 1), x0.device());
    Ok((x0.broadcast_mul(&per_sample(sqrt_ab)?)? + noise.broadcast_mul(&per_sample(sqrt_1mab)?)?)?)
}
