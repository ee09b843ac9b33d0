//! VAE against diffusers' AutoencoderKL (fixture from tools/goldens/vae.py): posterior mean/std
//! and decoder output, gradients of every parameter and of the inputs, for the tiny config.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use sdbooth_models::vae::{self, Vae};
use sdbooth_models::{ModelConfig, ParamStore};

fn load() -> HashMap<String, Tensor> {
    let path = format!("{}/tests/fixtures/vae_tiny.safetensors", env!("CARGO_MANIFEST_DIR"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap().into_iter().collect()
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

fn rel_err(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.dims(), theirs.dims());
    let diff = (ours.to_dtype(DType::F64).unwrap() - theirs.to_dtype(DType::F64).unwrap()).unwrap();
    norm(&diff) / norm(theirs).max(1e-30)
}

fn params(t: &HashMap<String, Tensor>, cfg: &ModelConfig) -> ParamStore {
    let map: BTreeMap<String, Tensor> =
        t.iter().filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone()))).collect();
    let store = ParamStore::from_tensors(map).unwrap();
    // Our names and shapes are exactly diffusers' (the fixture holds diffusers' state dict).
    store.check_shapes(&vae::param_shapes(&cfg.vae)).unwrap();
    store
}

/// Compares every `{prefix}.grad.<param>` of the fixture with ours; returns the worst error.
fn check_param_grads(
    t: &HashMap<String, Tensor>,
    prefix: &str,
    params: &ParamStore,
    store: &candle_core::backprop::GradStore,
) -> f64 {
    let mut worst = 0f64;
    let mut n = 0;
    for (k, theirs) in t {
        let Some(name) = k.strip_prefix(&format!("{prefix}.grad.")) else { continue };
        if !params.contains(name) {
            continue; // the input's gradient, checked by the caller
        }
        n += 1;
        let ours = store.get(params.get(name).unwrap()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = if let Some(w) = name.strip_suffix("to_k.bias") {
            // Softmax cancels the key bias: its true gradient is zero (rounding noise on both
            // sides). Bound it against the key weight's gradient.
            norm(ours) / norm(&t[&format!("{prefix}.grad.{w}to_k.weight")])
        } else {
            rel_err(ours, theirs)
        };
        assert!(e <= 1e-4, "{prefix}: gradient of {name}: relative error {e:e}");
        worst = worst.max(e);
    }
    assert!(n > 30, "{prefix}: only {n} parameter gradients in the fixture");
    worst
}

#[test]
fn vae_encoder_matches_diffusers() {
    let cfg = ModelConfig::tiny_sd1();
    let t = load();
    let params = params(&t, &cfg);
    let model = Vae::new(&cfg.vae);
    let images = Var::from_tensor(&t["enc.images"]).unwrap();
    let dist = model.encode_tracked(&params, images.as_tensor()).unwrap();
    let (em, es) = (rel_err(&dist.mean, &t["enc.mean"]), rel_err(&dist.std, &t["enc.std"]));
    println!("encoder: mean rel err {em:e}, std rel err {es:e}");
    assert!(em <= 1e-5 && es <= 1e-5, "mean {em:e} std {es:e}");

    let loss = ((&dist.mean * &t["enc.g_mean"]).unwrap().sum_all().unwrap()
        + (&dist.std * &t["enc.g_std"]).unwrap().sum_all().unwrap())
    .unwrap();
    let store = loss.backward().unwrap();
    let gi = rel_err(store.get(images.as_tensor()).unwrap(), &t["enc.grad.images"]);
    let worst = check_param_grads(&t, "enc", &params, &store);
    println!("encoder: image gradient rel err {gi:e}, worst parameter gradient rel err {worst:e}");
    assert!(gi <= 1e-4, "image gradient {gi:e}");

    // The frozen path: same numbers, no graph.
    let frozen = model.encode(&params, &t["enc.images"], None).unwrap();
    assert_eq!(
        frozen.mean.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        dist.mean.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let none = frozen.mean.sum_all().unwrap().backward().unwrap();
    assert!(params.iter().all(|(_, v)| none.get(v.as_tensor()).is_none()));
}

#[test]
fn vae_decoder_matches_diffusers() {
    let cfg = ModelConfig::tiny_sd1();
    let t = load();
    let params = params(&t, &cfg);
    let model = Vae::new(&cfg.vae);
    let latents = Var::from_tensor(&t["dec.latents"]).unwrap();
    let out = model.decode_tracked(&params, latents.as_tensor()).unwrap();
    let e = rel_err(&out, &t["dec.out"]);
    println!("decoder: output rel err {e:e}");
    assert!(e <= 1e-5, "decoder output {e:e}");

    let store = (&out * &t["dec.g_out"]).unwrap().sum_all().unwrap().backward().unwrap();
    let gl = rel_err(store.get(latents.as_tensor()).unwrap(), &t["dec.grad.latents"]);
    let worst = check_param_grads(&t, "dec", &params, &store);
    println!("decoder: latent gradient rel err {gl:e}, worst parameter gradient rel err {worst:e}");
    assert!(gl <= 1e-4, "latent gradient {gl:e}");

    // decode_latents divides by the scaling factor first.
    let scaled = (&t["dec.latents"] * cfg.vae.scaling_factor).unwrap();
    let via_scaled = model.decode_latents(&params, &scaled, None).unwrap();
    assert!(rel_err(&via_scaled, &t["dec.out"]) <= 1e-5);
}

#[test]
fn vae_training_latents_are_scaled_posterior_samples() {
    let cfg = ModelConfig::tiny_sd1();
    let t = load();
    let params = params(&t, &cfg);
    let model = Vae::new(&cfg.vae);
    let noise = Tensor::randn(0f32, 1f32, (2, 4, 4, 4), &Device::Cpu).unwrap();
    let z = model.encode_to_latents(&params, &t["enc.images"], &noise, None).unwrap();
    let expect = ((&t["enc.mean"] + (&t["enc.std"] * &noise).unwrap()).unwrap() * 0.18215).unwrap();
    let e = rel_err(&z, &expect);
    assert!(e <= 1e-5, "latents {e:e}");
}

#[test]
fn vae_rejects_bad_shapes() {
    let cfg = ModelConfig::tiny_sd1();
    let t = load();
    let params = params(&t, &cfg);
    let model = Vae::new(&cfg.vae);
    assert_eq!(model.downscale_factor(), 8);
    let odd = Tensor::zeros((1, 3, 20, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(model.encode(&params, &odd, None).is_err());
    let gray = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(model.encode(&params, &gray, None).is_err());
    let lat = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(model.decode(&params, &lat, None).is_err());
}

/// bf16 compute of the frozen VAE (weights cast per use): within bf16's precision. Measured
/// with bf16 activations: mean 1.3e-2, std 4.5e-3, decoded 1.6e-2 (the decoder is 25 convs deep,
/// each rounding to 8 mantissa bits); the bound leaves a margin of 3x. On the CPU activations
/// stay f32 (only the products' operands are rounded): 8.2e-3, 2.8e-3, 9.3e-3 (2026-11-29).
#[test]
fn vae_bf16_compute_is_within_bf16_precision() {
    let cfg = ModelConfig::tiny_sd1();
    let t = load();
    let params = params(&t, &cfg);
    let model = Vae::new(&cfg.vae);
    let dist = model.encode(&params, &t["enc.images"], Some(DType::BF16)).unwrap();
    assert_eq!(dist.mean.dtype(), DType::F32, "activations stay f32 on the CPU (bf16 products)");
    let out = model.decode(&params, &t["dec.latents"], Some(DType::BF16)).unwrap();
    let (em, es, ed) = (
        rel_err(&dist.mean, &t["enc.mean"]),
        rel_err(&dist.std, &t["enc.std"]),
        rel_err(&out, &t["dec.out"]),
    );
    println!("bf16: mean {em:e}, std {es:e}, decoded {ed:e}");
    assert!(em <= 5e-2 && es <= 5e-2 && ed <= 5e-2, "mean {em:e} std {es:e} decoded {ed:e}");
}

/// A VAE whose weights are stored in bf16 (e.g. loaded so) takes f32 images as they are.
#[test]
fn vae_with_bf16_weights_accepts_f32_images() {
    let cfg = ModelConfig::tiny_sd1();
    let t = load();
    let params = params(&t, &cfg).to_dtype(DType::BF16).unwrap();
    let model = Vae::new(&cfg.vae);
    let dist = model.encode(&params, &t["enc.images"], None).unwrap();
    assert_eq!(dist.mean.dtype(), DType::BF16);
    assert!(rel_err(&dist.mean, &t["enc.mean"]) <= 5e-2);
    let out = model.decode(&params, &t["dec.latents"], None).unwrap();
    assert!(rel_err(&out, &t["dec.out"]) <= 5e-2);
}
