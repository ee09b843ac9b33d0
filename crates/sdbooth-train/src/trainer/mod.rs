//! The DreamBooth loop of kohya's train_db.py: bucketed batches of instance and reg images,
//! U-Net and text encoder trained together, saving and exact resume.
//!
//! [`Trainer::run`] is the training step; logging, saving, samples and validation are
//! [`parts::RunPart`]s it calls at each step and epoch end.

mod latent_cache;
mod parts;
mod resume_policy;
mod sampling;
mod saving;
pub mod setup;
pub mod step;
mod validation;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use sdbooth_data::{load_batch, BatchRef, DatasetGroup, SampleContext, Sampler, Streams};
use sdbooth_models::ddpm::DdpmSchedule;

use crate::args::types::MixedPrecision;
use crate::args::TrainArgs;
use crate::error::{Result, TrainError};
use crate::logs::StepRecord;
use crate::loss::{resize_masks, LossArgs};
use crate::optim::Optimizer;
use crate::plan::{Resume, TrainPlan};
use crate::state::RunState;
use crate::update::{
    apply_accumulated, grad_multiplier, FusedUpdate, GradAccumulator, GradSink, LearningRates, LossScale,
    Part, TrainedParams, UpdateOutcome,
};

use parts::{Board, RunPart, StepLog};
use setup::{Model, Output};
use step::{micro_step, normal_tensor, StepInputs, StepSettings};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub global_step: u64,
    pub epochs: u64,
    pub final_model: PathBuf,
    pub final_loss: f64,
    pub mean_step_seconds: f64,
}

/// Set by Ctrl-C: the loop finishes the step in flight, saves a state and stops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C asked the run to stop after this step.
fn interrupt_requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The first Ctrl-C asks for a clean stop after the current step; a second one quits at once.
fn install_interrupt_handler() {
    let result = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            tracing::warn!("second interrupt: quitting without saving");
            std::process::exit(130);
        }
        tracing::warn!("interrupt: saving a state after this step (Ctrl-C again to quit at once)");
    });
    if let Err(e) = result {
        tracing::warn!("Ctrl-C handler not installed: {e}");
    }
}

/// Peak resident memory of this process so far (Linux), for logs and the summary.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One batch ready for the step: scaled latents, processed captions, loss weights, masks.
struct BatchInputs {
    latents: Tensor,
    captions: Vec<String>,
    loss_weights: Vec<f32>,
    masks: Option<Tensor>,
}

/// The training state of a run and what it trains with. Parts read it; only the step changes it.
struct Trainer<'a> {
    plan: &'a TrainPlan,
    model: Model,
    group: DatasetGroup,
    output: Output,
    optimizer: Optimizer,
    /// Progress: step, data order, random streams, loss recorder, loss scale (saved whole).
    state: RunState,
    schedule: DdpmSchedule,
    /// The plan's loss settings completed by the model (v-prediction).
    loss: LossArgs,
    latent_cache: Option<HashMap<(usize, usize), Tensor>>,
    max_train_steps: u64,
    num_epochs: u64,
    train_text_encoder: bool,
    /// kohya's `--stop_text_encoder_training` as a step (beyond the run when unset).
    stop_text_encoder_at: i64,
    lr_schedule: crate::lr::LrSchedule,
    /// Threads that decode and augment images (`--max_data_loader_n_workers`).
    loader_pool: rayon::ThreadPool,
    /// bf16 weight packings kept within each micro-step ([`step::packed_weights_for`]).
    packed_weights: Option<sdbooth_ops::PackedWeights>,
}

/// Runs `sdbooth train` (not the dry run): refuses flags this build does not implement, then
/// trains and writes the model.
pub fn train(args: &TrainArgs) -> Result<TrainSummary> {
    args.check_supported().map_err(TrainError::Refused)?;
    train_checked(args)
}

/// [`train`] without the supported-flags check (tests of features whose flags are not flipped yet).
pub fn train_checked(args: &TrainArgs) -> Result<TrainSummary> {
    train_plan(&TrainPlan::resolve(args)?)
}

