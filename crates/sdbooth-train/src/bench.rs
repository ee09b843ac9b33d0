//! `sdbooth bench`: the training step at a given size, timed after a warm-up, as JSON.
//!
//! The work unit is one DreamBooth step with cached latents (random latents of the bucket's
//! size), one caption, U-Net and text encoder trained, and the optimizer step, with the same
//! flags as `train` (`--optimizer_type`, `--mixed_precision`, `--gradient_checkpointing`,
//! `--fused_backward_pass`, …).

use std::time::Instant;

use candle_core::DType;
use sdbooth_data::Streams;
use sdbooth_models::config::{ClipConfig, UNetConfig};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::plan::TrainPlan;
use crate::trainer::setup;
use crate::trainer::step::{micro_step, normal_tensor, packed_weights_for, StepInputs};
use crate::trainer::{peak_rss_bytes, step_settings};
use crate::update::{
    apply_accumulated, grad_multiplier, FusedUpdate, GradAccumulator, GradSink, LearningRates, LossScale,
    TrainedParams, UpdateOutcome,
};

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub resolution: (usize, usize),
    pub batch_size: usize,
    pub optimizer: String,
    pub mixed_precision: String,
    /// The dtype the GEMMs and convolutions compute in (`"f32"`, `"bf16"`, `"f16"`).
    pub compute_dtype: String,
    /// On the CPU, the GEMM kernel those products run on: `"avx512_bf16"` or `"f32_fallback"`
    /// for bf16, the f32 GEMM's (`"f32_avx512"`, `"f32_avx2"`, `"f32_generic"`) otherwise; `null`
    /// on a GPU.
    pub cpu_kernel: Option<String>,
    pub gradient_checkpointing: bool,
    pub fused_backward_pass: bool,
    pub train_text_encoder: bool,
    pub warmup_steps: usize,
    pub steps: usize,
    /// Threads of the compute pools (rayon's and candle's; `RAYON_NUM_THREADS`, default: the
    /// cores). The serial fraction of the step follows from two runs (README, Benchmarks).
    pub threads: usize,
    /// Median over the timed steps.
    pub s_per_step: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub other_s: f64,
    pub step_seconds: Vec<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// Multiply-adds ×2 of the convolutions, linear layers and attention products in one step:
    /// forward, backward (2× forward) and, with checkpointing, the recomputed forward.
    pub flops_per_step: f64,
    pub gflops: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The bench's image size: `--resolution` (SIZE or WIDTH,HEIGHT), else the model's.
fn resolution(plan: &TrainPlan, default: usize) -> Result<(usize, usize)> {
    let Some(r) = plan.data.options.resolution.as_deref() else { return Ok((default, default)) };
    let (w, h) = sdbooth_data::options::parse_resolution(r)?;
    Ok((w as usize, h as usize))
}

