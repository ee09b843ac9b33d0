//! Loss (value and gradient) and noise pipeline against a transcription of kohya's functions
//! (fixture: tools/goldens/loss.py).

use std::collections::{HashMap, VecDeque};

use candle_core::{DType, Device, Tensor, Var};
use sdbooth_train::args::TrainArgs;
use sdbooth_train::loss::{apply_masked_loss, resize_masks, training_loss, LossArgs};
use sdbooth_train::noise::{channel_means, noise_noisy_latents_and_timesteps, Draws};
use sdbooth_train::plan::TrainPlan;

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

/// The plan `sdbooth train <flags>` runs with.
fn plan(flags: &[&str]) -> TrainPlan {
    TrainPlan::resolve(&TrainArgs::try_parse_from(flags).expect("flags parse")).expect("plan resolves")
}

/// The loss settings of a fixture case, as the trainer derives them from its flags (and the
/// model's prediction type), and whether the trainer would pass the batch's masks.
fn loss_case(name: &str) -> (LossArgs, bool) {
    let (flags, v_pred): (&[&str], bool) = match name {
        "l2" => (&[], false),
        "l2_minsnr" => (&["--min_snr_gamma", "5"], false),
        "l2_minsnr_v" => (&["--min_snr_gamma", "5"], true),
        "l2_scale_v" => (&["--scale_v_pred_loss_like_noise_pred"], true),
        "l2_v_like" => (&["--v_pred_like_loss", "0.2"], false),
        "l2_debiased" => (&["--debiased_estimation_loss"], false),
        "l2_debiased_v" => (&["--debiased_estimation_loss"], true),
        "l1" => (&["--loss_type", "l1"], false),
        "huber_snr" => (&["--loss_type", "huber"], false),
        "huber_exp" => (
            &[
                "--loss_type",
                "huber",
                "--huber_schedule",
                "exponential",
                "--huber_c",
                "0.2",
                "--huber_scale",
                "1.5",
            ],
            false,
        ),
        "smooth_l1_const" => (
            &[
                "--loss_type",
                "smooth_l1",
                "--huber_schedule",
                "constant",
                "--huber_c",
                "0.3",
                "--huber_scale",
                "2.0",
            ],
            false,
        ),
        "l2_masked" => (&["--masked_loss"], false),
        "all" => (
            &["--loss_type", "huber", "--masked_loss", "--min_snr_gamma", "5", "--debiased_estimation_loss"],
            false,
        ),
        _ => panic!("unknown case {name}"),
    };
    let plan = plan(flags);
    // The plan leaves v_parameterization to the loaded model (`Model::loss_args`).
    (LossArgs { v_parameterization: v_pred, ..plan.loss }, plan.steps.masked_loss)
}

/// The fixture's (B, 2H, 2W) masks resized by the trainer's [`resize_masks`] to the loss's (H, W).
fn kohya_mask_at_loss_size(mask: &Tensor, pred: &Tensor) -> Tensor {
    let (b, mh, mw) = mask.dims3().unwrap();
    let (.., h, w) = pred.dims4().unwrap();
    let values: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
    Tensor::from_vec(resize_masks(&values, b, (mh, mw), (h, w)).unwrap(), (b, h, w), &Device::Cpu).unwrap()
}

