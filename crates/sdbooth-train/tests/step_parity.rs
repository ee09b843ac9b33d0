//! Step parity with kohya's train_db.py in PyTorch (tools/goldens/train_step.py): from identical
//! weights, latents, noise, timesteps and captions, the loss and every U-Net and text-encoder
//! gradient of one step, and the weights after one SGDNesterov step and after 5 AdamW steps with
//! max_grad_norm 1.0 clipping.
//!
//! The model is a Diffusers folder written here from sdbooth's seeded generator
//! (`InitStyle::AllRandom`, the generator train_step.py reimplements bit-exactly) and loaded
//! through the trainer's own loader, `setup::load`. The fixture stores each gradient (and each
//! weight update) as its norm plus 16 random-sign projections; ||P(ours) - P(torch)|| / 4
//! estimates ||ours - torch|| (see train_step.py). PyTorch computes in f64, we in f32.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdbooth_checkpoint::diffusers::save_diffusers;
use sdbooth_checkpoint::ModelParts;
use sdbooth_models::ddpm::DdpmSchedule;
use sdbooth_models::init::{fnv1a64, mix, random_params_with, InitStyle};
use sdbooth_models::{ModelConfig, Prediction};
use sdbooth_train::args::TrainArgs;
use sdbooth_train::noise::{add_noise, NoisedBatch};
use sdbooth_train::optim::Optimizer;
use sdbooth_train::plan::TrainPlan;
use sdbooth_train::trainer::setup::{self, Model};
use sdbooth_train::trainer::step::{loss_and_grads, plain_token_ids, StepInputs, StepSettings};
use sdbooth_train::update::{
    apply_accumulated, GradAccumulator, LearningRates, Part, TrainedParams, UpdateOutcome,
};

const LOSS_TOL: f64 = 1e-5;
/// Per-tensor norm-relative bound on gradients (JL estimate, ±35% at K = 16). Measured
/// 2026-11-25: worst 4.7e-6 (PyTorch's own f32 step: 2.6e-6).
const GRAD_TOL: f64 = 1e-5;
/// Norm-relative bound on all weights together after the optimizer steps. Per tensor the bound
/// is the larger of this and twice PyTorch's own f32-vs-f64 deviation on the same run (the
/// fixture records it): after 5 AdamW steps a 64-value norm bias is 3.3e-5 off in PyTorch f32.
const WEIGHT_TOL: f64 = 1e-5;
/// Overall bound on the weight updates (w_after - w_before). Their error has a floor from
/// rounding the weights to f32 (6e-8 of a weight ~1 against updates ~1e-3), so this is looser.
const UPDATE_TOL: f64 = 1e-4;

/// The part a fixture names by its optimizer group name.
fn part(group: &str) -> Part {
    [Part::Unet, Part::TextEncoder]
        .into_iter()
        .find(|p| p.group_name() == group)
        .unwrap_or_else(|| panic!("unknown part {group}"))
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/step_parity")
}

struct Fixture {
    t: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Fixture {
    fn load() -> Self {
        let dir = fixture_dir();
        let t = candle_core::safetensors::load(dir.join("step_parity.safetensors"), &Device::Cpu)
            .expect("fixture loads");
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("step_parity.json")).unwrap())
            .expect("fixture json");
        Fixture { t, meta }
    }
    fn get(&self, k: &str) -> &Tensor {
        self.t.get(k).unwrap_or_else(|| panic!("fixture has no {k}"))
    }
    fn f64s(&self, k: &str) -> Vec<f64> {
        self.get(k).to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }
    fn f32s(&self, k: &str) -> Vec<f32> {
        self.get(k).to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }
    /// (part, name) of every parameter in the order the fixture lists them.
    fn params(&self, model: &str) -> Vec<(Part, String)> {
        self.meta["params"][model]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (part(p[0].as_str().unwrap()), p[1].as_str().unwrap().to_string()))
            .collect()
    }
}

