//! Every sampler replays diffusers' trajectory (tools/goldens/schedulers.py): same stand-in
//! model, same ancestral noise, each step within 1e-5 norm-relative error.

use candle_core::{Device, Result, Tensor};
use sdbooth_sample::schedulers::{sampler_by_name, PredictionType};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    shape: Vec<usize>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    sampler: String,
    steps: usize,
    prediction_type: String,
    init_noise_sigma: f64,
    initial_noise: Vec<f32>,
    timesteps: Vec<f64>,
    model_inputs: Vec<Vec<f32>>,
    trajectory: Vec<Vec<f32>>,
    noise: Vec<Vec<f32>>,
}

/// The stand-in for the U-Net that the golden script uses.
fn fake_model(x: &Tensor, t: f64) -> Result<Tensor> {
    let a = (x.tanh()? * (0.5 * (t / 1000.0).cos()))?;
    (a + (x * 0.1)?)? + 0.01 * (t / 1000.0)
}

fn rel_err(a: &Tensor, b: &[f32]) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn samplers_match_diffusers() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedulers.json"))
            .expect("fixture");
    let fixture: Fixture = serde_json::from_str(&text).expect("fixture json");
    let dev = Device::Cpu;
    let mut checked = 0;
    for case in &fixture.cases {
        let prediction = if case.prediction_type == "v_prediction" {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        };
        let mut sampler =
            sampler_by_name(&case.sampler, case.steps, prediction).expect("every kohya sampler");
        let label = format!("{} steps={} {}", case.sampler, case.steps, case.prediction_type);
        assert_eq!(sampler.timesteps().len(), case.timesteps.len(), "{label}: number of calls");
        for (ours, theirs) in sampler.timesteps().iter().zip(&case.timesteps) {
            assert!(
                (ours - theirs).abs() < 1e-3,
                "{label}: timesteps {:?} vs {:?}",
                sampler.timesteps(),
                case.timesteps
            );
        }
        assert!(
            (sampler.init_noise_sigma() - case.init_noise_sigma).abs() < 1e-5 * case.init_noise_sigma,
            "{label}"
        );
        let init = Tensor::from_vec(case.initial_noise.clone(), fixture.shape.as_slice(), &dev).unwrap();
        let mut x = (init * sampler.init_noise_sigma()).unwrap();
        let mut draws = case.noise.iter();
        for i in 0..case.timesteps.len() {
            let t = sampler.timesteps()[i];
            let inp = sampler.scale_model_input(&x, i).unwrap();
            let e = rel_err(&inp, &case.model_inputs[i]);
            assert!(e < 1e-5, "{label}: model input {i} differs by {e}");
            let out = fake_model(&inp, t).unwrap();
            let mut noise = |shape: &[usize]| {
                let n = draws.next().expect("sampler drew more noise than diffusers");
                Tensor::from_vec(n.clone(), shape, &dev)
            };
            x = sampler.step(&out, i, &x, &mut noise).unwrap();
            let e = rel_err(&x, &case.trajectory[i]);
            assert!(e < 1e-5, "{label}: step {i} differs by {e}");
        }
        assert!(draws.next().is_none(), "{label}: diffusers drew more noise");
        checked += 1;
    }
    assert_eq!(checked, 33, "every case is checked");
}
