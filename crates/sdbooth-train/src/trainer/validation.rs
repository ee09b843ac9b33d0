//! Validation loss on the images `validation_split` holds out (kohya parses the split; train_db
//! throws it away). Each held-out image gets, once, a latent, [`TIMESTEPS_PER_IMAGE`] fixed
//! timesteps and fixed noise from a stream seeded by `--validation_seed` (else `--seed`), so the
//! curve compares the same problem at every evaluation. The loss is the training loss (same loss
//! type, min-SNR weighting, v-prediction target) of a frozen forward: no graph, no gradients,
//! and no draw from any training stream, so training is bit-identical with validation on or off.

use candle_core::{DType, Tensor};
use rand::Rng;
use sdbooth_data::{DatasetGroup, SampleContext};

use super::setup::Model;
use super::step::{normal_tensor, token_ids};
use crate::error::Result;
use crate::loss::training_loss;
use crate::plan::TrainPlan;
use sdbooth_models::clip::apply_token_weights;

/// Timesteps per held-out image, stratified over the trained range (one forward pass each).
pub const TIMESTEPS_PER_IMAGE: usize = 4;

struct Item {
    path: String,
    caption: String,
    /// `[K, 4, h, w]`: the image's latent repeated, noised with fixed noise.
    noisy: Tensor,
    /// `[K, 4, h, w]`: what the U-Net should predict (noise, or velocity).
    target: Tensor,
    timesteps: Vec<u64>,
}

pub(super) struct Validation {
    items: Vec<Item>,
}

/// One evaluation: the mean and each image's loss (same order as `paths`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct ValidationRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub per_image: Vec<f64>,
    pub paths: Vec<String>,
    pub captions: Vec<String>,
}

impl Validation {
    /// Loads and encodes the held-out images; `None` when there are none. Needs the VAE.
    pub fn new(plan: &TrainPlan, group: &DatasetGroup, model: &Model) -> Result<Option<Self>> {
        if group.datasets.iter().all(|d| d.validation_images.is_empty()) {
            return Ok(None);
        }
        let vae_params = model.vae_params.as_ref().ok_or_else(super::vae_freed)?;
        // The held-out images as a group of their own, augmentation and caption randomness off.
        let mut vgroup = group.clone();
        for d in &mut vgroup.datasets {
            d.images = std::mem::take(&mut d.validation_images);
            d.buckets.clear();
            for s in &mut d.subsets {
                let s = &mut s.spec;
                (s.flip_aug, s.color_aug, s.random_crop, s.face_crop_aug_range) = (false, false, false, None);
                s.caption.shuffle_caption = false;
                s.caption.caption_dropout_rate = 0.0;
                s.caption.caption_dropout_every_n_epochs = 0;
                s.caption.caption_tag_dropout_rate = 0.0;
                s.caption.token_warmup_step = 0.0;
            }
        }
        let val_seed = plan.data.options.validation_seed.unwrap_or(plan.seed);
        let mut rng = sdbooth_data::Streams::new(val_seed).validation();
        let ctx = SampleContext { seed: val_seed, epoch: 1, step: 0, max_train_steps: 1 };
        let t_min = plan.noise.min_timestep.unwrap_or(0);
        let t_max = plan.noise.max_timestep.unwrap_or(1000).max(t_min + 1);
        let schedule = plan.noise_schedule();
        let device = &plan.device;
        let mut items = Vec::new();
        for (di, d) in vgroup.datasets.iter().enumerate() {
            for ii in 0..d.images.len() {
                let s = sdbooth_data::load_sample(&vgroup, di, ii, ii as u64, &ctx)?;
                let (h, w) = (s.height as usize, s.width as usize);
                let img = Tensor::from_vec(s.pixels, (1, 3, h, w), device)?;
                let f = model.vae.downscale_factor();
                let shape = [1, 4, h / f, w / f];
                let vae_noise = normal_tensor(&mut rng, &shape, device)?;
                let latent = model.vae.encode_to_latents(vae_params, &img, &vae_noise, None)?;
                let k = TIMESTEPS_PER_IMAGE;
                // Stratified: one timestep in each k-th of [t_min, t_max).
                let span = (t_max - t_min) as f64 / k as f64;
                let timesteps: Vec<u64> =
                    (0..k).map(|j| t_min + ((j as f64 + rng.gen::<f64>()) * span) as u64).collect();
                let ts: Vec<usize> = timesteps.iter().map(|&t| (t as usize).min(999)).collect();
                let latents = latent.repeat((k, 1, 1, 1))?;
                let noise = normal_tensor(&mut rng, &[k, shape[1], shape[2], shape[3]], device)?;
                let noisy = schedule.add_noise(&latents, &noise, &ts)?;
                let target =
                    if model.v_parameterization { schedule.velocity(&latents, &noise, &ts)? } else { noise };
                items.push(Item {
                    path: d.images[ii].path.display().to_string(),
                    caption: s.caption,
                    noisy,
                    target,
                    timesteps,
                });
            }
        }
        tracing::info!(
            "validation: {} held-out image(s), {TIMESTEPS_PER_IMAGE} fixed timesteps each",
            items.len()
        );
        Ok(Some(Validation { items }))
    }