/// Writes the AllRandom-weights Diffusers folder train_step.py rebuilds in PyTorch.
fn write_model(dir: &Path, name: &str, seeds: (u64, u64), v_pred: bool) -> PathBuf {
    let mut config = ModelConfig::by_name(name).unwrap();
    if v_pred {
        config.prediction = Prediction::VPrediction;
    }
    let dev = Device::Cpu;
    let unet_shapes = sdbooth_models::unet::param_shapes(&config.unet);
    let text_shapes = sdbooth_models::clip::param_shapes(&config.text);
    let vae_shapes = sdbooth_models::vae::param_shapes(&config.vae);
    let unet = random_params_with(&unet_shapes, seeds.0, InitStyle::AllRandom, &dev).unwrap();
    let text = random_params_with(&text_shapes, seeds.1, InitStyle::AllRandom, &dev).unwrap();
    let vae = random_params_with(&vae_shapes, 7, InitStyle::Standard, &dev).unwrap();
    let (u, t, v) = (unet.to_tensors(), text.to_tensors(), vae.to_tensors());
    let out = dir.join(name);
    let parts = ModelParts { unet: &u, text_encoder: &t, vae: Some(&v) };
    save_diffusers(&out, &parts, &config, v_pred, None, true).expect("diffusers folder written");
    out
}

fn train_args(model: &Path, extra: &[&str]) -> TrainArgs {
    let mut v = vec!["--pretrained_model_name_or_path".to_string(), model.display().to_string()];
    v.extend(extra.iter().map(|s| s.to_string()));
    TrainArgs::try_parse_from(v).expect("flags parse")
}

/// The fixture's batch for one case.
struct Batch {
    latents: Tensor,
    noise: Tensor,
    timesteps: Vec<u64>,
    captions: Vec<String>,
    loss_weights: Vec<f32>,
}

