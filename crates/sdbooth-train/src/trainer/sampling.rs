//! What the loop shows besides the loss: sample images (kohya's `--sample_every_n_steps`,
//! `--sample_every_n_epochs`, `--sample_at_first`, `--sample_prompts`, `--sample_sampler`),
//! validation loss on held-out images, and the HTML run report at the end.
//!
//! None of it draws from a training stream: a sample's noise comes from its prompt's `--d` seed,
//! or (kohya would draw a fresh random seed) from `--seed` and the prompt's index, so the same
//! prompt gives comparable images at every step; validation has its own seeded noise. Training
//! is bit-identical with all of this on or off, and resume stays exact.
//!
//! When validation runs: with every set of samples (step or epoch trigger); without any sample
//! trigger, at every epoch end; and always before the first step (fresh runs) and after the last.

use std::path::{Path, PathBuf};

use sdbooth_models::ParamStore;
use sdbooth_sample::generate::{write_png, Pipeline, Request};
use sdbooth_sample::prompts::{kohya_sample_size, PromptSpec, KOHYA_SAMPLE_SIZE};
use sdbooth_sample::report::{BucketRow, ImageLoss, RunReport, SampleGroup, StepPoint};

use super::parts::{Board, RunPart};
use super::validation::{per_image_table, Validation, ValidationRecord};
use super::Trainer;
use crate::error::{Result, TrainError};
use crate::logs::{JsonlWriter, StepRecord};

pub const TAG_LOSS_VALIDATION: &str = "loss/validation";

/// The sampling, validation and report part of a run.
pub(super) struct Monitor {
    prompts: Vec<PromptSpec>,
    /// The VAE kept for decoding samples (the trainer frees its own after latent caching).
    vae: Option<ParamStore>,
    validation: Option<Validation>,
    last_validation_step: Option<u64>,
}

impl Monitor {
    /// Reads the prompt file and prepares the held-out images; call while the model has its VAE.
    pub fn new(t: &Trainer<'_>) -> Result<Self> {
        // Read (and checked) with the plan, before the model was loaded.
        let prompts = t.plan.sampling.prompt_specs.clone();
        let vae = if prompts.is_empty() { None } else { t.model.vae_params.clone() };
        Ok(Monitor {
            prompts,
            vae,
            validation: Validation::new(t.plan, &t.group, &t.model)?,
            last_validation_step: None,
        })
    }
}

impl RunPart for Monitor {
    /// Before the first step: `--sample_at_first` samples (kohya's `e000000` names) and the first
    /// validation. A resumed run skips both (the interrupted run made them).
    fn at_start(&mut self, t: &Trainer<'_>, board: &mut Board) -> Result<()> {
        if t.state.global_step != 0 {
            return Ok(());
        }
        if t.plan.sampling.at_first {
            self.sample_images(t, Some(0))?;
        }
        self.validate(t, 0, board)
    }

    /// After each optimizer step: `--sample_every_n_steps` (unless `--sample_every_n_epochs` is
    /// set, which overrides it as in kohya).
    fn after_step(&mut self, t: &Trainer<'_>, r: &StepRecord, board: &mut Board) -> Result<()> {
        let s = &t.plan.sampling;
        if let (Some(n), None) = (s.every_n_steps, s.every_n_epochs) {
            if t.state.global_step.is_multiple_of(n) {
                self.sample_images(t, None)?;
                self.validate(t, r.epoch, board)?;
            }
        }
        // A report at each --save_every_n_steps too, so an interrupted run has one.
        if t.plan.saving.every_n_steps.is_some_and(|n| t.state.global_step.is_multiple_of(n))
            && t.state.global_step < t.max_train_steps
        {
            self.write_report(t, r.epoch, None, &read_validation(&validation_log(t)))?;
        }
        Ok(())
    }

    /// At the end of each epoch: `--sample_every_n_epochs`; validation when no sampling schedule.
    fn at_epoch_end(&mut self, t: &Trainer<'_>, epoch: u64, board: &mut Board) -> Result<()> {
        let s = &t.plan.sampling;
        match (s.every_n_steps, s.every_n_epochs) {
            (_, Some(n)) if epoch.is_multiple_of(n) => {
                self.sample_images(t, Some(epoch))?;
                self.validate(t, epoch, board)
            }
            (None, None) => self.validate(t, epoch, board),
            _ => Ok(()),
        }
    }

    /// After the final save: the last validation (when this step has none yet), the per-image
    /// table and `report.html`.
    fn at_end(&mut self, t: &Trainer<'_>, epoch: u64, board: &mut Board) -> Result<()> {
        self.validate(t, epoch, board)?;
        let records = read_validation(&validation_log(t));
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            let rows: Vec<String> = per_image_table(first, last)
                .into_iter()
                .map(|(path, _, f, l)| format!("  {l:.5}  (was {f:.5})  {path}"))
                .collect();
            tracing::info!(
                "validation loss per held-out image (highest first; first → last evaluation):\n{}",
                rows.join("\n")
            );
        }
        let final_model = t.output.final_model_path();
        let path = self.write_report(t, epoch, Some(&final_model), &records)?;
        tracing::info!("report: {}", path.display());
        Ok(())
    }
}

