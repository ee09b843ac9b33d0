//! U-Net parity with diffusers (fixtures from tools/goldens/unet.py): parameter names and
//! shapes, the forward output, and the gradient of every parameter and input for
//! loss = (out * g).sum(), through the hand-chained training backward (with and without
//! checkpointing) and through plain whole-graph autograd.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdbooth_models::init::{fnv1a64, mix, random_params_with, InitStyle};
use sdbooth_models::unet::{param_shapes, TrainOptions, UNet};
use sdbooth_models::{ModelConfig, ParamStore};

const SEED: u64 = 1234;
const K_PROJ: u64 = 16;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

struct Fixture {
    t: HashMap<String, Tensor>,
    params: Vec<(String, Vec<usize>)>,
}

fn fixture(name: &str) -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let t = candle_core::safetensors::load(dir.join(format!("unet_{name}.safetensors")), &Device::Cpu)
        .expect("fixture (regenerate with tools/goldens/unet.py)");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("unet_{name}.json"))).unwrap())
            .unwrap();
    assert_eq!(meta["seed"].as_u64(), Some(SEED));
    let params = meta["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let dims = p[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (p[0].as_str().unwrap().to_string(), dims)
        })
        .collect();
    Fixture { t: t.into_iter().collect(), params }
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (f64s(a), f64s(b));
    let d: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    d / n.max(1e-30)
}

/// The random-sign projections tools/goldens/unet.py stores for large gradients.
fn projections(name: &str, g: &Tensor) -> Vec<f64> {
    let v = f64s(g);
    (0..K_PROJ)
        .map(|k| {
            let key = fnv1a64(&format!("proj.{name}")) ^ mix(1000 + k);
            v.iter()
                .enumerate()
                .map(|(i, x)| {
                    let bits = mix(key.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)));
                    if bits >> 63 == 1 {
                        -x
                    } else {
                        *x
                    }
                })
                .sum()
        })
        .collect()
}

/// Norm-relative error of our gradient against the fixture's (whole, or estimated from
/// projections for large tensors).
fn grad_err(fx: &Fixture, name: &str, ours: &Tensor) -> f64 {
    let (d, norm) = grad_diff(fx, name, ours);
    d / norm.max(1e-30)
}

/// `(‖ours − fixture‖, ‖fixture‖)` for a parameter gradient (the difference estimated from
/// projections for large tensors).
fn grad_diff(fx: &Fixture, name: &str, ours: &Tensor) -> (f64, f64) {
    if let Some(want) = fx.t.get(&format!("grad.{name}")) {
        let norm = f64s(want).iter().map(|y| y * y).sum::<f64>().sqrt();
        return (rel_err(ours, want) * norm.max(1e-30), norm);
    }
    let proj = f64s(&fx.t[&format!("gproj.{name}")]);
    let norm = f64s(&fx.t[&format!("gnorm.{name}")])[0];
    let mine = projections(name, ours);
    let d: f64 = mine.iter().zip(&proj).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    (d / (K_PROJ as f64).sqrt(), norm)
}

fn setup(cfg: &ModelConfig, fx: &Fixture) -> (UNet, ParamStore) {
    let ours = param_shapes(&cfg.unet);
    let mut a: Vec<_> = ours.clone();
    let mut b: Vec<_> = fx.params.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "parameter names/shapes differ from diffusers'");
    let params = random_params_with(&ours, SEED, InitStyle::AllRandom, &Device::Cpu).unwrap();
    (UNet::new(&cfg.unet), params)
}

fn check(name: &str, cfg: ModelConfig) {
    let fx = fixture(name);
    let (unet, params) = setup(&cfg, &fx);
    let (lat, ts, ctx, g) = (&fx.t["latents"], &fx.t["timesteps"], &fx.t["ctx"], &fx.t["g"]);

    let out = unet.forward_frozen(&params, lat, ts, ctx, None).unwrap();
    let e = rel_err(&out, &fx.t["out"]);
    println!("{name}: forward rel err {e:.2e}");
    assert!(e <= 1e-5, "{name}: forward rel err {e}");

    let mut runs: Vec<BTreeMap<String, Tensor>> = Vec::new();
    for checkpointing in [false, true] {
        let opts = TrainOptions { checkpointing, ctx_grad: true, latents_grad: true, ..Default::default() };
        let mut got = BTreeMap::new();
        let mut hook = |gs: &[(String, Tensor)]| {
            for (n, t) in gs {
                assert!(got.insert(n.clone(), t.clone()).is_none(), "{n} reported twice");
            }
            Ok(())
        };
        let (out2, grads) =
            unet.forward_backward(&params, lat, ts, ctx, opts, |_| Ok(g.clone()), &mut hook).unwrap();
        assert_eq!(f64s(&out2), f64s(&out), "training forward differs from the plain one");
        got.insert("input.latents".into(), grads.latents.unwrap());
        got.insert("input.ctx".into(), grads.ctx.unwrap());
        runs.push(got);
    }
    let (plain, ckpt) = (&runs[0], &runs[1]);
    assert_eq!(plain.len(), fx.params.len() + 2);
    // Checkpointing recomputes the same ops on the same values: bit-identical gradients.
    for (n, t) in plain {
        assert_eq!(f64s(t), f64s(&ckpt[n]), "{n}: checkpointed gradient differs");
    }

    let mut worst = (0.0, String::new());
    for (pname, _) in &fx.params {
        let e = grad_err(&fx, pname, &plain[pname]);
        if e > worst.0 {
            worst = (e, pname.clone());
        }
    }
    let el = rel_err(&plain["input.latents"], &fx.t["grad_input.latents"]);
    let ec = rel_err(&plain["input.ctx"], &fx.t["grad_input.ctx"]);
    println!(
        "{name}: worst param grad rel err {:.2e} ({}), latents {el:.2e}, ctx {ec:.2e}",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1e-4, "{name}: gradient of {} rel err {}", worst.1, worst.0);
    assert!(el <= 1e-4 && ec <= 1e-4, "{name}: input grads rel err {el} {ec}");

    // Plain whole-graph autograd through `forward` agrees with the hand-chained backward
    // (summation order differs, so within rounding, not bit for bit).
    let lat_v = candle_core::Var::from_tensor(lat).unwrap();
    let ctx_v = candle_core::Var::from_tensor(ctx).unwrap();
    let out3 = unet.forward(&params, lat_v.as_tensor(), ts, ctx_v.as_tensor()).unwrap();
    let store = (out3 * g).unwrap().sum_all().unwrap().backward().unwrap();
    let mut worst = 0f64;
    for (pname, _) in &fx.params {
        let whole = store.get(params.get(pname).unwrap()).unwrap();
        worst = worst.max(rel_err(&plain[pname], whole));
    }
    worst = worst.max(rel_err(&plain["input.latents"], store.get(lat_v.as_tensor()).unwrap()));
    worst = worst.max(rel_err(&plain["input.ctx"], store.get(ctx_v.as_tensor()).unwrap()));
    println!("{name}: hand-chained vs whole-graph worst rel diff {worst:.2e}");
    assert!(worst <= 1e-6, "{name}: hand-chained vs whole-graph {worst}");
}

