//! DDPM schedule parity with diffusers' DDPMScheduler (fixture from tools/goldens/ddpm.py).

use candle_core::{Device, Tensor};
use sdbooth_models::ddpm::DdpmSchedule;

fn fixture() -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddpm.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// Largest difference in units of the reference's magnitude (ulp-level agreement expected).
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| ((x - y).abs() / y.abs().max(1e-12)) as f64).fold(0.0, f64::max)
}

#[test]
fn schedule_matches_diffusers() {
    let fx = fixture();
    let s = DdpmSchedule::sd();
    assert_eq!(s.num_train_timesteps(), 1000);
    let eb = max_rel(&s.betas, &floats(&fx["betas"]));
    let ea = max_rel(&s.alphas_cumprod, &floats(&fx["alphas_cumprod"]));
    println!("betas max rel {eb:.2e}, alphas_cumprod max rel {ea:.2e}");
    assert!(eb < 1e-6 && ea < 1e-6, "betas {eb}, alphas_cumprod {ea}");
    // SNR at the first step is large, at the last small: a sanity check of the direction.
    assert!(s.snr(0).unwrap() > 1000.0 && s.snr(999).unwrap() < 0.01);
}

#[test]
fn noising_and_velocity_match_diffusers() {
    let fx = fixture();
    let s = DdpmSchedule::sd();
    let shape: Vec<usize> =
        fx["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let x0 = Tensor::from_vec(floats(&fx["x0"]), shape.as_slice(), &Device::Cpu).unwrap();
    let noise = Tensor::from_vec(floats(&fx["noise"]), shape.as_slice(), &Device::Cpu).unwrap();
    let t: Vec<usize> =
        fx["timesteps"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let noisy = s.add_noise(&x0, &noise, &t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let v = s.velocity(&x0, &noise, &t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (want_n, want_v) = (floats(&fx["add_noise"]), floats(&fx["velocity"]));
    for (a, b) in noisy.iter().zip(&want_n).chain(v.iter().zip(&want_v)) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    }
    assert!(s.add_noise(&x0, &noise, &[0, 1]).is_err(), "batch/timestep count mismatch must fail");
    assert!(s.add_noise(&x0, &noise, &[0, 1, 1000]).is_err(), "timestep 1000 is out of range");
}

#[test]
fn zero_terminal_snr_matches_diffusers() {
    let fx = fixture();
    let z = DdpmSchedule::sd().with_zero_terminal_snr();
    let want_b = floats(&fx["zt_betas"]);
    let want_a = floats(&fx["zt_alphas_cumprod"]);
    // The last ᾱ is exactly 0 (pure noise at t = T), so compare absolutely there.
    assert_eq!(z.alphas_cumprod[999], 0.0);
    assert_eq!(want_a[999], 0.0);
    // PyTorch's vectorised f32 sqrt is off by an ulp on a few of the 1000 values, and
    // β_t = 1 − ᾱ_t/ᾱ_{t−1} cancels, so β can differ in relative terms by ~1e-4 where it is small;
    // ᾱ (what training uses) agrees to ~1e-7 relative.
    let eb = z.betas.iter().zip(&want_b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let ea = max_rel(&z.alphas_cumprod[..999], &want_a[..999]);
    println!("zero-terminal betas max abs diff {eb:.2e}, alphas_cumprod max rel {ea:.2e}");
    assert!(eb < 1e-6 && ea < 1e-6, "betas {eb}, alphas_cumprod {ea}");
    assert_eq!(z.snr(999).unwrap(), 0.0);
}
