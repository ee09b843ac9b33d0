//! One micro-batch: latents, text embeddings, noise, U-Net forward and backward, loss; the
//! parameter gradients go to a sink (accumulation buffer, or the fused optimizer update).

use std::cell::Cell;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use sdbooth_data::tokenizer::ClipTokenizer;
use sdbooth_models::clip::apply_token_weights;
use sdbooth_models::ddpm::DdpmSchedule;
use sdbooth_models::{ClipTrainOptions, TrainOptions};

use super::setup::Model;
use crate::error::{Result, TrainError};
use crate::loss::{training_loss, LossArgs};
use crate::noise::{noise_noisy_latents_and_timesteps, Draws, NoiseArgs, NoisedBatch};
use crate::update::{GradSink, Part};

/// What a micro-step needs besides the model.
pub struct StepInputs<'a> {
    /// Scaled latents `[B, 4, h, w]`.
    pub latents: Tensor,
    pub captions: &'a [String],
    pub loss_weights: &'a [f32],
    pub masks: Option<Tensor>,
}

pub struct StepSettings<'a> {
    pub noise: &'a NoiseArgs,
    pub loss: &'a LossArgs,
    pub schedule: &'a DdpmSchedule,
    pub alphas_cumprod: &'a [f32],
    pub train_text_encoder: bool,
    pub checkpointing: bool,
    pub compute_dtype: Option<DType>,
    pub clip_skip: Option<usize>,
    pub max_token_length: Option<usize>,
    pub no_token_padding: bool,
    /// kohya's `--weighted_captions`: A1111 `(word:1.2)` weights scale the token states.
    pub weighted_captions: bool,
    /// Multiplies dLoss (gradient accumulation's 1/n, fp16 loss scale).
    pub grad_multiplier: f64,
}

fn caption_error(c: &str, e: sdbooth_data::tokenizer::TokenizerError) -> TrainError {
    TrainError::Caption { caption: c.to_string(), source: Box::new(e) }
}

/// Token ids of a batch (`[B, 77]`, `[B, n, 77]` for long prompts, `[B, T]` unpadded) and,
/// with `--weighted_captions`, the per-token weights `[B, n, 77]`.
pub fn token_ids(
    tok: &ClipTokenizer,
    captions: &[String],
    s: &StepSettings<'_>,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    if s.weighted_captions {
        let (ids, w) = weighted_token_ids(tok, captions, s.max_token_length, device)?;
        Ok((ids, Some(w)))
    } else {
        Ok((plain_token_ids(tok, captions, s.max_token_length, s.no_token_padding, device)?, None))
    }
}

/// Token ids without weights.
pub fn plain_token_ids(
    tok: &ClipTokenizer,
    captions: &[String],
    max_token_length: Option<usize>,
    no_token_padding: bool,
    device: &Device,
) -> Result<Tensor> {
    let b = captions.len();
    let mut per_caption = Vec::with_capacity(b);
    for c in captions {
        per_caption.push(
            tok.tokenize_for_training(c, max_token_length, no_token_padding)
                .map_err(|e| caption_error(c, e))?,
        );
    }
    if no_token_padding {
        let first: Vec<Vec<u32>> = per_caption.into_iter().map(|mut w| w.swap_remove(0)).collect();
        let padded = tok.pad_batch(&first);
        let t = padded.first().map_or(0, Vec::len);
        let flat: Vec<u32> = padded.into_iter().flatten().collect();
        return Ok(Tensor::from_vec(flat, (b, t), device)?);
    }
    let n = per_caption.first().map_or(1, Vec::len);
    let flat: Vec<u32> = per_caption.into_iter().flatten().flatten().collect();
    if n == 1 {
        Ok(Tensor::from_vec(flat, (b, 77), device)?)
    } else {
        Ok(Tensor::from_vec(flat, (b, n, 77), device)?)
    }
}

/// `--weighted_captions`: ids as [`plain_token_ids`] and the per-token weights `[B, n, 77]`.
pub fn weighted_token_ids(
    tok: &ClipTokenizer,
    captions: &[String],
    max_token_length: Option<usize>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let b = captions.len();
    let (mut ids, mut weights, mut n) = (Vec::new(), Vec::new(), 1);
    for c in captions {
        let w = tok.tokenize_weighted(c, max_token_length).map_err(|e| caption_error(c, e))?;
        n = w.ids.len();
        ids.extend(w.ids.into_iter().flatten());
        weights.extend(w.weights.into_iter().flatten());
    }
    let ids = Tensor::from_vec(ids, (b, n, 77), device)?;
    let ids = if n == 1 { ids.squeeze(1)? } else { ids };
    Ok((ids, Tensor::from_vec(weights, (b, n, 77), device)?))
}

/// The loss of a micro-batch and where its time went.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    pub loss: f64,
    /// Text encoder and U-Net forward (with checkpointing: the forward that keeps block inputs).
    pub forward_seconds: f64,
    /// Loss gradient, U-Net and text encoder backward (recompute included), gradient hooks.
    pub backward_seconds: f64,
}

/// Kept bf16 packings of the weights for the run (see [`sdbooth_ops::PackedWeights`]) where they
/// pay: with gradient checkpointing the recompute takes the forward's packings instead of
/// rounding and packing every weight again, for about half the f32 weights' size in memory.
/// None with `--fused_backward_pass` (the optimizer changes weights during the backward, and
/// that mode is for saving memory) or without checkpointing (nothing would reuse them). Only
/// weights whose products run in bf16 on the CPU are kept, so f32 runs keep nothing.
pub fn packed_weights_for(
    checkpointing: bool,
    fused_backward_pass: bool,
) -> Option<sdbooth_ops::PackedWeights> {
    (checkpointing && !fused_backward_pass).then(sdbooth_ops::PackedWeights::new)
}

