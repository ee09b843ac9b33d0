//! The DreamBooth loop of kohya's train_db.py: bucketed batches of instance and reg images,
//! U-Net and text encoder trained together, saving and exact resume.

mod latent_cache;
mod sampling;
mod saving;
pub mod setup;
pub mod step;
mod validation;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sdbooth_data::{load_batch, BatchRef, DatasetGroup, SampleContext, Sampler};
use sdbooth_models::ddpm::DdpmSchedule;

use crate::args::types::MixedPrecision;
use crate::args::TrainArgs;
use crate::error::{Result, TrainError};
use crate::logs::{LossRecorder, StepRecord, TAG_LOSS, TAG_LOSS_EPOCH, TAG_LR_TEXT_ENCODER, TAG_LR_UNET};
use crate::optim::{clip_coef, per_tensor_clip_coef, Optimizer};

pub use saving::SavedState;
use setup::{Model, Output, TEXT_ENCODER_GROUP, UNET_GROUP};
use step::{micro_step, normal_tensor, GradBuffer, StepInputs, StepSettings};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub global_step: u64,
    pub epochs: u64,
    pub final_model: PathBuf,
    pub final_loss: f64,
    pub mean_step_seconds: f64,
}

/// fp16's dynamic loss scale (torch.cuda.amp.GradScaler's defaults).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct LossScale {
    scale: f64,
    good_steps: u64,
}

impl LossScale {
    const GROWTH_INTERVAL: u64 = 2000;

    fn new() -> Self {
        LossScale { scale: 65536.0, good_steps: 0 }
    }

    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
    }
}

/// Set by Ctrl-C: the loop finishes the step in flight, saves a state and stops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The first Ctrl-C asks for a clean stop after the current step; a second one quits at once.
fn install_interrupt_handler() {
    let result = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: quitting without saving");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: saving a state after this step (Ctrl-C again to quit at once)");
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

struct Trainer<'a> {
    args: &'a TrainArgs,
    model: Model,
    group: DatasetGroup,
    output: Output,
    optimizer: Optimizer,
    sampler: Sampler,
    noise_rng: ChaCha8Rng,
    vae_rng: ChaCha8Rng,
    schedule: DdpmSchedule,
    alphas_cumprod: Vec<f32>,
    latent_cache: Option<HashMap<(usize, usize), Tensor>>,
    seed: u64,
    global_step: u64,
    max_train_steps: u64,
    num_epochs: u64,
    train_text_encoder: bool,
    loss_scale: Option<LossScale>,
    recorder: LossRecorder,
    noise_args: crate::noise::NoiseArgs,
    loss_args: crate::loss::LossArgs,
    lr_schedule: crate::lr::LrSchedule,
    monitor: sampling::Monitor,
    /// Threads that decode and augment images (`--max_data_loader_n_workers`).
    loader_pool: rayon::ThreadPool,
}

/// Runs `sdbooth train` (not the dry run): refuses flags this build does not implement, then
/// trains and writes the model.
pub fn train(args: &TrainArgs) -> Result<TrainSummary> {
    if let Err(refusals) = args.check_supported() {
        return Err(TrainError::Config(refusals.join("\n")));
    }
    train_checked(args)
}

