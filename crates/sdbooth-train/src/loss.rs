//! kohya's training loss (train_db.py): elementwise l2 | l1 | huber | smooth_l1 (with a per-sample
//! Huber threshold from --huber_schedule), optional mask, mean over C,H,W, × per-sample loss
//! weights (prior_loss_weight for regularisation images), then min-SNR weighting,
//! scale_v_pred_loss_like_noise_pred, v_pred_like_loss and debiased estimation, and the batch mean.
//!
//! Written on candle tensors so the gradient flows back to the prediction; the per-sample weights
//! are constants built on the host.

use candle_core::{DType, Tensor};
use sdbooth_models::ddpm::DdpmSchedule;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossType {
    L2,
    L1,
    Huber,
    SmoothL1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HuberSchedule {
    Constant,
    Exponential,
    Snr,
}

/// kohya's loss flags with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossArgs {
    pub loss_type: LossType,
    pub huber_schedule: HuberSchedule,
    pub huber_c: f64,
    pub huber_scale: f64,
    pub min_snr_gamma: Option<f64>,
    pub scale_v_pred_loss_like_noise_pred: bool,
    pub v_pred_like_loss: Option<f64>,
    pub debiased_estimation_loss: bool,
    pub v_parameterization: bool,
}

impl Default for LossArgs {
    fn default() -> Self {
        LossArgs {
            loss_type: LossType::L2,
            huber_schedule: HuberSchedule::Snr,
            huber_c: 0.1,
            huber_scale: 1.0,
            min_snr_gamma: None,
            scale_v_pred_loss_like_noise_pred: false,
            v_pred_like_loss: None,
            debiased_estimation_loss: false,
            v_parameterization: false,
        }
    }
}

/// SNR(t) of the schedule `alphas_cumprod` (the one formula: `DdpmSchedule::snr_of`).
pub fn snr(alphas_cumprod: &[f32], t: u64) -> Result<f32> {
    let ac = *alphas_cumprod
        .get(t as usize)
        .ok_or_else(|| TrainError::Internal(format!("timestep {t} out of the schedule's range")))?;
    Ok(DdpmSchedule::snr_of(ac))
}

/// train_util.get_huber_threshold_if_needed: the per-sample Huber threshold, or None for l1/l2.
pub fn huber_threshold(
    args: &LossArgs,
    timesteps: &[u64],
    alphas_cumprod: &[f32],
) -> Result<Option<Vec<f32>>> {
    if !matches!(args.loss_type, LossType::Huber | LossType::SmoothL1) {
        return Ok(None);
    }
    let c = args.huber_c;
    let v = match args.huber_schedule {
        HuberSchedule::Exponential => {
            let alpha = (-c.ln() / alphas_cumprod.len() as f64) as f32;
            timesteps.iter().map(|&t| (-alpha * t as f32).exp() * args.huber_scale as f32).collect()
        }
        HuberSchedule::Snr => timesteps
            .iter()
            .map(|&t| {
                let ac = *alphas_cumprod.get(t as usize).ok_or_else(|| {
                    TrainError::Internal(format!("timestep {t} out of the schedule's range"))
                })?;
                let sigma = ((1.0 - ac) / ac).sqrt();
                Ok((1.0 - c as f32) / ((1.0 + sigma) * (1.0 + sigma)) + c as f32)
            })
            .collect::<Result<Vec<f32>>>()?,
        HuberSchedule::Constant => vec![(c * args.huber_scale) as f32; timesteps.len()],
    };
    Ok(Some(v))
}

fn per_sample(values: &[f32], like: &Tensor) -> Result<Tensor> {
    let rank = like.rank();
    let mut shape = vec![1usize; rank];
    shape[0] = values.len();
    Ok(Tensor::from_slice(values, shape, like.device())?.to_dtype(like.dtype())?)
}

/// train_util.conditional_loss with reduction "none": the elementwise loss.
pub fn conditional_loss(
    pred: &Tensor,
    target: &Tensor,
    loss_type: LossType,
    huber_c: Option<&[f32]>,
) -> Result<Tensor> {
    let d = (pred - target)?;
    let need_c = || huber_c.ok_or_else(|| TrainError::Internal("huber loss needs a threshold".into()));
    Ok(match loss_type {
        LossType::L2 => d.sqr()?,
        LossType::L1 => d.abs()?,
        LossType::Huber | LossType::SmoothL1 => {
            let c = per_sample(need_c()?, pred)?;
            let root = d.sqr()?.broadcast_add(&c.sqr()?)?.sqrt()?.broadcast_sub(&c)?;
            if loss_type == LossType::Huber {
                root.broadcast_mul(&c)?.affine(2.0, 0.0)?
            } else {
                root.affine(2.0, 0.0)?
            }
        }
    })
}

/// Area interpolation (torch `interpolate(mode="area")`, i.e. adaptive average pooling) of one
/// plane from (sh, sw) to (dh, dw).
pub fn area_resize(src: &[f32], sh: usize, sw: usize, dh: usize, dw: usize) -> Vec<f32> {
    let mut out = vec![0f32; dh * dw];
    for y in 0..dh {
        let (y0, y1) = ((y * sh) / dh, ((y + 1) * sh).div_ceil(dh));
        for x in 0..dw {
            let (x0, x1) = ((x * sw) / dw, ((x + 1) * sw).div_ceil(dw));
            let mut s = 0f32;
            for yy in y0..y1 {
                for xx in x0..x1 {
                    s += src[yy * sw + xx];
                }
            }
            out[y * dw + x] = s / ((y1 - y0) * (x1 - x0)) as f32;
        }
    }
    out
}

