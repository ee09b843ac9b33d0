//! Real-size text encoder and VAE tools (not in CI):
//!
//! `check DIR`: compares CLIP-L (SD1), OpenCLIP-H (SD2) and the SD VAE against transformers' and
//!   diffusers' outputs written by tools/goldens/clip_vae_realsize.py (same seeded weights,
//!   regenerated here): last hidden state, clip_skip 2, posterior mean/std, decoder output.
//! `bench [STEPS]`: times the CLIP-L training forward + backward (batch 1, one 77-token window,
//!   f32, with and without checkpointing), parameter gradients dropped by the hook.
//! `vae RES`: times one SD VAE encode (1 image, RES px, f32, frozen) and prints the peak RSS.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdbooth_models::clip::{ClipTextModel, ClipTrainOptions};
use sdbooth_models::init::{random_params_with, InitStyle};
use sdbooth_models::vae::Vae;
use sdbooth_models::ModelConfig;

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    (d / n).sqrt()
}

fn verdict(e: f64) -> &'static str {
    if e <= 1e-5 {
        "OK"
    } else {
        "FAIL"
    }
}

fn check(dir: &str) {
    for (name, cfg) in [("clip_sd1", ModelConfig::sd1()), ("clip_sd2", ModelConfig::sd2_512())] {
        let t = candle_core::safetensors::load(format!("{dir}/{name}.safetensors"), &Device::Cpu)
            .expect("run tools/goldens/clip_vae_realsize.py first");
        let model = ClipTextModel::new(&cfg.text);
        let params =
            random_params_with(&model.param_shapes(), 99, InitStyle::AllRandom, &Device::Cpu).unwrap();
        let ids = t["ids"].to_dtype(DType::U32).unwrap();
        let t0 = Instant::now();
        let out = model.encode(&params, &ids, None, None).unwrap();
        let skip2 = model.encode(&params, &ids, Some(2), None).unwrap();
        let (e1, e2) = (rel_err(&out, &t["out"]), rel_err(&skip2, &t["skip2"]));
        println!(
            "{name}: two forwards {:.2}s, rel err vs transformers: last {e1:.2e} {}, clip_skip 2 {e2:.2e} {}",
            t0.elapsed().as_secs_f64(),
            verdict(e1),
            verdict(e2)
        );
    }
    let cfg = ModelConfig::sd1();
    let t = candle_core::safetensors::load(format!("{dir}/vae.safetensors"), &Device::Cpu)
        .expect("run tools/goldens/clip_vae_realsize.py first");
    let vae = Vae::new(&cfg.vae);
    let params = random_params_with(&vae.param_shapes(), 99, InitStyle::AllRandom, &Device::Cpu).unwrap();
    let t0 = Instant::now();
    let dist = vae.encode(&params, &t["images"], None).unwrap();
    let decoded = vae.decode(&params, &t["latents"], None).unwrap();
    let (em, es, ed) =
        (rel_err(&dist.mean, &t["mean"]), rel_err(&dist.std, &t["std"]), rel_err(&decoded, &t["decoded"]));
    println!(
        "vae (64 px): encode + decode {:.2}s, rel err vs diffusers: mean {em:.2e} {}, std {es:.2e} {}, decoded {ed:.2e} {}",
        t0.elapsed().as_secs_f64(),
        verdict(em),
        verdict(es),
        verdict(ed)
    );
}

fn bench(steps: usize) {
    let cfg = ModelConfig::sd1();
    let model = ClipTextModel::new(&cfg.text);
    let params = random_params_with(&model.param_shapes(), 15, InitStyle::Standard, &Device::Cpu).unwrap();
    let ids = Tensor::arange(0u32, 77, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let g = Tensor::randn(0f32, 1f32, (1, 77, 768), &Device::Cpu).unwrap();
    for checkpointing in [false, true] {
        let opts = ClipTrainOptions { checkpointing, compute_dtype: None };
        for step in 0..=steps {
            let t0 = Instant::now();
            let tape = model.forward_train(&params, &ids, None, opts).unwrap();
            let t1 = Instant::now();
            // Time between hook calls = one block's backward (final LN, layers 11..0, embeddings).
            let mut marks = vec![t1];
            tape.backward(&g, &mut |_| {
                marks.push(Instant::now());
                Ok(())
            })
            .unwrap();
            let blocks: Vec<String> =
                marks.windows(2).map(|w| format!("{:.0}", (w[1] - w[0]).as_secs_f64() * 1e3)).collect();
            let label = if step == 0 { "warm-up" } else { "step" };
            println!(
                "CLIP-L checkpointing={checkpointing} {label}: forward {:.3}s, backward {:.3}s (ms per block: {})",
                (t1 - t0).as_secs_f64(),
                t1.elapsed().as_secs_f64(),
                blocks.join(" ")
            );
        }
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn vae_bench(res: usize) {
    let cfg = ModelConfig::sd1();
    let vae = Vae::new(&cfg.vae);
    let params = random_params_with(&vae.param_shapes(), 15, InitStyle::Standard, &Device::Cpu).unwrap();
    let before = peak_rss_mib();
    let images = Tensor::rand(-1f32, 1f32, (1, 3, res, res), &Device::Cpu).unwrap();
    let noise = Tensor::randn(0f32, 1f32, (1, 4, res / 8, res / 8), &Device::Cpu).unwrap();
    let t0 = Instant::now();
    let z = vae.encode_to_latents(&params, &images, &noise, None).unwrap();
    println!(
        "SD VAE encode {res} px: {:.2}s, latents {:?}, peak RSS {:.0} MiB (weights loaded: {before:.0} MiB)",
        t0.elapsed().as_secs_f64(),
        z.dims(),
        peak_rss_mib()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => check(args.get(1).map(String::as_str).unwrap_or("/tmp/clip_vae_realsize")),
        Some("vae") => vae_bench(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(512)),
        Some("bench") => bench(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2)),
        _ => eprintln!("usage: clip_vae_realsize check [DIR] | bench [STEPS] | vae [RES]"),
    }
}