/// Trains as `plan` says.
pub fn train_plan(plan: &TrainPlan) -> Result<TrainSummary> {
    let mut trainer = Trainer::new(plan)?;
    // The monitor keeps the VAE for samples and encodes the held-out images, so it comes before
    // latent caching frees the VAE.
    let monitor = sampling::Monitor::new(&trainer)?;
    trainer.prepare()?;
    let mut parts: Vec<Box<dyn RunPart>> =
        vec![Box::new(StepLog::new(&trainer)?), Box::new(saving::Saver::new(&trainer)), Box::new(monitor)];
    install_interrupt_handler();
    trainer.run(&mut parts)
}

/// The settings of one micro-step; validation passes its own (frozen text encoder, no scaling).
pub(crate) fn step_settings<'s>(
    plan: &'s TrainPlan,
    loss: &'s LossArgs,
    schedule: &'s DdpmSchedule,
    train_text_encoder: bool,
    grad_multiplier: f64,
) -> StepSettings<'s> {
    StepSettings {
        noise: &plan.noise,
        loss,
        schedule,
        alphas_cumprod: &schedule.alphas_cumprod,
        train_text_encoder,
        checkpointing: plan.steps.gradient_checkpointing,
        compute_dtype: plan.precision.compute_dtype,
        clip_skip: plan.text.clip_skip,
        max_token_length: plan.text.max_token_length,
        no_token_padding: plan.text.no_token_padding,
        weighted_captions: plan.text.weighted_captions,
        grad_multiplier,
    }
}

impl<'a> Trainer<'a> {
    /// The dataset, the model, the optimizer and the schedules of a fresh run.
    fn new(plan: &'a TrainPlan) -> Result<Self> {
        let seed = plan.seed;
        let group = setup::datasets(plan)?;
        // What kohya prints before training: subsets, repeats, reg balancing, buckets.
        tracing::info!("{}", sdbooth_data::DryRunReport::new(&group, &plan.data.options).to_text());
        let batches_per_epoch = group.epoch_batches(seed, 1).len() as u64;
        if batches_per_epoch == 0 {
            return Err(sdbooth_data::DataError::EmptyDataset {
                detail: "the dataset has no images to train on".into(),
            }
            .into());
        }
        let steps = sdbooth_data::step_plan(
            batches_per_epoch,
            plan.steps.gradient_accumulation_steps,
            plan.steps.max_train_steps,
            plan.steps.max_train_epochs,
            1,
        );
        if plan.precision.mixed_precision == MixedPrecision::Bf16 && plan.device.is_cpu() {
            tracing::info!(
                "--mixed_precision bf16 on the CPU: bf16 GEMMs with f32 sums, kernel {}",
                sdbooth_ops::bf16_kernel().name()
            );
        }
        setup::refuse_replacing_the_source(plan)?;
        let model = setup::load(plan)?;
        let output = Output::new(plan, &model)?;
        for stale in crate::state::clean_stale_temps(&output.dir, output.name.as_deref())? {
            tracing::info!("removed {} (left by an interrupted save)", stale.display());
        }
        // kohya: no --stop_text_encoder_training trains it throughout; a negative value never.
        let stop_text_encoder_at =
            plan.steps.stop_text_encoder_training.unwrap_or(steps.max_train_steps as i64 + 1);
        let train_text_encoder = stop_text_encoder_at > 0;
        let optimizer = setup::build_optimizer(plan, &model, train_text_encoder)?;
        let loader_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(plan.data.loader_threads)
            .build()
            .map_err(|e| TrainError::Internal(format!("image loader threads: {e}")))?;
        Ok(Trainer {
            plan,
            state: RunState::start(
                Streams::new(seed),
                Sampler::new(&group, seed),
                plan.precision.fp16_loss_scale.then(LossScale::default),
            ),
            group,
            loss: model.loss_args(plan),
            model,
            output,
            optimizer,
            schedule: plan.noise_schedule(),
            latent_cache: None,
            max_train_steps: steps.max_train_steps,
            num_epochs: steps.num_epochs,
            train_text_encoder,
            stop_text_encoder_at,
            lr_schedule: setup::lr_schedule(plan, steps.max_train_steps)?,
            loader_pool,
            packed_weights: step::packed_weights_for(
                plan.steps.gradient_checkpointing,
                plan.optimizer.fused_backward_pass,
            ),
        })
    }

    /// Latent caching and, with `--resume`, the saved state laid over the fresh run.
    fn prepare(&mut self) -> Result<()> {
        if let Some(policy) = self.plan.data.latent_cache {
            self.cache_latents(&policy)?;
        }
        if let Some(resume) = &self.plan.saving.resume {
            self.resume(resume)?;
        }
        Ok(())
    }