fn batch(fx: &Fixture, case: &str) -> Batch {
    let meta = &fx.meta["cases"][case];
    Batch {
        latents: fx.get(&format!("{case}.latents")).clone(),
        noise: fx.get(&format!("{case}.noise")).clone(),
        timesteps: fx.f64s(&format!("{case}.timesteps")).iter().map(|&t| t as u64).collect(),
        captions: meta["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().into()).collect(),
        loss_weights: meta["loss_weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap() as f32)
            .collect(),
    }
}

/// One call of the trainer's `loss_and_grads` with the fixture's noise and timesteps.
fn step(model: &Model, plan: &TrainPlan, b: &Batch) -> (f64, GradAccumulator) {
    let schedule = DdpmSchedule::sd();
    let ac = schedule.alphas_cumprod.clone();
    let x0 = b.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = b.noise.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let per = x0.len() / b.timesteps.len();
    let noisy = add_noise(&x0, &n, per, &b.timesteps, &ac).unwrap();
    let noised = NoisedBatch {
        noise: b.noise.clone(),
        noisy_latents: Tensor::from_vec(noisy, b.latents.dims(), &Device::Cpu).unwrap(),
        timesteps: b.timesteps.clone(),
    };
    let loss_args = model.loss_args(plan);
    let s = StepSettings {
        noise: &plan.noise,
        loss: &loss_args,
        schedule: &schedule,
        alphas_cumprod: &ac,
        train_text_encoder: true,
        checkpointing: plan.steps.gradient_checkpointing,
        compute_dtype: plan.precision.compute_dtype,
        clip_skip: plan.text.clip_skip,
        max_token_length: None,
        no_token_padding: false,
        weighted_captions: false,
        grad_multiplier: 1.0,
    };
    let inputs = StepInputs {
        latents: b.latents.clone(),
        captions: &b.captions,
        loss_weights: &b.loss_weights,
        masks: None,
    };
    let mut grads = GradAccumulator::default();
    let out = loss_and_grads(model, inputs, &noised, &s, &mut grads).expect("step runs");
    (out.loss, grads)
}

/// The trainer's non-fused update at step `step`: scheduled learning rates, global-norm clip at
/// `--max_grad_norm`, every parameter stepped.
fn update(opt: &mut Optimizer, model: &Model, plan: &TrainPlan, grads: &GradAccumulator, step: u64) {
    let schedule = setup::lr_schedule(plan, plan.steps.max_train_steps).unwrap();
    let lrs = LearningRates::at_step(opt, &schedule, step);
    let params = TrainedParams { unet: &model.unet_params, text_encoder: &model.text_params };
    let outcome = apply_accumulated(opt, params, grads, lrs, plan.optimizer.max_grad_norm, None).unwrap();
    assert!(matches!(outcome, UpdateOutcome::Stepped { .. }));
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// The 16 random-sign projections of train_step.py (signs of unet.py's `projections`).
fn projections(name: &str, v: &[f32], k_proj: usize) -> Vec<f64> {
    (0..k_proj)
        .map(|k| {
            let key = fnv1a64(&format!("proj.{name}")) ^ mix(1000 + k as u64);
            let mut acc = 0f64;
            for (i, &x) in v.iter().enumerate() {
                let bits = mix(key.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
                acc += if bits >> 63 == 1 { -f64::from(x) } else { f64::from(x) };
            }
            acc
        })
        .collect()
}

/// How far a set of per-tensor values is from the fixture's norms/projections.
#[derive(Default, Debug)]
struct Report {
    /// Largest per-tensor estimated norm-relative error, and its tensor.
    worst: (f64, String),
    /// Largest per-tensor relative difference of the exact norms.
    worst_norm: (f64, String),
    /// Estimated error of everything together, relative to the norm of everything.
    total_err2: f64,
    total_norm2: f64,
    count: usize,
    /// Estimated ||ours - torch|| per tensor, in the fixture's order.
    errs: Vec<f64>,
    /// Tensors whose exact gradient is zero (see `structural_zeros`): the largest of our norms
    /// relative to the norm of the whole set, and its tensor. Excluded from the figures above.
    zero_worst: (f64, String),
}

impl Report {
    fn overall(&self) -> f64 {
        (self.total_err2 / self.total_norm2).sqrt()
    }
}

fn compare(
    fx: &Fixture,
    params: &[(Part, String)],
    prefix: &str,
    ours: &dyn Fn(Part, &str) -> Vec<f32>,
    zeros: &HashSet<String>,
) -> Report {
    let k_proj = fx.meta["k_proj"].as_u64().unwrap() as usize;
    let norms = fx.f64s(&format!("{prefix}_norm"));
    let projs = fx.f32s(&format!("{prefix}_proj"));
    assert_eq!(norms.len(), params.len());
    let mut r = Report::default();
    let mut zero_norms = Vec::new();
    for (i, (part, name)) in params.iter().enumerate() {
        let v = ours(*part, name);
        let p = projections(name, &v, k_proj);
        let err = (p
            .iter()
            .zip(&projs[i * k_proj..(i + 1) * k_proj])
            .map(|(a, &b)| (a - f64::from(b)).powi(2))
            .sum::<f64>()
            / k_proj as f64)
            .sqrt();
        let norm = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let tn = norms[i];
        r.errs.push(err);
        if zeros.contains(name) {
            zero_norms.push((norm, format!("{part}/{name}")));
            continue;
        }
        assert!(tn > 0.0, "{part}/{name}: PyTorch's value is zero");
        let rel = err / tn;
        let rel_norm = (norm - tn).abs() / tn;
        if rel > r.worst.0 {
            r.worst = (rel, format!("{part}/{name}"));
        }
        if rel_norm > r.worst_norm.0 {
            r.worst_norm = (rel_norm, format!("{part}/{name}"));
        }
        r.total_err2 += err * err;
        r.total_norm2 += tn * tn;
        r.count += 1;
    }
    let total = r.total_norm2.sqrt();
    for (norm, name) in zero_norms {
        if norm / total >= r.zero_worst.0 {
            r.zero_worst = (norm / total, name);
        }
    }
    r
}

/// Parameters whose exact gradient is zero: CLIP's `k_proj.bias` (adding the same vector to
/// every key shifts each query's scores by a constant, which softmax ignores). PyTorch's f64
/// gives ~1e-17 there and our f32 ~1e-9: rounding noise, so a relative error means nothing; they
/// are found from the fixture (PyTorch's norm below 1e-9 of the whole gradient's) and checked
/// in absolute terms instead.
fn structural_zeros(fx: &Fixture, case: &str, params: &[(Part, String)]) -> HashSet<String> {
    let norms = fx.f64s(&format!("{case}.grad_norm"));
    let total = norms.iter().map(|n| n * n).sum::<f64>().sqrt();
    params.iter().zip(&norms).filter(|(_, &n)| n <= 1e-9 * total).map(|((_, name), _)| name.clone()).collect()
}

/// Our gradient of a parameter; a parameter that got none (the last CLIP layer under
/// clip_skip, as PyTorch's `p.grad is None`) reads as zeros.
fn grad_of<'a>(
    grads: &'a GradAccumulator,
    params: &'a [(Part, String)],
) -> impl Fn(Part, &str) -> Vec<f32> + 'a {
    move |part: Part, name: &str| match grads.grads.get(&(part, name.to_string())) {
        Some(g) => values(g),
        None => {
            assert!(params.iter().any(|(p, n)| *p == part && n == name), "{part}/{name} is not a parameter");
            Vec::new()
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    fx: Fixture,
    models: HashMap<String, PathBuf>,
}

fn setup_all() -> Setup {
    let fx = Fixture::load();
    let dir = tempfile::tempdir().unwrap();
    let mut models = HashMap::new();
    for (name, v_pred) in [("tiny-sd1", false), ("tiny-sd2", true)] {
        let s = &fx.meta["seeds"][name];
        let seeds = (s[0].as_u64().unwrap(), s[1].as_u64().unwrap());
        models.insert(name.to_string(), write_model(dir.path(), name, seeds, v_pred));
    }
    Setup { _dir: dir, fx, models }
}

fn case_flags(meta: &serde_json::Value) -> Vec<String> {
    let mut v = Vec::new();
    if meta["model"] == "tiny-sd2" {
        v.push("--v2".to_string());
    }
    if meta["v_parameterization"].as_bool().unwrap() {
        v.push("--v_parameterization".into());
    }
    if let Some(g) = meta["min_snr_gamma"].as_f64() {
        v.push("--min_snr_gamma".into());
        v.push(g.to_string());
    }
    if let Some(k) = meta["clip_skip"].as_u64() {
        v.push("--clip_skip".into());
        v.push(k.to_string());
    }
    v
}

fn check_grads(case: &str, extra: &[&str]) {
    let su = setup_all();
    let fx = &su.fx;
    let meta = &fx.meta["cases"][case];
    let model_name = meta["model"].as_str().unwrap();
    let mut flags = case_flags(meta);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let plan = TrainPlan::resolve(&train_args(&su.models[model_name], &flags)).expect("flags resolve");
    let model = setup::load(&plan).expect("model loads");
    assert_eq!(model.v_parameterization, meta["v_parameterization"].as_bool().unwrap());
    let b = batch(fx, case);
    // Our tokenizer gives the ids transformers' CLIPTokenizer gave in train_step.py.
    let ids = plain_token_ids(&model.tokenizer, &b.captions, None, false, &Device::Cpu).unwrap();
    let want: Vec<i64> = fx.get(&format!("{case}.ids")).flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<i64> = ids.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, want, "{case}: token ids");

    let (loss, grads) = step(&model, &plan, &b);
    let want_loss = fx.f64s(&format!("{case}.loss"))[0];
    let loss_rel = (loss - want_loss).abs() / want_loss.abs();
    let params = fx.params(model_name);
    // Every parameter PyTorch gives a gradient must have one here; those it leaves at None may
    // be absent or zero (a zero gradient would still be stepped: weight decay, Adam state).
    let no_grad: Vec<String> =
        meta["no_grad"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    for (p, n) in &params {
        let key = (*p, n.clone());
        if !no_grad.contains(&format!("{p}/{n}")) {
            assert!(grads.grads.contains_key(&key), "{case}: no gradient for {p}/{n}");
        }
    }
    let stepped_without_grad = no_grad
        .iter()
        .filter(|k| {
            let (p, n) = k.split_once('/').unwrap();
            grads.grads.contains_key(&(part(p), n.to_string()))
        })
        .count();
    if !no_grad.is_empty() {
        eprintln!(
            "{case}: {} parameters get no gradient in PyTorch; {stepped_without_grad} of them get a (zero) gradient from us",
            no_grad.len()
        );
    }
    let zeros = structural_zeros(fx, case, &params);
    let r = compare(fx, &params, &format!("{case}.grad"), &grad_of(&grads, &params), &zeros);
    eprintln!(
        "{case}{extra:?}: loss {loss:.8} vs {want_loss:.8} (rel {loss_rel:.2e}); {} gradients: overall {:.2e}, worst {:.2e} ({}), worst norm diff {:.2e} ({}); {} exactly-zero gradients: ours at most {:.2e} of the total norm ({})",
        r.count,
        r.overall(),
        r.worst.0,
        r.worst.1,
        r.worst_norm.0,
        r.worst_norm.1,
        zeros.len(),
        r.zero_worst.0,
        r.zero_worst.1
    );
    let t32 = &meta["torch_f32_vs_f64"];
    eprintln!(
        "{case}: PyTorch f32 vs f64 on the same step: loss {:.2e}, gradients overall {:.2e}, worst {:.2e}",
        t32["loss"].as_f64().unwrap(),
        t32["overall"].as_f64().unwrap(),
        t32["worst"].as_f64().unwrap()
    );
    assert!(r.zero_worst.0 <= 1e-6, "{case}: {} should have no gradient", r.zero_worst.1);
    assert!(loss_rel <= LOSS_TOL, "{case}: loss {loss} vs {want_loss}");
    assert!(r.worst.0 <= GRAD_TOL, "{case}: gradient of {} off by {:.2e}", r.worst.1, r.worst.0);
    assert!(
        r.worst_norm.0 <= GRAD_TOL,
        "{case}: gradient norm of {} off by {:.2e}",
        r.worst_norm.1,
        r.worst_norm.0
    );
}

/// `steps` optimizer steps of `kind` on the case's batch, compared through the weight updates.
fn check_optimizer(case: &str, kind: &str, steps: usize) {
    let su = setup_all();
    let fx = &su.fx;
    let meta = &fx.meta["cases"][case];
    let model_name = meta["model"].as_str().unwrap();
    let mut flags = case_flags(meta);
    let (opt_type, lr) = match kind {
        "sgd" => ("SGDNesterov", meta["sgd_lr"].as_f64().unwrap()),
        _ => ("AdamW", meta["adamw_lr"].as_f64().unwrap()),
    };
    flags.extend(["--optimizer_type".into(), opt_type.into(), "--learning_rate".into(), lr.to_string()]);
    flags.extend(["--max_grad_norm".into(), "1.0".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let plan = TrainPlan::resolve(&train_args(&su.models[model_name], &flags)).expect("flags resolve");
    let model = setup::load(&plan).expect("model loads");
    let mut opt = setup::build_optimizer(&plan, &model, true).unwrap();
    let before: HashMap<(Part, String), Vec<f32>> = model
        .unet_params
        .iter()
        .map(|(n, v)| ((Part::Unet, n.clone()), values(v.as_tensor())))
        .chain(model.text_params.iter().map(|(n, v)| ((Part::TextEncoder, n.clone()), values(v.as_tensor()))))
        .collect();
    let b = batch(fx, case);
    let tag = format!("{kind}{steps}");
    let want_losses = fx.f64s(&format!("{case}.{tag}.losses"));
    let mut worst_loss = 0f64;
    for (i, want) in want_losses.iter().enumerate().take(steps) {
        let (loss, grads) = step(&model, &plan, &b);
        update(&mut opt, &model, &plan, &grads, i as u64);
        worst_loss = worst_loss.max((loss - want).abs() / want.abs());
        eprintln!("{case} {tag} step {}: loss {loss:.8} vs {want:.8}", i + 1);
    }
    let params = fx.params(model_name);
    let trained = TrainedParams { unet: &model.unet_params, text_encoder: &model.text_params };
    let now = |part: Part, name: &str| values(trained.var(part, name).unwrap().as_tensor());
    let delta = |part: Part, name: &str| {
        let b = &before[&(part, name.to_string())];
        now(part, name).iter().zip(b).map(|(a, b)| a - b).collect::<Vec<f32>>()
    };
    let zeros = structural_zeros(fx, case, &params);
    let r = compare(fx, &params, &format!("{case}.{tag}.delta"), &delta, &zeros);
    // Weights: ||w_ours - w_torch|| = ||Δ_ours - Δ_torch|| (same starting weights), relative to
    // ||w_torch|| (≈ ours). Overall counts every tensor, structural zeros included.
    let (mut err2, mut norm2) = (0f64, 0f64);
    let mut worst_w = (0f64, String::new());
    let mut zero_w = (0f64, String::new());
    for ((p, n), err) in params.iter().zip(&r.errs) {
        let w2: f64 = now(*p, n).iter().map(|&x| f64::from(x).powi(2)).sum();
        err2 += err * err;
        norm2 += w2;
        let slot = if zeros.contains(n) { &mut zero_w } else { &mut worst_w };
        if err / w2.sqrt() > slot.0 {
            *slot = (err / w2.sqrt(), format!("{p}/{n}"));
        }
    }
    let weights_rel = (err2 / norm2).sqrt();
    eprintln!(
        "{case} {tag}: losses worst rel {worst_loss:.2e}; weights overall {weights_rel:.2e}, worst tensor {:.2e} ({}); updates overall {:.2e}, worst {:.2e} ({}), worst norm diff {:.2e} ({}); {} exactly-zero-gradient tensors: weights off by up to {:.2e} ({})",
        worst_w.0,
        worst_w.1,
        r.overall(),
        r.worst.0,
        r.worst.1,
        r.worst_norm.0,
        r.worst_norm.1,
        zeros.len(),
        zero_w.0,
        zero_w.1
    );
    let torch_f32 = &meta[format!("{tag}_torch_f32_vs_f64")];
    let per_tensor_tol = WEIGHT_TOL.max(2.0 * torch_f32["worst"].as_f64().unwrap());
    eprintln!(
        "{case} {tag}: PyTorch f32 vs f64 on the same run: weights overall {:.2e}, worst tensor {:.2e} ({}); per-tensor bound {per_tensor_tol:.2e}",
        torch_f32["overall"].as_f64().unwrap(),
        torch_f32["worst"].as_f64().unwrap(),
        torch_f32["worst_tensor"].as_str().unwrap()
    );
    assert!(weights_rel <= WEIGHT_TOL, "{case} {tag}: weights off by {weights_rel:.2e} overall");
    assert!(worst_loss <= LOSS_TOL, "{case} {tag}: loss off by {worst_loss:.2e}");
    assert!(worst_w.0 <= per_tensor_tol, "{case} {tag}: weights of {} off by {:.2e}", worst_w.1, worst_w.0);
    assert!(r.overall() <= UPDATE_TOL, "{case} {tag}: updates off by {:.2e} overall", r.overall());
}

#[test]
fn sd1_eps_loss_and_grads() {
    check_grads("sd1_eps", &[]);
}

#[test]
fn sd1_prior_loss_and_grads() {
    check_grads("sd1_prior", &[]);
}

#[test]
fn sd1_min_snr_loss_and_grads() {
    check_grads("sd1_snr", &[]);
}

#[test]
fn sd2_v_prediction_loss_and_grads() {
    check_grads("sd2_v", &[]);
}

#[test]
fn sd1_clip_skip2_loss_and_grads() {
    check_grads("sd1_clip_skip2", &[]);
}

/// Gradient checkpointing recomputes each block in backward: the same gradients as PyTorch's
/// plain step.
#[test]
fn sd2_v_prediction_with_gradient_checkpointing() {
    check_grads("sd2_v", &["--gradient_checkpointing"]);
}

#[test]
fn sd1_sgd_nesterov_one_step() {
    check_optimizer("sd1_eps", "sgd", 1);
}

#[test]
fn sd1_adamw_five_steps() {
    check_optimizer("sd1_eps", "adamw", 5);
}

#[test]
fn sd2_sgd_nesterov_one_step() {
    check_optimizer("sd2_v", "sgd", 1);
}

#[test]
fn sd2_adamw_five_steps() {
    check_optimizer("sd2_v", "adamw", 5);
}