/// [`train`] without the supported-flags check (tests of features whose flags are not flipped yet).
pub fn train_checked(args: &TrainArgs) -> Result<TrainSummary> {
    let seed = args.training.seed.unwrap_or(42);
    let group = setup::datasets(args)?;
    // What kohya prints before training: subsets, repeats, reg balancing, buckets.
    let opts = args.dataset_options().map_err(|e| TrainError::Config(e.to_string()))?;
    eprintln!("{}", sdbooth_data::DryRunReport::new(&group, &opts).to_text());
    let batches_per_epoch = group.epoch_batches(seed, 1).len() as u64;
    if batches_per_epoch == 0 {
        return Err(TrainError::Config("the dataset has no images to train on".into()));
    }
    let plan = sdbooth_data::step_plan(
        batches_per_epoch,
        args.training.gradient_accumulation_steps,
        args.training.max_train_steps,
        args.training.max_train_epochs,
        1,
    );
    check_options(args)?;
    if args.memory.mixed_precision == MixedPrecision::Bf16 && setup::device().is_cpu() {
        eprintln!("note: --mixed_precision bf16 computes in f32 on the CPU (candle has no CPU bf16 matmul)");
    }
    let model = setup::load(args)?;
    let output = Output::new(args, &model)?;
    // kohya: no --stop_text_encoder_training trains it throughout; a negative value never.
    let stop_te = args.training.stop_text_encoder_training.unwrap_or(plan.max_train_steps as i64 + 1);
    let train_text_encoder = stop_te > 0;
    let optimizer = setup::build_optimizer(args, &model, train_text_encoder, seed)?;
    let schedule = if args.loss.zero_terminal_snr {
        DdpmSchedule::sd().with_zero_terminal_snr()
    } else {
        DdpmSchedule::sd()
    };
    let alphas_cumprod = schedule.alphas_cumprod.clone();
    let monitor = sampling::Monitor::new(args, &group, &model, seed)?;
    let mut trainer = Trainer {
        args,
        sampler: Sampler::new(&group, seed),
        group,
        model,
        output,
        optimizer,
        noise_rng: ChaCha8Rng::seed_from_u64(seed),
        vae_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5641_4500),
        schedule,
        alphas_cumprod,
        latent_cache: None,
        seed,
        global_step: 0,
        max_train_steps: plan.max_train_steps,
        num_epochs: plan.num_epochs,
        train_text_encoder,
        loss_scale: (args.memory.mixed_precision == MixedPrecision::Fp16).then(LossScale::new),
        recorder: LossRecorder::default(),
        noise_args: setup::noise_args(args),
        lr_schedule: setup::lr_schedule(args, plan.max_train_steps)?,
        loader_pool: rayon::ThreadPoolBuilder::new()
            .num_threads(args.training.max_data_loader_n_workers.max(1) as usize)
            .build()
            .map_err(|e| TrainError::Config(format!("image loader threads: {e}")))?,
        loss_args: setup::loss_args(args, false),
        monitor,
    };
    trainer.loss_args.v_parameterization = trainer.model.v_parameterization;
    if args.training.cache_latents || args.training.cache_latents_to_disk {
        trainer.cache_latents()?;
    }
    if let Some(dir) = &args.saving.resume {
        trainer.resume(dir)?;
    }
    install_interrupt_handler();
    trainer.run(stop_te)
}

/// Options whose combinations kohya refuses, or that this loop cannot honour.
fn check_options(args: &TrainArgs) -> Result<()> {
    let m = &args.memory;
    let caching = args.training.cache_latents || args.training.cache_latents_to_disk;
    if caching && args.dataset.flip_aug {
        return Err(TrainError::Config(
            "--cache_latents with --flip_aug is not supported yet (kohya caches both orientations)".into(),
        ));
    }
    if args.optimizer.fused_backward_pass {
        if args.training.gradient_accumulation_steps > 1 {
            return Err(TrainError::Config(
                "--fused_backward_pass updates each block as soon as its gradients are final, so it cannot \
                 accumulate gradients: drop --gradient_accumulation_steps"
                    .into(),
            ));
        }
        if m.mixed_precision == MixedPrecision::Fp16 {
            return Err(TrainError::Config(
                "--fused_backward_pass cannot skip an fp16 step that overflows once blocks are updated: use \
                 --mixed_precision bf16 or no"
                    .into(),
            ));
        }
    }
    Ok(())
}