impl Monitor {
    fn write_report(
        &self,
        t: &Trainer<'_>,
        epoch: u64,
        final_model: Option<&Path>,
        records: &[ValidationRecord],
    ) -> Result<PathBuf> {
        let path = t.output.dir.join("report.html");
        let report = build_report(t, &self.prompts, epoch, final_model, records);
        sdbooth_sample::report::write_report(&path, &report).map_err(|e| TrainError::io(&path, e))?;
        Ok(path)
    }

    fn validate(&mut self, t: &Trainer<'_>, epoch: u64, board: &mut Board) -> Result<()> {
        let Some(v) = &self.validation else { return Ok(()) };
        if self.last_validation_step == Some(t.state.global_step) {
            return Ok(());
        }
        let per_image = v.evaluate(t)?;
        let record = v.record(t.state.global_step, epoch, per_image);
        tracing::info!("validation loss at step {}: {:.5}", t.state.global_step, record.loss);
        if let Some(tb) = board {
            tb.add_scalar(TAG_LOSS_VALIDATION, record.loss as f32, t.state.global_step as i64)?;
        }
        JsonlWriter::append(&validation_log(t))?.write(&record)?;
        self.last_validation_step = Some(t.state.global_step);
        Ok(())
    }

    /// kohya's sample_image_inference: one PNG per prompt in `output_dir/sample`, named
    /// `{output_name}_{e{epoch:06d} | {step:06d}}_{i:02d}_{%Y%m%d%H%M%S}{_seed}.png` (UTC time).
    fn sample_images(&self, t: &Trainer<'_>, epoch: Option<u64>) -> Result<()> {
        let Some(vae) = self.vae.as_ref() else { return Ok(()) };
        let dir = t.output.dir.join("sample");
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        tracing::info!("generating sample images at step {}", t.state.global_step);
        let pipe = Pipeline {
            config: &t.model.config,
            unet: &t.model.unet_params,
            text_encoder: &t.model.text_params,
            vae,
            tokenizer: &t.model.tokenizer,
            v_prediction: t.model.v_parameterization,
            schedule: &t.schedule,
            clip_skip: t.plan.text.clip_skip,
            max_token_length: t.plan.text.max_token_length,
            dtype: t.plan.precision.compute_dtype,
            device: &t.plan.device,
        };
        // kohya's defaults for a prompt without options.
        let defaults = Request {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: KOHYA_SAMPLE_SIZE.0,
            height: KOHYA_SAMPLE_SIZE.1,
            steps: 30,
            scale: 7.5,
            seed: 0,
            sampler: t.plan.sampling.sampler.clone(),
        };
        let ts = sdbooth_checkpoint::time::UtcTime::now().compact();
        let num_suffix = match epoch {
            Some(e) => format!("e{e:06}"),
            None => format!("{:06}", t.state.global_step),
        };
        let prefix = t.output.name.as_ref().map(|n| format!("{n}_")).unwrap_or_default();
        let model_name = t.output.name.clone().unwrap_or_else(|| t.model.loaded.source.spec.clone());
        for (i, spec) in self.prompts.iter().enumerate() {
            let mut req = Request::from_spec(spec, &defaults);
            (req.width, req.height) = kohya_sample_size((req.width, req.height));
            req.seed = spec.seed.unwrap_or_else(|| sdbooth_data::Streams::new(t.plan.seed).prompt_seed(i));
            let rgb =
                pipe.generate(&req).map_err(|e| TrainError::Sample { index: i, source: Box::new(e) })?;
            let seed_suffix = spec.seed.map(|s| format!("_{s}")).unwrap_or_default();
            let path = dir.join(format!("{prefix}{num_suffix}_{i:02}_{ts}{seed_suffix}.png"));
            write_png(&path, req.width, req.height, &rgb, &req.a1111_parameters(&model_name))
                .map_err(|e| TrainError::Sample { index: i, source: Box::new(e) })?;
        }
        Ok(())
    }
}

fn validation_log(t: &Trainer<'_>) -> PathBuf {
    t.output.dir.join(format!("{}.validation.jsonl", t.output.log_stem()))
}

/// Records of a JSONL log; a resumed run appends, so the last record of a step wins.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, step: impl Fn(&T) -> u64) -> Vec<T> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut by_step = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Ok(r) = serde_json::from_str::<T>(line) {
            by_step.insert(step(&r), r);
        }
    }
    by_step.into_values().collect()
}

fn read_validation(path: &Path) -> Vec<ValidationRecord> {
    read_jsonl(path, |r: &ValidationRecord| r.step)
}