    fn sample_context(&self, epoch: u64) -> SampleContext {
        SampleContext {
            seed: self.plan.seed,
            epoch,
            step: self.state.global_step,
            max_train_steps: self.max_train_steps,
        }
    }

    /// Encodes every image once (kohya's --cache_latents / --cache_latents_to_disk).
    fn cache_latents(&mut self, policy: &crate::plan::LatentCachePolicy) -> Result<()> {
        let vae_params = self.model.vae_params.as_ref().ok_or_else(vae_freed)?;
        let total: usize = self.group.datasets.iter().map(|d| d.images.len()).sum();
        let bar = progress_bar(total as u64, "caching latents");
        let settings = latent_cache::CacheSettings {
            device: self.plan.device.clone(),
            seed: self.plan.seed,
            to_disk: policy.to_disk,
            skip_cache_check: policy.skip_cache_check,
            vae_batch_size: policy.vae_batch_size,
        };
        let ctx = self.sample_context(1);
        let cache = latent_cache::build(&self.group, &self.model.vae, vae_params, &settings, &ctx, &bar)?;
        bar.finish_and_clear();
        self.latent_cache = Some(cache);
        // Without samples to decode, nothing needs the VAE any more (`--highvram` keeps it).
        if !self.plan.data.keep_vae && self.plan.sampling.prompts.is_none() {
            self.model.vae_params = None;
        }
        Ok(())
    }

    /// Latents, captions, loss weights and masks of one batch, on the plan's device.
    fn batch_inputs(&mut self, epoch: u64, index: usize, batch: &BatchRef) -> Result<BatchInputs> {
        let ctx = self.sample_context(epoch);
        let group = &self.group;
        let loaded = self.loader_pool.install(|| load_batch(group, batch, index, &ctx))?;
        let (b, h, w) = (loaded.samples.len(), loaded.height as usize, loaded.width as usize);
        let device = &self.plan.device;
        let latents = match &self.latent_cache {
            Some(cache) => {
                let parts: Vec<Tensor> = batch
                    .images
                    .iter()
                    .map(|&i| {
                        cache.get(&(batch.dataset, i)).cloned().ok_or_else(|| {
                            TrainError::Internal(format!(
                                "image {i} of dataset {} has no cached latent",
                                batch.dataset
                            ))
                        })
                    })
                    .collect::<Result<_>>()?;
                Tensor::cat(&parts, 0)?
            }
            None => {
                let vae_params = self.model.vae_params.as_ref().ok_or_else(vae_freed)?;
                let images = Tensor::from_vec(loaded.pixels, (b, 3, h, w), device)?;
                let f = self.model.vae.downscale_factor();
                let noise = normal_tensor(&mut self.state.vae_rng, &[b, 4, h / f, w / f], device)?;
                self.model.vae.encode_to_latents(vae_params, &images, &noise, None)?
            }
        };
        // Masks are resized to the latents' size here, on the host, and uploaded at that size.
        let masks = match loaded.masks {
            Some(m) if self.plan.steps.masked_loss => {
                let (.., lh, lw) = latents.dims4()?;
                Some(Tensor::from_vec(resize_masks(&m, b, (h, w), (lh, lw))?, (b, lh, lw), device)?)
            }
            _ => None,
        };
        Ok(BatchInputs { latents, captions: loaded.captions, loss_weights: loaded.loss_weights, masks })
    }

    fn resume(&mut self, resume: &Resume) -> Result<()> {
        let dir = match resume {
            Resume::Latest => match crate::state::find_latest_state(&self.output.dir)? {
                Some(d) => d,
                None => {
                    tracing::warn!(
                        "--resume auto: no saved state in {}, starting fresh",
                        self.output.dir.display()
                    );
                    return Ok(());
                }
            },
            Resume::From(dir) => dir.clone(),
        };
        let (saved, optimizer) = saving::load_state(&dir, &mut self.model, &self.plan.device)?;
        if saved.global_step >= self.max_train_steps {
            return Err(TrainError::state(
                &dir,
                format!(
                    "it is at step {}, and this run ends at step {}: nothing left to train (raise \
                     --max_train_steps or --max_train_epochs to continue it)",
                    saved.global_step, self.max_train_steps
                ),
            ));
        }
        resume_policy::check_optimizer(&dir, &optimizer.config, self.plan)?;
        resume_policy::check_weight_dtype(&dir, &self.model, self.plan)?;
        self.optimizer = optimizer;
        resume_policy::apply_learning_rates(&mut self.optimizer, self.plan, saved.global_step);
        let fp16 = self.state.loss_scale.is_some();
        self.state = saved;
        // The flags decide whether there is a loss scale; a saved one continues.
        self.state.loss_scale = if fp16 { Some(self.state.loss_scale.unwrap_or_default()) } else { None };
        tracing::info!("resumed from {} at step {}", dir.display(), self.state.global_step);
        Ok(())
    }