impl Trainer<'_> {
    fn sample_context(&self, epoch: u64) -> SampleContext {
        SampleContext {
            seed: self.seed,
            epoch,
            step: self.global_step,
            max_train_steps: self.max_train_steps,
        }
    }

    /// Encodes every image once (kohya's --cache_latents / --cache_latents_to_disk).
    fn cache_latents(&mut self) -> Result<()> {
        let vae_params =
            self.model.vae_params.as_ref().ok_or_else(|| TrainError::Config("VAE was freed".into()))?;
        let total: usize = self.group.datasets.iter().map(|d| d.images.len()).sum();
        let bar = progress_bar(total as u64, "caching latents");
        let settings = latent_cache::CacheSettings {
            seed: self.seed,
            to_disk: self.args.training.cache_latents_to_disk,
            skip_cache_check: self.args.training.skip_cache_check,
            vae_batch_size: self.args.training.vae_batch_size as usize,
        };
        let ctx = self.sample_context(1);
        let cache = latent_cache::build(&self.group, &self.model.vae, vae_params, &settings, &ctx, &bar)?;
        bar.finish_and_clear();
        self.latent_cache = Some(cache);
        // Without samples to decode, nothing needs the VAE any more (`--highvram` keeps it).
        if !self.args.memory.highvram && self.args.sampling.sample_prompts.is_none() {
            self.model.vae_params = None;
        }
        Ok(())
    }

    /// Latents, captions, loss weights and masks of one batch.
    fn batch_inputs(&mut self, epoch: u64, index: usize, batch: &BatchRef) -> Result<BatchInputs> {
        let ctx = self.sample_context(epoch);
        let group = &self.group;
        let loaded = self
            .loader_pool
            .install(|| load_batch(group, batch, index, &ctx))
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let (b, h, w) = (loaded.samples.len(), loaded.height as usize, loaded.width as usize);
        let device = setup::device();
        let latents = match &self.latent_cache {
            Some(cache) => {
                let parts: Vec<Tensor> = batch
                    .images
                    .iter()
                    .map(|&i| {
                        cache
                            .get(&(batch.dataset, i))
                            .cloned()
                            .ok_or_else(|| TrainError::Config("latent not cached".into()))
                    })
                    .collect::<Result<_>>()?;
                Tensor::cat(&parts, 0)?
            }
            None => {
                let vae_params = self
                    .model
                    .vae_params
                    .as_ref()
                    .ok_or_else(|| TrainError::Config("VAE was freed".into()))?;
                let images = Tensor::from_vec(loaded.pixels, (b, 3, h, w), &device)?;
                let f = self.model.vae.downscale_factor();
                let noise = normal_tensor(&mut self.vae_rng, &[b, 4, h / f, w / f], &device)?;
                self.model
                    .vae
                    .encode_to_latents(vae_params, &images, &noise, None)
                    .map_err(setup::model_err)?
            }
        };
        let masks = match loaded.masks {
            Some(m) if self.args.loss.masked_loss => Some(Tensor::from_vec(m, (b, h, w), &device)?),
            _ => None,
        };
        Ok(BatchInputs { latents, captions: loaded.captions, loss_weights: loaded.loss_weights, masks })
    }

    fn resume(&mut self, dir: &str) -> Result<()> {
        let dir = if dir == "auto" {
            match crate::state::find_latest_state(&self.output.dir)? {
                Some(d) => d,
                None => {
                    tracing::warn!(
                        "--resume auto: no saved state in {}, starting fresh",
                        self.output.dir.display()
                    );
                    return Ok(());
                }
            }
        } else {
            PathBuf::from(dir)
        };
        let saved = saving::load_state(&dir, &mut self.model)?;
        self.optimizer = saved.optimizer;
        self.global_step = saved.global_step;
        self.noise_rng = saved.noise_rng;
        self.vae_rng = saved.vae_rng;
        self.sampler = Sampler::resume(&self.group, saved.sampler);
        self.recorder = saved.recorder;
        if let Some(ls) = saved.loss_scale {
            self.loss_scale = Some(ls);
        }
        eprintln!("resumed from {} at step {}", dir.display(), self.global_step);
        Ok(())
    }

    fn run(mut self, stop_te: i64) -> Result<TrainSummary> {
        let ga = self.args.training.gradient_accumulation_steps.max(1);
        let fused = self.args.optimizer.fused_backward_pass;
        let bar = progress_bar(self.max_train_steps, "steps");
        bar.set_position(self.global_step);
        let mut tb = match &self.args.logging.logging_dir {
            Some(dir) => {
                let d = crate::logs::kohya_log_dir(
                    std::path::Path::new(dir),
                    self.args.logging.log_prefix.as_deref(),
                    self.args.logging.log_tracker_name.as_deref(),
                );
                Some(crate::logs::TensorBoardWriter::create(&d)?)
            }
            None => None,
        };
        let log_name = format!("{}.jsonl", self.output.name.as_deref().unwrap_or("train"));
        let mut jsonl = crate::logs::JsonlWriter::append(&self.output.dir.join(log_name))?;
        let mut step_times = Vec::new();
        let mut last_loss = f64::NAN;
        let mut epoch = self.sampler.state().epoch;
        sampling::at_start(&mut self, tb.as_mut())?;
        while self.global_step < self.max_train_steps {
            let started = Instant::now();
            if self.train_text_encoder && self.global_step as i64 >= stop_te {
                eprintln!("stop text encoder training at step {}", self.global_step);
                self.train_text_encoder = false;
                self.optimizer.free_group(TEXT_ENCODER_GROUP);
            }
            let scale = self.loss_scale.map_or(1.0, |s| s.scale);
            let multiplier = scale / ga as f64;
            let lr_unet = self.lr_of(UNET_GROUP);
            let lr_te = self.lr_of(TEXT_ENCODER_GROUP);
            let mut buffer = GradBuffer::default();
            let mut loss_sum = 0.0;
            let max_norm = self.args.optimizer.max_grad_norm;
            for _ in 0..ga {
                let Some((e, index, batch)) = self.sampler.next_batch(&self.group) else {
                    return Err(TrainError::Config("the dataset ran out of batches".into()));
                };
                if e != epoch {
                    self.end_epoch(epoch, tb.as_mut())?;
                    epoch = e;
                }
                let b = self.batch_inputs(epoch, index, &batch)?;
                let inputs = StepInputs {
                    latents: b.latents,
                    captions: &b.captions,
                    loss_weights: &b.loss_weights,
                    masks: b.masks,
                };
                let settings = StepSettings {
                    noise: &self.noise_args,
                    loss: &self.loss_args,
                    schedule: &self.schedule,
                    alphas_cumprod: &self.alphas_cumprod,
                    train_text_encoder: self.train_text_encoder,
                    checkpointing: self.args.memory.gradient_checkpointing,
                    compute_dtype: setup::compute_dtype(self.args),
                    clip_skip: self.args.model.clip_skip.map(|v| v as usize),
                    max_token_length: self.args.model.max_token_length.map(|v| v as usize),
                    no_token_padding: self.args.model.no_token_padding,
                    weighted_captions: self.args.dataset.weighted_captions,
                    grad_multiplier: multiplier,
                };
                let loss = if fused {
                    let optimizer = &mut self.optimizer;
                    let model = &self.model;
                    let mut sink = |part: &str, name: &str, g: &Tensor| -> Result<()> {
                        let (store, lr) = if part == "unet" {
                            (&model.unet_params, lr_unet)
                        } else {
                            (&model.text_params, lr_te)
                        };
                        let var = store.var(name).map_err(setup::model_err)?;
                        // kohya's fused path clips each tensor on its own.
                        let coef = if max_norm > 0.0 { per_tensor_clip_coef(g, max_norm)? } else { 1.0 };
                        optimizer.step_param_scaled(name, var, g, lr, coef)
                    };
                    micro_step(&self.model, inputs, &settings, &mut self.noise_rng, &mut sink)?
                } else {
                    let mut sink = |part: &str, name: &str, g: &Tensor| buffer.add(part, name, g);
                    micro_step(&self.model, inputs, &settings, &mut self.noise_rng, &mut sink)?
                };
                let loss = loss.loss;
                if !loss.is_finite() {
                    return Err(TrainError::Config(format!(
                        "the loss became {loss} at step {}; stopped without saving (the last saved model and state \
                         in {} are intact)",
                        self.global_step + 1,
                        self.output.dir.display()
                    )));
                }
                loss_sum += loss / ga as f64;
            }
            if !fused {
                let max_norm = self.args.optimizer.max_grad_norm;
                let lrs = (lr_unet, lr_te);
                apply_update(
                    &mut self.optimizer,
                    &self.model,
                    &buffer,
                    lrs,
                    max_norm,
                    self.loss_scale.as_mut(),
                    self.global_step,
                )?;
            }
            self.global_step += 1;
            last_loss = loss_sum;
            self.recorder.add(epoch, self.sampler.state().next_batch, loss_sum);
            let secs = started.elapsed().as_secs_f64();
            step_times.push(secs);
            let avr = self.recorder.moving_average();
            bar.set_message(format!("loss {loss_sum:.4} avr {avr:.4} lr {lr_unet:.2e} {secs:.2}s/step"));
            bar.set_position(self.global_step);
            let te_lr = self.train_text_encoder.then_some(lr_te);
            if let Some(tb) = tb.as_mut() {
                let mut scalars = vec![(TAG_LOSS, loss_sum as f32), (TAG_LR_UNET, lr_unet as f32)];
                if let Some(l) = te_lr {
                    scalars.push((TAG_LR_TEXT_ENCODER, l as f32));
                }
                scalars.push(("sdbooth/step_seconds", secs as f32));
                if let Some(rss) = peak_rss_bytes() {
                    scalars.push(("sdbooth/peak_rss_gib", (rss as f64 / (1u64 << 30) as f64) as f32));
                }
                tb.add_scalars(&scalars, self.global_step as i64)?;
            }
            jsonl.write(&StepRecord {
                step: self.global_step,
                epoch,
                loss: loss_sum as f32,
                avr_loss: avr as f32,
                lr_unet,
                lr_text_encoder: te_lr,
                step_seconds: secs,
                peak_rss_bytes: peak_rss_bytes(),
            })?;
            self.save_on_step(epoch)?;
            if INTERRUPTED.load(Ordering::SeqCst) {
                bar.finish_and_clear();
                let dir = saving::save_interrupted(&self, epoch)?;
                return Err(TrainError::Config(format!(
                    "interrupted after step {}; the state is saved in {} (continue with --resume {})",
                    self.global_step,
                    dir.display(),
                    dir.display()
                )));
            }
            sampling::after_step(&mut self, epoch, tb.as_mut())?;
        }
        bar.finish_and_clear();
        self.end_epoch(epoch, tb.as_mut())?;
        let final_model = saving::save_final(&mut self, epoch)?;
        sampling::finish(&mut self, epoch, &final_model, tb.as_mut())?;
        let mean = if step_times.is_empty() {
            0.0
        } else {
            step_times.iter().sum::<f64>() / step_times.len() as f64
        };
        Ok(TrainSummary {
            global_step: self.global_step,
            epochs: epoch,
            final_model,
            final_loss: last_loss,
            mean_step_seconds: mean,
        })
    }

    /// The learning rate of a parameter group at this step (0 for a group that is gone).
    fn lr_of(&self, group: &str) -> f64 {
        let Some(g) = self.optimizer.groups.iter().find(|g| g.name == group) else { return 0.0 };
        self.lr_schedule.lr(g.lr, self.global_step)
    }

    fn end_epoch(&mut self, epoch: u64, mut tb: Option<&mut crate::logs::TensorBoardWriter>) -> Result<()> {
        if let Some(tb) = tb.as_deref_mut() {
            tb.add_scalar(TAG_LOSS_EPOCH, self.recorder.moving_average() as f32, epoch as i64)?;
        }
        saving::save_on_epoch_end(self, epoch)?;
        sampling::at_epoch_end(self, epoch, tb)
    }

    fn save_on_step(&mut self, epoch: u64) -> Result<()> {
        saving::save_on_step(self, epoch)
    }
}