/// Times `steps` training steps after `warmup` untimed ones, on the plan's model and settings.
pub fn bench(plan: &TrainPlan, steps: usize, warmup: usize) -> Result<BenchReport> {
    let mut model = setup::load(plan)?;
    model.vae_params = None; // the bench trains on latents
    let (w, h) = resolution(plan, model.config.resolution)?;
    if w % 64 != 0 || h % 64 != 0 {
        return Err(TrainError::Config(format!("--resolution {w}x{h}: use multiples of 64")));
    }
    let batch = plan.data.options.train_batch_size.max(1) as usize;
    let train_te = plan.steps.stop_text_encoder_training.is_none_or(|s| s > 0);
    let mut optimizer = setup::build_optimizer(plan, &model, train_te)?;
    let schedule = plan.noise_schedule();
    let loss = model.loss_args(plan);
    let mut rng = Streams::new(plan.seed).noise();
    let device = &plan.device;
    // Latents of SD scale: unit-variance samples, as the VAE produces them after scaling.
    let latents = normal_tensor(&mut rng, &[batch, 4, h / 8, w / 8], device)?;
    let captions = vec!["a photo of sks dog".to_string(); batch];
    let weights = vec![1.0f32; batch];
    let o = &plan.optimizer;
    let fused = o.fused_backward_pass;
    // The bench's steps are the run: the schedule spans them, as train's spans --max_train_steps.
    let lr_schedule = setup::lr_schedule(plan, (warmup + steps) as u64)?;
    let mut loss_scale = plan.precision.fp16_loss_scale.then(LossScale::default);
    let (mut fwd, mut bwd, mut opt_t, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let packed_weights = packed_weights_for(plan.steps.gradient_checkpointing, fused);
    for i in 0..warmup + steps {
        let started = Instant::now();
        let multiplier = grad_multiplier(loss_scale.as_ref(), 1);
        let settings = step_settings(plan, &loss, &schedule, train_te, multiplier);
        let inputs =
            StepInputs { latents: latents.clone(), captions: &captions, loss_weights: &weights, masks: None };
        let lrs = LearningRates::at_step(&optimizer, &lr_schedule, i as u64);
        let params = TrainedParams { unet: &model.unet_params, text_encoder: &model.text_params };
        let mut accumulated = GradAccumulator::default();
        let mut fused_update =
            FusedUpdate { optimizer: &mut optimizer, params, lrs, max_norm: o.max_grad_norm };
        let sink: &mut dyn GradSink = if fused { &mut fused_update } else { &mut accumulated };
        let packings = packed_weights.as_ref().map(|p| p.step());
        let outcome = micro_step(&model, inputs, &settings, &mut rng, sink)?;
        drop(packings);
        let before_update = Instant::now();
        if !fused {
            let update = apply_accumulated(
                &mut optimizer,
                params,
                &accumulated,
                lrs,
                o.max_grad_norm,
                loss_scale.as_mut(),
            )?;
            if let UpdateOutcome::SkippedOverflow { new_scale } = update {
                tracing::warn!("step {}: fp16 gradients overflowed, loss scale now {new_scale}", i + 1);
            }
        }
        drop(accumulated);
        let update = before_update.elapsed().as_secs_f64();
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            "{} step {}: {secs:.2} s (forward {:.2}, backward {:.2}, optimizer {update:.2}), loss {:.4}",
            if i < warmup { "warm-up" } else { "timed" },
            i + 1,
            outcome.forward_seconds,
            outcome.backward_seconds,
            outcome.loss
        );
        if i >= warmup {
            fwd.push(outcome.forward_seconds);
            bwd.push(outcome.backward_seconds);
            opt_t.push(update);
            total.push(secs);
        }
    }
    let s_per_step = median(&total);
    let (forward_s, backward_s, optimizer_s) = (median(&fwd), median(&bwd), median(&opt_t));
    let forward_flops = batch as f64
        * (unet_forward_flops(&model.config.unet, h / 8, w / 8, 77)
            + clip_forward_flops(&model.config.text, 77));
    let checkpointing = plan.steps.gradient_checkpointing;
    let compute_dtype = plan.precision.compute_dtype.unwrap_or(plan.precision.weight_dtype);
    let passes = if checkpointing { 4.0 } else { 3.0 };
    let flops_per_step = forward_flops * passes;
    Ok(BenchReport {
        model: plan.model.spec.clone().unwrap_or_default(),
        resolution: (w, h),
        batch_size: batch,
        optimizer: format!("{:?}", o.config.kind),
        mixed_precision: format!("{:?}", plan.precision.mixed_precision).to_lowercase(),
        compute_dtype: compute_dtype.as_str().to_string(),
        cpu_kernel: plan.device.is_cpu().then(|| cpu_kernel(compute_dtype).to_string()),
        gradient_checkpointing: checkpointing,
        fused_backward_pass: fused,
        train_text_encoder: train_te,
        warmup_steps: warmup,
        steps,
        threads: rayon::current_num_threads(),
        s_per_step,
        forward_s,
        backward_s,
        optimizer_s,
        other_s: (s_per_step - forward_s - backward_s - optimizer_s).max(0.0),
        step_seconds: total,
        peak_rss_bytes: peak_rss_bytes(),
        flops_per_step,
        gflops: if s_per_step > 0.0 { flops_per_step / s_per_step / 1e9 } else { 0.0 },
    })
}

/// The CPU GEMM kernel that products in `dtype` run on.
fn cpu_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => sdbooth_ops::bf16_kernel().name(),
        _ => sdbooth_ops::f32_gemm_kernel(),
    }
}

/// Forward FLOPs of the U-Net for one sample at latent size `h × w` with `ctx` text tokens,
/// counted from the model's own node list.
pub fn unet_forward_flops(cfg: &UNetConfig, h: usize, w: usize, ctx: usize) -> f64 {
    sdbooth_models::UNet::new(cfg).forward_flops(h, w, ctx)
}

/// Forward FLOPs of the CLIP text encoder for one sequence of `tokens`.
pub fn clip_forward_flops(cfg: &ClipConfig, tokens: usize) -> f64 {
    sdbooth_models::ClipTextModel::new(cfg).forward_flops(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdbooth_models::ModelConfig;

    #[test]
    fn sd15_flops_are_in_the_known_range() {
        // SD1.5's U-Net is ~0.8 TFLOP... per 64×64 latent? No: about 0.4 T multiply-adds at 64×64
        // is the figure usually quoted (~800 GFLOP). Check the order of magnitude at 64×64.
        let f = unet_forward_flops(&ModelConfig::sd1().unet, 64, 64, 77);
        assert!(f > 6e11 && f < 1e12, "{f:e}");
        // A quarter of the pixels costs less than a third (attention is quadratic).
        let small = unet_forward_flops(&ModelConfig::sd1().unet, 32, 32, 77);
        assert!(small < f / 3.0 && small > f / 6.0, "{small:e}");
        let te = clip_forward_flops(&ModelConfig::sd1().text, 77);
        assert!(te > 1.0e10 && te < 2.0e10, "{te:e}");
    }
}