    /// The run: training steps until the last, each followed by the parts.
    fn run(mut self, parts: &mut [Box<dyn RunPart>]) -> Result<TrainSummary> {
        let bar = progress_bar(self.max_train_steps, "steps");
        bar.set_position(self.state.global_step);
        let start = self.state.global_step;
        let result = self.run_steps(parts, &bar);
        bar.finish_and_clear();
        match result {
            // Trained steps are not thrown away by a later failure (a sample, validation, the
            // final save): their state is saved first. Ctrl-C has saved already; a NaN loss keeps
            // the last good files as they are.
            Err(e)
                if self.state.global_step > start
                    && !matches!(e, TrainError::Interrupted { .. } | TrainError::NonFiniteLoss { .. }) =>
            {
                Err(self.save_after_error(e))
            }
            r => r,
        }
    }

    fn save_after_error(&self, error: TrainError) -> TrainError {
        match saving::save_interrupted(self) {
            Ok(state) => {
                TrainError::SavedAfterError { step: self.state.global_step, state, source: Box::new(error) }
            }
            Err(save) => {
                tracing::error!("saving a state after the error below failed too: {save}");
                error
            }
        }
    }

    fn run_steps(&mut self, parts: &mut [Box<dyn RunPart>], bar: &ProgressBar) -> Result<TrainSummary> {
        let mut board = match &self.plan.logging.logging_dir {
            Some(dir) => {
                let l = &self.plan.logging;
                let d =
                    crate::logs::kohya_log_dir(dir, l.log_prefix.as_deref(), l.log_tracker_name.as_deref());
                Some(crate::logs::TensorBoardWriter::create(&d)?)
            }
            None => None,
        };
        let mut step_times = Vec::new();
        let mut last_loss = f64::NAN;
        let mut epoch = self.state.sampler.state().epoch;
        for p in parts.iter_mut() {
            p.at_start(self, &mut board)?;
        }
        while self.state.global_step < self.max_train_steps {
            let started = Instant::now();
            let (loss, (lr_unet, lr_te)) = self.train_step(&mut epoch, parts, &mut board)?;
            self.state.global_step += 1;
            last_loss = loss;
            // kohya's recorder takes the 0-based epoch and the index of the batch just consumed; a
            // 1-based position would count a phantom zero loss at the start of every epoch.
            let batch_index = self.state.sampler.state().next_batch.saturating_sub(1);
            self.state.loss_recorder.add(epoch.saturating_sub(1), batch_index, loss);
            let secs = started.elapsed().as_secs_f64();
            step_times.push(secs);
            let avr = self.state.loss_recorder.moving_average();
            bar.set_message(format!("loss {loss:.4} avr {avr:.4} lr {lr_unet:.2e} {secs:.2}s/step"));
            bar.set_position(self.state.global_step);
            let record = StepRecord {
                step: self.state.global_step,
                epoch,
                loss: loss as f32,
                avr_loss: avr as f32,
                lr_unet,
                lr_text_encoder: self.train_text_encoder.then_some(lr_te),
                step_seconds: secs,
                peak_rss_bytes: peak_rss_bytes(),
            };
            for p in parts.iter_mut() {
                p.after_step(self, &record, &mut board)?;
            }
        }
        self.end_epoch(epoch, parts, &mut board)?;
        for p in parts.iter_mut() {
            p.at_end(self, epoch, &mut board)?;
        }
        let mean = if step_times.is_empty() {
            0.0
        } else {
            step_times.iter().sum::<f64>() / step_times.len() as f64
        };
        Ok(TrainSummary {
            global_step: self.state.global_step,
            epochs: epoch,
            final_model: self.output.final_model_path(),
            final_loss: last_loss,
            mean_step_seconds: mean,
        })
    }