    /// Each held-out image's loss with the current weights (no gradients), tokenized and
    /// encoded as the training step does (same settings, text encoder frozen).
    pub fn evaluate(&self, t: &super::Trainer<'_>) -> Result<Vec<f64>> {
        let device = &t.plan.device;
        let settings = super::step_settings(t.plan, &t.loss, &t.schedule, false, 1.0);
        let dtype = settings.compute_dtype;
        let model = &t.model;
        let mut out = Vec::with_capacity(self.items.len());
        for it in &self.items {
            let (ids, token_weights) =
                token_ids(&model.tokenizer, std::slice::from_ref(&it.caption), &settings, device)?;
            let ctx = model.text_encoder.encode(&model.text_params, &ids, settings.clip_skip, dtype)?;
            let ctx = match &token_weights {
                Some(w) => apply_token_weights(&ctx, w)?,
                None => ctx,
            };
            let k = it.timesteps.len();
            let ctx = ctx.repeat((k, 1, 1))?;
            let ts = Tensor::from_vec(it.timesteps.iter().map(|&v| v as f32).collect::<Vec<_>>(), k, device)?;
            let pred = model
                .unet
                .forward_frozen(&model.unet_params, &it.noisy, &ts, &ctx, dtype)?
                .to_dtype(DType::F32)?;
            let weights = vec![1.0f32; k];
            let l = training_loss(
                &pred,
                &it.target,
                &it.timesteps,
                &weights,
                None,
                &t.schedule.alphas_cumprod,
                &t.loss,
            )?;
            out.push(l.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        }
        Ok(out)
    }

    pub fn record(&self, step: u64, epoch: u64, per_image: Vec<f64>) -> ValidationRecord {
        let loss = if per_image.is_empty() {
            f64::NAN
        } else {
            per_image.iter().sum::<f64>() / per_image.len() as f64
        };
        ValidationRecord {
            step,
            epoch,
            loss,
            per_image,
            paths: self.items.iter().map(|i| i.path.clone()).collect(),
            captions: self.items.iter().map(|i| i.caption.clone()).collect(),
        }
    }
}

/// The per-image table: highest last loss first, with the first evaluation's loss beside it.
pub(super) fn per_image_table(
    first: &ValidationRecord,
    last: &ValidationRecord,
) -> Vec<(String, String, f64, f64)> {
    let mut rows: Vec<(String, String, f64, f64)> = last
        .paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = first.paths.iter().position(|q| q == p).map_or(f64::NAN, |j| first.per_image[j]);
            (p.clone(), last.captions.get(i).cloned().unwrap_or_default(), f, last.per_image[i])
        })
        .collect();
    rows.sort_by(|a, b| b.3.total_cmp(&a.3));
    rows
}
