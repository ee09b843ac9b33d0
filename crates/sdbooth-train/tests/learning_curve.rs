//! Learning, not just shrinking: one toy image (a fixed latent) with fixed noise and timesteps per
//! step, trained on tiny-sd1 (U-Net + text encoder, AdamW lr 1e-4, max_grad_norm 1.0); our loss
//! curve against PyTorch's for the same run (tools/goldens/learning_curve.py), by the mean
//! relative difference per step (acceptance: ≤ 1%).
//!
//! The 20-step test runs in the default suite; the 200-step one is ignored (~10 s of steps in the
//! test profile, plus building the model):
//! `cargo test -p sdbooth-train --test learning_curve -- --ignored --nocapture`.
//!
//! Noise and timesteps come from the seeded scheme described in learning_curve.py (SplitMix64
//! stream, Box-Muller in f64 with the C library's log/cos, rounded to f32); the fixture holds the
//! per-step noise sums and timesteps so a drift in the scheme fails loudly instead of as a
//! curve mismatch.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdbooth_checkpoint::diffusers::save_diffusers;
use sdbooth_checkpoint::ModelParts;
use sdbooth_models::ddpm::DdpmSchedule;
use sdbooth_models::init::{fnv1a64, mix, random_params_with, InitStyle};
use sdbooth_models::ModelConfig;
use sdbooth_train::args::TrainArgs;
use sdbooth_train::noise::{add_noise, NoisedBatch};
use sdbooth_train::plan::TrainPlan;
use sdbooth_train::trainer::setup;
use sdbooth_train::trainer::step::{loss_and_grads, plain_token_ids, StepInputs, StepSettings};
use sdbooth_train::update::{apply_accumulated, GradAccumulator, LearningRates, TrainedParams};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Acceptance bound: mean relative difference per step.
const MEAN_REL_TOL: f64 = 0.01;

struct Golden {
    seed: u64,
    lr: f64,
    caption: String,
    model_seeds: (u64, u64),
    ids: Vec<i64>,
    latent_sum: f64,
    timesteps: Vec<u64>,
    noise_sums: Vec<f64>,
    losses_f32: Vec<f64>,
    losses_f64: Vec<f64>,
}