/// The mask resize is torch's `interpolate(mode="area")`, checked on its own against a plane
/// averaged by hand (the fixture's 2x downscale, then a 3x uneven one), a same-size mask is kept,
/// and a mask not at the loss's size is refused rather than broadcast.
#[test]
fn masks_are_area_resized_on_the_host_and_must_match_the_loss() {
    let m: Vec<f32> = (0..2 * 4 * 6).map(|i| i as f32).collect();
    let r = resize_masks(&m, 2, (4, 6), (2, 3)).unwrap();
    let avg = |idx: [usize; 4]| idx.iter().map(|&i| m[i]).sum::<f32>() / 4.0;
    assert_eq!(r[0], avg([0, 1, 6, 7]));
    assert_eq!(r[5], avg([16, 17, 22, 23]));
    assert_eq!(r[6], avg([24, 25, 30, 31]));
    // 4 -> 3 rows overlap as torch's adaptive pooling does: row 1 averages source rows 1 and 2.
    let r = resize_masks(&m[..24], 1, (4, 6), (3, 6)).unwrap();
    assert_eq!(r[6], (m[6] + m[12]) / 2.0);
    assert_eq!(resize_masks(&m, 2, (4, 6), (4, 6)).unwrap(), m);
    assert!(resize_masks(&m, 3, (4, 6), (2, 3)).is_err());
    let loss = Tensor::ones((2, 4, 2, 3), DType::F32, &Device::Cpu).unwrap();
    let big = Tensor::from_vec(m.clone(), (2, 4, 6), &Device::Cpu).unwrap();
    assert!(apply_masked_loss(&loss, &big).is_err());
    let small =
        Tensor::from_vec(resize_masks(&m, 2, (4, 6), (2, 3)).unwrap(), (2, 2, 3), &Device::Cpu).unwrap();
    let masked = apply_masked_loss(&loss, &small).unwrap();
    assert_eq!(masked.dims(), [2, 4, 2, 3]);
    assert_eq!(vec(&masked.get(1).unwrap().get(3).unwrap()), vec(&small.get(1).unwrap()));
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
        // The trainer resizes the loader's masks on the host before uploading them.
        let mask = masked.then(|| kohya_mask_at_loss_size(&fx["mask"], &fx["pred"]));
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
    // Each case's flags, turned into noise settings as the trainer does.
    let cases: [(&str, &[&str]); 6] = [
        ("plain", &[]),
        ("offset", &["--noise_offset", "0.1"]),
        (
            "offset_random_adaptive",
            &["--noise_offset", "0.1", "--noise_offset_random_strength", "--adaptive_noise_scale", "0.05"],
        ),
        ("multires", &["--multires_noise_iterations", "6", "--multires_noise_discount", "0.3"]),
        (
            "ip_gamma",
            &[
                "--ip_noise_gamma",
                "0.1",
                "--ip_noise_gamma_random_strength",
                "--min_timestep",
                "100",
                "--max_timestep",
                "200",
            ],
        ),
        (
            "everything",
            &[
                "--noise_offset",
                "0.05",
                "--multires_noise_iterations",
                "3",
                "--multires_noise_discount",
                "0.4",
                "--ip_noise_gamma",
                "0.05",
                "--min_timestep",
                "10",
                "--max_timestep",
                "900",
            ],
        ),
    ];
    for (name, flags) in cases {
        let args = plan(flags).noise;
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

/// `--adaptive_noise_scale` reads only the latents' channel means, made on their device: on the
/// CPU they are bit for bit the f64 sums over each plane divided by its size, the host
/// computation they replace.
#[test]
fn channel_means_are_the_host_means_bit_for_bit() {
    let latents = &fixture()["latents"];
    let (b, c, h, w) = latents.dims4().unwrap();
    let x: Vec<f32> = latents.flatten_all().unwrap().to_vec1().unwrap();
    let host: Vec<f32> = x
        .chunks_exact(h * w)
        .map(|p| (p.iter().map(|&v| f64::from(v)).sum::<f64>() / (h * w) as f64) as f32)
        .collect();
    let got = channel_means(latents).unwrap();
    assert_eq!(got.len(), b * c);
    assert_eq!(
        got.iter().map(|m| m.to_bits()).collect::<Vec<_>>(),
        host.iter().map(|m| m.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn loss_refuses_mismatched_batch() {
    let p = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let ac = vec![0.5f32; 1000];
    assert!(training_loss(&p, &p, &[1], &[1.0, 1.0], None, &ac, &LossArgs::default()).is_err());
    assert!(training_loss(&p, &p, &[1, 5000], &[1.0, 1.0], None, &ac, &LossArgs::default()).is_err());
    assert!(TrainArgs::try_parse_from(["--loss_type", "l3"]).is_err());
}