#[test]
fn unet_tiny_sd1_matches_diffusers() {
    check("tiny_sd1", ModelConfig::tiny_sd1());
}

#[test]
fn unet_tiny_sd2_matches_diffusers() {
    check("tiny_sd2", ModelConfig::tiny_sd2());
}

/// A latent size that is not a multiple of 8 (three upsamplers): each upsampler returns to its
/// skip connection's size, as diffusers' `upsample_size`; forward and backward.
#[test]
fn unet_tiny_sd1_65x64_matches_diffusers() {
    check("tiny_sd1_65x64", ModelConfig::tiny_sd1());
}

/// bf16 compute (f32 master weights) against PyTorch's CPU autocast-bf16 on the same model and
/// inputs (tools/goldens/unet_bf16.py): both measured as distances from the f32 result (the
/// tiny_sd1 fixture), ours may be at most [`BF16_VS_AUTOCAST`] times autocast's on the output,
/// the input gradients and the parameter gradients (all together, and the median tensor).
/// bf16 rounds in different places here and in PyTorch (on the CPU we keep activations in f32
/// and round only the operands of the matrix products; autocast also rounds the outputs of its
/// bf16 ops), so the two are compared by how close each gets, not value by value.
#[test]
fn unet_tiny_sd1_bf16_is_as_close_to_f32_as_autocast() {
    const BF16_VS_AUTOCAST: f64 = 1.5;
    let fx = fixture("tiny_sd1");
    let (unet, params) = setup(&ModelConfig::tiny_sd1(), &fx);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("unet_tiny_sd1_autocast_bf16.json"))
            .expect("fixture (regenerate with tools/goldens/unet_bf16.py)"),
    )
    .unwrap();
    let theirs = |k: &str| meta["autocast_bf16_rel_err_vs_f32"][k].as_f64().unwrap();
    let (lat, ts, ctx, g) = (&fx.t["latents"], &fx.t["timesteps"], &fx.t["ctx"], &fx.t["g"]);
    let opts = TrainOptions {
        checkpointing: true,
        compute_dtype: Some(DType::BF16),
        ctx_grad: true,
        latents_grad: true,
        ..Default::default()
    };
    let mut got = BTreeMap::new();
    let mut hook = |gs: &[(String, Tensor)]| {
        for (n, t) in gs {
            assert_eq!(t.dtype(), DType::F32, "{n}: f32 master weights get f32 gradients");
            got.insert(n.clone(), t.clone());
        }
        Ok(())
    };
    let (out, grads) =
        unet.forward_backward(&params, lat, ts, ctx, opts, |_| Ok(g.clone()), &mut hook).unwrap();
    let (mut num, mut den, mut per_param) = (0f64, 0f64, Vec::new());
    for (pname, _) in &fx.params {
        let (d, n) = grad_diff(&fx, pname, &got[pname]);
        num += d * d;
        den += n * n;
        per_param.push(d / n.max(1e-30));
    }
    per_param.sort_by(f64::total_cmp);
    let ours = [
        ("out", rel_err(&out, &fx.t["out"])),
        ("grad_latents", rel_err(grads.latents.as_ref().unwrap(), &fx.t["grad_input.latents"])),
        ("grad_ctx", rel_err(grads.ctx.as_ref().unwrap(), &fx.t["grad_input.ctx"])),
        ("grad_params_all", (num / den).sqrt()),
        ("grad_params_median", per_param[per_param.len() / 2]),
    ];
    println!("bf16 kernel {}", sdbooth_ops::bf16_kernel().name());
    for (k, e) in ours {
        println!("{k}: ours {e:.3e}, autocast-bf16 {:.3e} (ratio {:.2})", theirs(k), e / theirs(k));
    }
    for (k, e) in ours {
        assert!(e <= BF16_VS_AUTOCAST * theirs(k), "{k}: bf16 rel err {e:.3e} vs autocast {:.3e}", theirs(k));
    }
}