/// The non-fused update: unscale (fp16; an overflow skips the step), clip the global gradient
/// norm over everything trained (as accelerate's clip_grad_norm_), step every parameter.
pub(crate) fn apply_update(
    optimizer: &mut Optimizer,
    model: &Model,
    buffer: &GradBuffer,
    (lr_unet, lr_te): (f64, f64),
    max_norm: f64,
    loss_scale: Option<&mut LossScale>,
    global_step: u64,
) -> Result<()> {
    let mut unscale = 1.0f64;
    if let Some(ls) = loss_scale {
        let finite = buffer.all_finite()?;
        ls.update(finite);
        if !finite {
            eprintln!(
                "fp16 gradients overflowed at step {}: step skipped, loss scale now {}",
                global_step + 1,
                ls.scale
            );
            return Ok(());
        }
        unscale = 1.0 / ls.scale;
    }
    // A fixed order keeps the norm's summation, and so the run, deterministic.
    let mut keys: Vec<&(String, String)> = buffer.grads.keys().collect();
    keys.sort();
    let mut coef = unscale as f32;
    if max_norm > 0.0 {
        let mut total = 0.0f64;
        for k in &keys {
            total += buffer.grads[*k].sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        coef *= clip_coef(total.sqrt() * unscale, max_norm);
    }
    for k in keys {
        let (part, name) = k;
        let (store, lr) =
            if part == "unet" { (&model.unet_params, lr_unet) } else { (&model.text_params, lr_te) };
        let var = store.var(name).map_err(setup::model_err)?;
        optimizer.step_param_scaled(name, var, &buffer.grads[k], lr, coef)?;
    }
    Ok(())
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