/// The resize of custom_train_functions.apply_masked_loss (`interpolate(mode="area")`): `b`
/// host masks of (mh, mw) in [0, 1], from the data loader, area-resized to the loss's (h, w). It
/// runs on the host before the masks are uploaded, so the step never reads a mask back.
pub fn resize_masks(
    masks: &[f32],
    b: usize,
    (mh, mw): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Vec<f32>> {
    if masks.len() != b * mh * mw || mh == 0 || mw == 0 {
        return Err(TrainError::Internal(format!("{} mask values for {b} masks of {mh}x{mw}", masks.len())));
    }
    if (mh, mw) == (h, w) {
        return Ok(masks.to_vec());
    }
    Ok(masks.chunks_exact(mh * mw).flat_map(|m| area_resize(m, mh, mw, h, w)).collect())
}

/// custom_train_functions.apply_masked_loss: `mask` is (B, h, w), already at the loss's size
/// ([`resize_masks`]), multiplied over all channels.
pub fn apply_masked_loss(loss: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, _c, h, w) = loss.dims4()?;
    if mask.dims() != [b, h, w] {
        return Err(TrainError::Internal(format!(
            "mask of shape {:?} for a loss of batch {b} at {h}x{w} (resize_masks makes it)",
            mask.dims()
        )));
    }
    let m = mask.to_dtype(DType::F32)?.reshape((b, 1, h, w))?.to_dtype(loss.dtype())?;
    Ok(loss.broadcast_mul(&m)?)
}

/// The per-sample factors applied after the C,H,W mean, in kohya's order.
pub fn sample_weights(
    args: &LossArgs,
    timesteps: &[u64],
    loss_weights: &[f32],
    alphas_cumprod: &[f32],
) -> Result<Vec<(f32, f32)>> {
    // (multiplier, v_pred_like term): loss_i ← loss_i·mult, then + loss_i/scale·v.
    let mut out = Vec::with_capacity(timesteps.len());
    for (i, &t) in timesteps.iter().enumerate() {
        let s = snr(alphas_cumprod, t)?;
        let s_clamped = s.min(1000.0);
        let mut m = *loss_weights
            .get(i)
            .ok_or_else(|| TrainError::Internal("fewer loss weights than samples".into()))?;
        if let Some(g) = args.min_snr_gamma.filter(|&g| g != 0.0) {
            let min = s.min(g as f32);
            m *= if args.v_parameterization { min / (s + 1.0) } else { min / s };
        }
        if args.scale_v_pred_loss_like_noise_pred {
            m *= s_clamped / (s_clamped + 1.0);
        }
        let mut v_term = 1.0f32;
        if let Some(v) = args.v_pred_like_loss.filter(|&v| v != 0.0) {
            // loss + loss / scale · v, with scale = snr/(snr+1).
            v_term = 1.0 + v as f32 / (s_clamped / (s_clamped + 1.0));
        }
        out.push((m, v_term));
    }
    if args.debiased_estimation_loss {
        for (o, &t) in out.iter_mut().zip(timesteps) {
            let s = snr(alphas_cumprod, t)?.min(1000.0);
            let w = if args.v_parameterization { 1.0 / (s + 1.0) } else { 1.0 / s.sqrt() };
            o.1 *= w;
        }
    }
    Ok(out)
}

/// The full loss of train_db.py for a batch: returns the scalar to call backward on.
///
/// `pred` and `target` are (B, C, H, W); `loss_weights` holds one weight per sample (1.0, or
/// prior_loss_weight for regularisation images); `mask` is an optional (B, H, W) alpha mask at the
/// loss's size ([`resize_masks`]).
pub fn training_loss(
    pred: &Tensor,
    target: &Tensor,
    timesteps: &[u64],
    loss_weights: &[f32],
    mask: Option<&Tensor>,
    alphas_cumprod: &[f32],
    args: &LossArgs,
) -> Result<Tensor> {
    let (b, ..) = pred.dims4()?;
    if timesteps.len() != b || loss_weights.len() != b {
        return Err(TrainError::Internal(format!(
            "batch of {b} with {} timesteps and {} loss weights",
            timesteps.len(),
            loss_weights.len()
        )));
    }
    let pred = pred.to_dtype(DType::F32)?;
    let target = target.to_dtype(DType::F32)?.detach();
    let c = huber_threshold(args, timesteps, alphas_cumprod)?;
    let mut loss = conditional_loss(&pred, &target, args.loss_type, c.as_deref())?;
    if let Some(m) = mask {
        loss = apply_masked_loss(&loss, m)?;
    }
    let loss = loss.mean((1, 2, 3))?;
    let w = sample_weights(args, timesteps, loss_weights, alphas_cumprod)?;
    let mult: Vec<f32> = w.iter().map(|x| x.0).collect();
    let mut loss = loss.mul(&Tensor::from_vec(mult, b, loss.device())?)?;
    if w.iter().any(|x| x.1 != 1.0) {
        let post: Vec<f32> = w.iter().map(|x| x.1).collect();
        loss = loss.mul(&Tensor::from_vec(post, b, loss.device())?)?;
    }
    Ok(loss.mean_all()?)
}