fn golden() -> Golden {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/learning_curve/learning_curve.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let f64s =
        |k: &str| -> Vec<f64> { v[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    Golden {
        seed: v["seed"].as_u64().unwrap(),
        lr: v["learning_rate"].as_f64().unwrap(),
        caption: v["caption"].as_str().unwrap().to_string(),
        model_seeds: (v["model_seeds"][0].as_u64().unwrap(), v["model_seeds"][1].as_u64().unwrap()),
        ids: v["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect(),
        latent_sum: v["latent_sum"].as_f64().unwrap(),
        timesteps: v["timesteps"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect(),
        noise_sums: f64s("noise_sums"),
        losses_f32: f64s("losses_f32"),
        losses_f64: f64s("losses_f64"),
    }
}

/// The scheme of learning_curve.py.
struct Scheme {
    seed: u64,
}

impl Scheme {
    fn key(&self, s: &str) -> u64 {
        fnv1a64(s) ^ mix(self.seed)
    }
    fn r(key: u64, j: u64) -> u64 {
        mix(key.wrapping_add((j + 1).wrapping_mul(GOLDEN)))
    }
    fn gaussian(&self, s: &str, n: usize) -> Vec<f32> {
        let k = self.key(s);
        (0..n as u64)
            .map(|i| {
                let (a, b) = (Self::r(k, 2 * i), Self::r(k, 2 * i + 1));
                let u1 = ((a >> 11) + 1) as f64 / (1u64 << 53) as f64;
                let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }
    fn timestep(&self, i: usize) -> u64 {
        Self::r(self.key(&format!("lc.t.{i}")), 0) % 1000
    }
}

/// tiny-sd1 with the AllRandom weights of train_step.py, as a Diffusers folder.
fn write_model(dir: &Path, seeds: (u64, u64)) -> PathBuf {
    let config = ModelConfig::tiny_sd1();
    let dev = Device::Cpu;
    let unet = random_params_with(
        &sdbooth_models::unet::param_shapes(&config.unet),
        seeds.0,
        InitStyle::AllRandom,
        &dev,
    )
    .unwrap();
    let text = random_params_with(
        &sdbooth_models::clip::param_shapes(&config.text),
        seeds.1,
        InitStyle::AllRandom,
        &dev,
    )
    .unwrap();
    let vae =
        random_params_with(&sdbooth_models::vae::param_shapes(&config.vae), 7, InitStyle::Standard, &dev)
            .unwrap();
    let (u, t, v) = (unet.to_tensors(), text.to_tensors(), vae.to_tensors());
    let out = dir.join("tiny-sd1");
    let parts = ModelParts { unet: &u, text_encoder: &t, vae: Some(&v) };
    save_diffusers(&out, &parts, &config, false, None, true).expect("diffusers folder written");
    out
}

/// Our losses for the first `steps` steps of the golden run, with `--mixed_precision` set to
/// `mixed_precision` ("no" or "bf16").
fn our_curve(g: &Golden, steps: usize, mixed_precision: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = write_model(dir.path(), g.model_seeds);
    let args = TrainArgs::try_parse_from([
        "--pretrained_model_name_or_path".to_string(),
        model_dir.display().to_string(),
        "--optimizer_type".into(),
        "AdamW".into(),
        "--learning_rate".into(),
        g.lr.to_string(),
        "--max_grad_norm".into(),
        "1.0".into(),
        "--mixed_precision".into(),
        mixed_precision.into(),
    ])
    .expect("flags parse");
    let plan = TrainPlan::resolve(&args).expect("flags resolve");
    let model = setup::load(&plan).expect("model loads");
    let mut opt = setup::build_optimizer(&plan, &model, true).unwrap();
    let lr_schedule = setup::lr_schedule(&plan, g.timesteps.len() as u64).unwrap();
    let schedule = DdpmSchedule::sd();
    let ac = schedule.alphas_cumprod.clone();
    let loss_args = model.loss_args(&plan);
    let settings = StepSettings {
        noise: &plan.noise,
        loss: &loss_args,
        schedule: &schedule,
        alphas_cumprod: &ac,
        train_text_encoder: true,
        checkpointing: false,
        compute_dtype: plan.precision.compute_dtype,
        clip_skip: None,
        max_token_length: None,
        no_token_padding: false,
        weighted_captions: false,
        grad_multiplier: 1.0,
    };
    let captions = vec![g.caption.clone()];
    let ids = plain_token_ids(&model.tokenizer, &captions, None, false, &Device::Cpu).unwrap();
    let ids: Vec<i64> = ids.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ids, g.ids, "token ids of {:?}", g.caption);

    let scheme = Scheme { seed: g.seed };
    let latent: Vec<f32> = scheme.gaussian("lc.latent", 256).iter().map(|&x| x * 0.8).collect();
    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    // Sums in another order than PyTorch's: equal to ~1e-15, while one value off by one f32 ulp
    // would move them by ~1e-7.
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-10;
    assert!(same(sum(&latent), g.latent_sum), "latent of the seeded scheme");
    let latents = Tensor::from_vec(latent.clone(), (1, 4, 8, 8), &Device::Cpu).unwrap();
    let mut losses = Vec::with_capacity(steps);
    for i in 0..steps {
        let noise = scheme.gaussian(&format!("lc.noise.{i}"), 256);
        assert!(same(sum(&noise), g.noise_sums[i]), "noise of step {i}");
        let t = scheme.timestep(i);
        assert_eq!(t, g.timesteps[i], "timestep of step {i}");
        let noisy = add_noise(&latent, &noise, 256, &[t], &ac).unwrap();
        let noised = NoisedBatch {
            noise: Tensor::from_vec(noise, (1, 4, 8, 8), &Device::Cpu).unwrap(),
            noisy_latents: Tensor::from_vec(noisy, (1, 4, 8, 8), &Device::Cpu).unwrap(),
            timesteps: vec![t],
        };
        let inputs =
            StepInputs { latents: latents.clone(), captions: &captions, loss_weights: &[1.0], masks: None };
        let mut grads = GradAccumulator::default();
        let out = loss_and_grads(&model, inputs, &noised, &settings, &mut grads).expect("step runs");
        losses.push(out.loss);
        // The trainer's non-fused update (fp32): global-norm clip, then every parameter stepped
        // with its group's scheduled learning rate.
        let lrs = LearningRates::at_step(&opt, &lr_schedule, i as u64);
        let params = TrainedParams { unet: &model.unet_params, text_encoder: &model.text_params };
        apply_accumulated(&mut opt, params, &grads, lrs, plan.optimizer.max_grad_norm, None).unwrap();
    }
    losses
}

fn rel_diffs(ours: &[f64], theirs: &[f64]) -> Vec<f64> {
    ours.iter().zip(theirs).map(|(a, b)| (a - b).abs() / b.abs()).collect()
}

fn check(steps: usize) {
    let g = golden();
    assert!(steps <= g.losses_f32.len());
    let ours = our_curve(&g, steps, "no");
    let d32 = rel_diffs(&ours, &g.losses_f32[..steps]);
    let d64 = rel_diffs(&ours, &g.losses_f64[..steps]);
    let mean = |d: &[f64]| d.iter().sum::<f64>() / d.len() as f64;
    let max = |d: &[f64]| d.iter().cloned().fold(0.0, f64::max);
    let window = |l: &[f64], a: usize, b: usize| l[a..b].iter().sum::<f64>() / (b - a) as f64;
    let w = (steps / 10).max(1);
    eprintln!(
        "{steps} steps: vs PyTorch f32 mean rel diff {:.2e} (max {:.2e}); vs PyTorch f64 mean {:.2e} (max {:.2e}); \
         loss over the first {w} steps {:.4} (PyTorch {:.4}), over the last {w} {:.4} (PyTorch {:.4})",
        mean(&d32),
        max(&d32),
        mean(&d64),
        max(&d64),
        window(&ours, 0, w),
        window(&g.losses_f32, 0, w),
        window(&ours, steps - w, steps),
        window(&g.losses_f32, steps - w, steps),
    );
    assert!(mean(&d32) <= MEAN_REL_TOL, "mean relative difference {:.2e} over {steps} steps", mean(&d32));
    assert!(
        mean(&d64) <= MEAN_REL_TOL,
        "mean relative difference to f64 {:.2e} over {steps} steps",
        mean(&d64)
    );
}

#[test]
fn first_20_steps_follow_pytorch() {
    check(20);
}

/// The acceptance run: all 200 steps (and the curve must actually go down).
#[test]
#[ignore = "200 steps, ~15 s: cargo test -p sdbooth-train --test learning_curve -- --ignored"]
fn curve_200_steps_follows_pytorch() {
    check(200);
    let g = golden();
    let first: f64 = g.losses_f32[..20].iter().sum::<f64>() / 20.0;
    let last: f64 = g.losses_f32[180..].iter().sum::<f64>() / 20.0;
    assert!(last < 0.7 * first, "PyTorch's curve itself should learn: {first} -> {last}");
}

/// Stated bound for `--mixed_precision bf16` against the f32 curve (PyTorch's f32 losses, which
/// our f32 run follows within 1%): mean relative difference per step over the 200 steps.
/// bf16 keeps 8 significant bits (2⁻⁸ ≈ 0.4% per rounding) and the differences compound over
/// training. Measured 2026-11-29 on AVX512_BF16 (Zen 4): mean 1.05e-3, max 3.97e-3; last-20-step
/// loss 0.5924 against 0.5926.
const BF16_MEAN_REL_TOL: f64 = 0.01;

/// The 200-step run in bf16 compute (f32 master weights): it learns, and stays within the stated
/// bound of the f32 curve. Runs in the default suite (CI), on whichever bf16 kernel the CPU has.
#[test]
fn curve_200_steps_in_bf16_follows_the_f32_curve() {
    let g = golden();
    let steps = 200;
    let ours = our_curve(&g, steps, "bf16");
    let d = rel_diffs(&ours, &g.losses_f32[..steps]);
    let mean = d.iter().sum::<f64>() / steps as f64;
    let max = d.iter().cloned().fold(0.0, f64::max);
    let window = |l: &[f64], a: usize, b: usize| l[a..b].iter().sum::<f64>() / (b - a) as f64;
    eprintln!(
        "bf16 ({}), {steps} steps: vs f32 mean rel diff {mean:.2e} (max {max:.2e}); loss over the first 20 \
         steps {:.4} (f32 {:.4}), over the last 20 {:.4} (f32 {:.4})",
        sdbooth_ops::bf16_kernel().name(),
        window(&ours, 0, 20),
        window(&g.losses_f32, 0, 20),
        window(&ours, 180, 200),
        window(&g.losses_f32, 180, 200),
    );
    assert!(mean <= BF16_MEAN_REL_TOL, "bf16 mean relative difference {mean:.2e} over {steps} steps");
    assert!(window(&ours, 180, 200) < 0.7 * window(&ours, 0, 20), "the bf16 run learns");
}