fn build_report(
    t: &Trainer<'_>,
    prompts: &[PromptSpec],
    epoch: u64,
    final_model: Option<&Path>,
    validation: &[ValidationRecord],
) -> RunReport {
    let stem = t.output.log_stem();
    let steps: Vec<StepRecord> =
        read_jsonl(&t.output.dir.join(format!("{stem}.jsonl")), |r: &StepRecord| r.step);
    let mut r = RunReport { title: format!("sdbooth run: {stem}"), ..Default::default() };
    let mean = if steps.is_empty() {
        0.0
    } else {
        steps.iter().map(|s| s.step_seconds).sum::<f64>() / steps.len() as f64
    };
    r.summary = vec![
        ("steps".into(), format!("{} / {}", t.state.global_step, t.max_train_steps)),
        ("epochs".into(), format!("{epoch} / {}", t.num_epochs)),
        (
            "final model".into(),
            final_model.map_or("(training in progress)".into(), |p| p.display().to_string()),
        ),
        ("final loss (average)".into(), steps.last().map_or("-".into(), |s| format!("{:.5}", s.avr_loss))),
        ("mean step time".into(), format!("{mean:.3} s")),
        (
            "peak memory (RSS)".into(),
            steps
                .iter()
                .filter_map(|s| s.peak_rss_bytes)
                .max()
                .map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0)),
        ),
    ];
    if let Some(v) = validation.last() {
        r.summary.push((
            "validation loss (last)".into(),
            format!("{:.5} on {} image(s)", v.loss, v.per_image.len()),
        ));
    }
    r.steps = steps
        .iter()
        .map(|s| StepPoint {
            step: s.step,
            epoch: s.epoch,
            loss: s.loss as f64,
            avr_loss: s.avr_loss as f64,
            lr_unet: s.lr_unet,
            lr_text_encoder: s.lr_text_encoder,
            step_seconds: s.step_seconds,
            peak_rss_bytes: s.peak_rss_bytes,
        })
        .collect();
    r.validation = validation.iter().map(|v| (v.step, v.loss)).collect();
    if let (Some(first), Some(last)) = (validation.first(), validation.last()) {
        r.per_image = per_image_table(first, last)
            .into_iter()
            .map(|(path, caption, first, last)| ImageLoss { path, caption, first, last })
            .collect();
    }
    // The last step of each epoch places epoch-named samples on the step axis.
    let epoch_end = |e: u64| steps.iter().filter(|s| s.epoch == e).map(|s| s.step).max().unwrap_or(0);
    r.samples = sample_groups(&t.output.dir.join("sample"), t.output.name.as_deref(), prompts, epoch_end);
    r.checkpoints = checkpoints(&t.output.dir);
    for (di, d) in t.group.datasets.iter().enumerate() {
        for (bi, b) in d.buckets.iter().enumerate() {
            r.buckets.push(BucketRow {
                dataset: di,
                index: bi,
                width: b.reso.0,
                height: b.reso.1,
                count: b.items.len(),
            });
        }
    }
    r.dataset_text = sdbooth_data::DryRunReport::new(&t.group, &t.plan.data.options).to_text();
    r.config = t.plan.flags.clone();
    r
}

/// Sample PNGs grouped by their step/epoch part, in step order; a re-made (suffix, index) keeps
/// the newest file.
fn sample_groups(
    dir: &Path,
    output_name: Option<&str>,
    prompts: &[PromptSpec],
    epoch_end: impl Fn(u64) -> u64,
) -> Vec<SampleGroup> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    let prefix = output_name.map(|n| format!("{n}_")).unwrap_or_default();
    // (step, label) -> index -> file
    let mut groups: std::collections::BTreeMap<(u64, String), std::collections::BTreeMap<usize, String>> =
        Default::default();
    for name in names {
        let Some(rest) = name.strip_suffix(".png").and_then(|n| n.strip_prefix(&prefix)) else { continue };
        let mut parts = rest.split('_');
        let (Some(num), Some(idx)) = (parts.next(), parts.next()) else { continue };
        let Ok(idx) = idx.parse::<usize>() else { continue };
        let key = if let Some(e) = num.strip_prefix('e').and_then(|e| e.parse::<u64>().ok()) {
            let step = if e == 0 { 0 } else { epoch_end(e) };
            (
                step,
                if e == 0 {
                    "before training (step 0)".to_string()
                } else {
                    format!("epoch {e} (step {step})")
                },
            )
        } else if let Ok(s) = num.parse::<u64>() {
            (s, format!("step {s}"))
        } else {
            continue;
        };
        groups.entry(key).or_default().insert(idx, name);
    }
    groups
        .into_iter()
        .map(|((_, label), files)| SampleGroup {
            label,
            images: files
                .into_iter()
                .map(|(i, f)| {
                    let prompt = prompts.get(i).map_or_else(|| format!("prompt {i}"), |p| p.prompt.clone());
                    (prompt, dir.join(f))
                })
                .collect(),
        })
        .collect()
}

/// Model files and state folders in the output folder.
fn checkpoints(dir: &Path) -> Vec<(PathBuf, Option<u64>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.filter_map(|e| e.ok()) {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            if name.ends_with("-state") || name == "last-state" || path.join("model_index.json").is_file() {
                out.push((path, None));
            }
        } else if [".safetensors", ".ckpt"].iter().any(|x| name.ends_with(x)) {
            out.push((path, Some(meta.len())));
        }
    }
    out.sort();
    out
}
