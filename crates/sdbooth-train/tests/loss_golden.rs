//! Loss (value and gradient) and noise pipeline against a transcription of kohya's functions
//! (fixture: tools/goldens/loss.py).

use std::collections::{HashMap, VecDeque};

use candle_core::{DType, Device, Tensor, Var};
use sdbooth_train::loss::{training_loss, HuberSchedule, LossArgs, LossType};
use sdbooth_train::noise::{noise_noisy_latents_and_timesteps, Draws, NoiseArgs};

fn fixture() -> HashMap<String, Tensor> {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/loss.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn loss_case(name: &str) -> (LossArgs, bool) {
    let mut a = LossArgs::default();
    let mut masked = false;
    match name {
        "l2" => {}
        "l2_minsnr" => a.min_snr_gamma = Some(5.0),
        "l2_minsnr_v" => {
            a.min_snr_gamma = Some(5.0);
            a.v_parameterization = true;
        }
        "l2_scale_v" => {
            a.v_parameterization = true;
            a.scale_v_pred_loss_like_noise_pred = true;
        }
        "l2_v_like" => a.v_pred_like_loss = Some(0.2),
        "l2_debiased" => a.debiased_estimation_loss = true,
        "l2_debiased_v" => {
            a.debiased_estimation_loss = true;
            a.v_parameterization = true;
        }
        "l1" => a.loss_type = LossType::L1,
        "huber_snr" => a.loss_type = LossType::Huber,
        "huber_exp" => {
            a.loss_type = LossType::Huber;
            a.huber_schedule = HuberSchedule::Exponential;
            a.huber_c = 0.2;
            a.huber_scale = 1.5;
        }
        "smooth_l1_const" => {
            a.loss_type = LossType::SmoothL1;
            a.huber_schedule = HuberSchedule::Constant;
            a.huber_c = 0.3;
            a.huber_scale = 2.0;
        }
        "l2_masked" => masked = true,
        "all" => {
            a.loss_type = LossType::Huber;
            masked = true;
            a.min_snr_gamma = Some(5.0);
            a.debiased_estimation_loss = true;
        }
        _ => panic!("unknown case {name}"),
    }
    (a, masked)
}

#[test]
fn loss_and_gradient_match_kohya() {
    let fx = fixture();
    let ac: Vec<f32> = fx["alphas_cumprod"].to_vec1().unwrap();
    let timesteps: Vec<u64> = vec(&fx["timesteps"]).iter().map(|&t| t as u64).collect();
    let weights: Vec<f32> = fx["weights"].to_vec1().unwrap();
    let names: Vec<String> = fx.keys().filter_map(|k| k.strip_prefix("loss/").map(str::to_string)).collect();
    assert_eq!(names.len(), 13);
    for name in names {
        let (args, masked) = loss_case(&name);
        let pred = Var::from_tensor(&fx["pred"]).unwrap();
        let mask = masked.then(|| fx["mask"].clone());
        let loss =
            training_loss(pred.as_tensor(), &fx["target"], &timesteps, &weights, mask.as_ref(), &ac, &args)
                .unwrap();
        let got = loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let want = vec(&fx[&format!("loss/{name}")])[0];
        assert!(((got - want) / want).abs() <= 1e-5, "{name}: loss {got} != {want}");
        let grads = loss.backward().unwrap();
        let g = grads.get(pred.as_tensor()).expect("gradient reaches the prediction");
        let e = rel_err(&vec(g), &vec(&fx[&format!("grad/{name}")]));
        assert!(e <= 1e-5, "{name}: gradient rel err {e:e}");
    }
}

/// Replays recorded draws.
struct Recorded {
    normal: VecDeque<f32>,
    uniform: VecDeque<f64>,
    ints: VecDeque<u64>,
}

impl Draws for Recorded {
    fn normal(&mut self, n: usize) -> Vec<f32> {
        assert!(self.normal.len() >= n, "ran out of recorded normal draws");
        self.normal.drain(..n).collect()
    }
    fn uniform(&mut self) -> f64 {
        self.uniform.pop_front().expect("recorded uniform draw")
    }
    fn randint(&mut self, lo: u64, hi: u64) -> u64 {
        let v = self.ints.pop_front().expect("recorded integer draw");
        assert!((lo..hi).contains(&v));
        v
    }
}

#[test]
fn noise_pipeline_matches_kohya() {
    let fx = fixture();
    let ac: Vec<f32> = fx["alphas_cumprod"].to_vec1().unwrap();
    let latents = &fx["latents"];
    let cases: [(&str, NoiseArgs); 6] = [
        ("plain", NoiseArgs::default()),
        ("offset", NoiseArgs { noise_offset: Some(0.1), ..Default::default() }),
        (
            "offset_random_adaptive",
            NoiseArgs {
                noise_offset: Some(0.1),
                noise_offset_random_strength: true,
                adaptive_noise_scale: Some(0.05),
                ..Default::default()
            },
        ),
        (
            "multires",
            NoiseArgs {
                multires_noise_iterations: Some(6),
                multires_noise_discount: 0.3,
                ..Default::default()
            },
        ),
        (
            "ip_gamma",
            NoiseArgs {
                ip_noise_gamma: Some(0.1),
                ip_noise_gamma_random_strength: true,
                min_timestep: Some(100),
                max_timestep: Some(200),
                ..Default::default()
            },
        ),
        (
            "everything",
            NoiseArgs {
                noise_offset: Some(0.05),
                multires_noise_iterations: Some(3),
                multires_noise_discount: 0.4,
                ip_noise_gamma: Some(0.05),
                min_timestep: Some(10),
                max_timestep: Some(900),
                ..Default::default()
            },
        ),
    ];
    for (name, args) in cases {
        let k = |s: &str| format!("noise/{name}/{s}");
        let mut rec = Recorded {
            normal: fx[&k("draw_normal")].to_vec1::<f32>().unwrap().into(),
            uniform: vec(&fx[&k("draw_uniform")]).into(),
            ints: vec(&fx[&k("draw_int")]).iter().map(|&x| x as u64).collect(),
        };
        let out = noise_noisy_latents_and_timesteps(&args, latents, &ac, &mut rec).unwrap();
        assert!(rec.normal.is_empty() && rec.uniform.is_empty() && rec.ints.is_empty(), "{name}: draws left");
        let want_t: Vec<u64> = vec(&fx[&k("timesteps")]).iter().map(|&x| x as u64).collect();
        assert_eq!(out.timesteps, want_t, "{name}");
        let e = rel_err(&vec(&out.noise), &vec(&fx[&k("noise")]));
        assert!(e <= 1e-6, "{name}: noise rel err {e:e}");
        let e = rel_err(&vec(&out.noisy_latents), &vec(&fx[&k("noisy")]));
        assert!(e <= 1e-6, "{name}: noisy latents rel err {e:e}");
    }
}

#[test]
fn loss_refuses_mismatched_batch() {
    let p = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let ac = vec![0.5f32; 1000];
    assert!(training_loss(&p, &p, &[1], &[1.0, 1.0], None, &ac, &LossArgs::default()).is_err());
    assert!(training_loss(&p, &p, &[1, 5000], &[1.0, 1.0], None, &ac, &LossArgs::default()).is_err());
    assert!(LossType::parse("l3").is_err());
}