/// Runs one micro-batch and hands every parameter gradient (part, name, gradient) to `sink`:
/// draws noise and timesteps from `noise_rng` (kohya's order), then
/// [`loss_and_grads`].
pub fn micro_step(
    model: &Model,
    inputs: StepInputs<'_>,
    s: &StepSettings<'_>,
    noise_rng: &mut ChaCha8Rng,
    sink: &mut dyn GradSink,
) -> Result<StepOutcome> {
    let noised = noise_noisy_latents_and_timesteps(s.noise, &inputs.latents, s.alphas_cumprod, noise_rng)?;
    loss_and_grads(model, inputs, &noised, s, sink)
}

/// The deterministic part of a step, given the noise and timesteps: text encoding, U-Net
/// forward, loss, backward through both models. Step-parity tests call this directly.
pub fn loss_and_grads(
    model: &Model,
    inputs: StepInputs<'_>,
    noised: &NoisedBatch,
    s: &StepSettings<'_>,
    sink: &mut dyn GradSink,
) -> Result<StepOutcome> {
    let started = std::time::Instant::now();
    let device = inputs.latents.device().clone();
    let (ids, token_weights) = token_ids(&model.tokenizer, inputs.captions, s, &device)?;
    // Text embeddings: a training tape when the text encoder learns, a detached encode otherwise
    // (a frozen text encoder runs in the mixed-precision dtype, as kohya).
    let te_tape = if s.train_text_encoder {
        let opts = ClipTrainOptions { checkpointing: s.checkpointing, compute_dtype: s.compute_dtype };
        Some(model.text_encoder.forward_train(&model.text_params, &ids, s.clip_skip, opts)?)
    } else {
        None
    };
    let ctx = match &te_tape {
        Some(tape) => tape.output().clone(),
        None => model.text_encoder.encode(&model.text_params, &ids, s.clip_skip, s.compute_dtype)?,
    };
    let ctx = match &token_weights {
        Some(w) => apply_token_weights(&ctx, w)?,
        None => ctx,
    };

    let ts: Vec<usize> = noised.timesteps.iter().map(|&t| t as usize).collect();
    let target = if s.loss.v_parameterization {
        s.schedule.velocity(&inputs.latents, &noised.noise, &ts)?
    } else {
        noised.noise.clone()
    };
    let t_tensor =
        Tensor::from_vec(noised.timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), ts.len(), &device)?;

    let loss_value = Cell::new(f64::NAN);
    let grad_fn = |pred: &Tensor| -> std::result::Result<Tensor, sdbooth_models::ModelError> {
        let pred_var = Var::from_tensor(&pred.to_dtype(DType::F32)?)?;
        let loss = training_loss(
            pred_var.as_tensor(),
            &target,
            &noised.timesteps,
            inputs.loss_weights,
            inputs.masks.as_ref(),
            s.alphas_cumprod,
            s.loss,
        )
        .map_err(|e| sdbooth_models::ModelError::BadInput(e.to_string()))?;
        loss_value.set(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        let grads = loss.backward()?;
        let g = grads.get(pred_var.as_tensor()).ok_or_else(|| {
            sdbooth_models::ModelError::BadInput("loss does not depend on the prediction".into())
        })?;
        Ok((g.detach() * s.grad_multiplier)?)
    };
    let mut sink_error = None;
    let mut unet_hook = |grads: &[(String, Tensor)]| -> candle_core::Result<()> {
        if let Err(e) = sink.add_block(Part::Unet, grads) {
            sink_error.get_or_insert(e);
        }
        Ok(())
    };
    let opts = TrainOptions {
        checkpointing: s.checkpointing,
        compute_dtype: s.compute_dtype,
        param_grads: true,
        ctx_grad: te_tape.is_some(),
        latents_grad: false,
    };
    let tape = model.unet.forward_train(&model.unet_params, &noised.noisy_latents, &t_tensor, &ctx, opts)?;
    let forward_seconds = started.elapsed().as_secs_f64();
    let grad = grad_fn(tape.output())?;
    let unet_grads = tape.backward(&grad, &mut unet_hook)?;
    if let Some(e) = sink_error.take() {
        return Err(e);
    }
    if let (Some(tape), Some(ctx_grad)) = (te_tape, unet_grads.ctx) {
        // The token weights are a constant factor: the same product carries the gradient back.
        let ctx_grad = match &token_weights {
            Some(w) => apply_token_weights(&ctx_grad, w)?,
            None => ctx_grad,
        };
        let mut te_hook = |grads: &[(String, Tensor)]| -> candle_core::Result<()> {
            if let Err(e) = sink.add_block(Part::TextEncoder, grads) {
                sink_error.get_or_insert(e);
            }
            Ok(())
        };
        tape.backward(&ctx_grad, &mut te_hook)?;
        if let Some(e) = sink_error.take() {
            return Err(e);
        }
    }
    Ok(StepOutcome {
        loss: loss_value.get(),
        forward_seconds,
        backward_seconds: started.elapsed().as_secs_f64() - forward_seconds,
    })
}

/// Draws `n` standard-normal values as a tensor of `shape`.
pub fn normal_tensor(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.normal(n), shape, device)?)
}