    /// One optimizer step: `--gradient_accumulation_steps` micro-batches, then the update.
    /// Returns the mean loss and the learning rates (U-Net, text encoder) it used.
    fn train_step(
        &mut self,
        epoch: &mut u64,
        parts: &mut [Box<dyn RunPart>],
        board: &mut Board,
    ) -> Result<(f64, (f64, f64))> {
        if self.train_text_encoder && self.state.global_step as i64 >= self.stop_text_encoder_at {
            tracing::info!("stop text encoder training at step {}", self.state.global_step);
            self.train_text_encoder = false;
            self.optimizer.free_group(Part::TextEncoder.group_name());
        }
        let ga = self.plan.steps.gradient_accumulation_steps;
        let multiplier = grad_multiplier(self.state.loss_scale.as_ref(), ga);
        let lrs = LearningRates::at_step(&self.optimizer, &self.lr_schedule, self.state.global_step);
        let mut accumulated = GradAccumulator::default();
        let mut loss_sum = 0.0;
        for _ in 0..ga {
            let Some((e, index, batch)) = self.state.sampler.next_batch(&self.group) else {
                return Err(TrainError::Internal("the dataset ran out of batches".into()));
            };
            if e != *epoch {
                self.end_epoch(*epoch, parts, board)?;
                *epoch = e;
            }
            let b = self.batch_inputs(*epoch, index, &batch)?;
            let loss = self.micro_step(b, &mut accumulated, lrs, multiplier)?;
            if !loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    loss,
                    step: self.state.global_step + 1,
                    output_dir: self.output.dir.clone(),
                });
            }
            loss_sum += loss / ga as f64;
        }
        if !self.plan.optimizer.fused_backward_pass {
            let params =
                TrainedParams { unet: &self.model.unet_params, text_encoder: &self.model.text_params };
            let max_norm = self.plan.optimizer.max_grad_norm;
            let loss_scale = self.state.loss_scale.as_mut();
            let outcome =
                apply_accumulated(&mut self.optimizer, params, &accumulated, lrs, max_norm, loss_scale)?;
            if let UpdateOutcome::SkippedOverflow { new_scale } = outcome {
                tracing::warn!(
                    "fp16 gradients overflowed at step {}: step skipped, loss scale now {new_scale}",
                    self.state.global_step + 1
                );
            }
        }
        Ok((loss_sum, (lrs.unet, lrs.text_encoder)))
    }

    /// Forward and backward of one micro-batch; its gradients go to `accumulated`, or, with
    /// `--fused_backward_pass`, straight into the optimizer. Returns the loss.
    fn micro_step(
        &mut self,
        b: BatchInputs,
        accumulated: &mut GradAccumulator,
        lrs: LearningRates,
        multiplier: f64,
    ) -> Result<f64> {
        let inputs = StepInputs {
            latents: b.latents,
            captions: &b.captions,
            loss_weights: &b.loss_weights,
            masks: b.masks,
        };
        let settings =
            step_settings(self.plan, &self.loss, &self.schedule, self.train_text_encoder, multiplier);
        let params = TrainedParams { unet: &self.model.unet_params, text_encoder: &self.model.text_params };
        let max_norm = self.plan.optimizer.max_grad_norm;
        let mut fused = FusedUpdate { optimizer: &mut self.optimizer, params, lrs, max_norm };
        let sink: &mut dyn GradSink =
            if self.plan.optimizer.fused_backward_pass { &mut fused } else { accumulated };
        // No weight changes until the update after the micro-step (not fused: see above).
        let _packings = self.packed_weights.as_ref().map(|p| p.step());
        let outcome = micro_step(&self.model, inputs, &settings, &mut self.state.noise_rng, sink)?;
        Ok(outcome.loss)
    }

    fn end_epoch(&self, epoch: u64, parts: &mut [Box<dyn RunPart>], board: &mut Board) -> Result<()> {
        for p in parts.iter_mut() {
            p.at_epoch_end(self, epoch, board)?;
        }
        Ok(())
    }
}

fn vae_freed() -> TrainError {
    TrainError::Internal("the VAE was freed but is still needed".into())
}

fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
