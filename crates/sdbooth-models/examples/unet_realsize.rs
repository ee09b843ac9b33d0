//! Real-size U-Net tools (not in CI; SD1.5 needs ~4 GB for weights, ~8 GB with gradients):
//!
//! `check DIR`: compares one forward of SD1.5 and SD2.1 against diffusers' output written by
//!   tools/goldens/realsize_check.py (same seeded weights, regenerated here).
//! `bench [RES] [STEPS]`: times forward + backward of the SD1.5 U-Net at RES px (default 256),
//!   batch 1, fp32, gradient checkpointing, parameter gradients dropped by the hook.

use std::time::Instant;

use candle_core::{Device, Tensor};
use sdbooth_models::init::{random_params_with, InitStyle};
use sdbooth_models::unet::{TrainOptions, UNet};
use sdbooth_models::ModelConfig;

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    (d / n).sqrt()
}

fn check(dir: &str) {
    for (name, cfg) in [("sd15", ModelConfig::sd1()), ("sd21", ModelConfig::sd2_768_v())] {
        let path = format!("{dir}/{name}.safetensors");
        let t = candle_core::safetensors::load(&path, &Device::Cpu).expect("run realsize_check.py first");
        let unet = UNet::new(&cfg.unet);
        let t0 = Instant::now();
        let params =
            random_params_with(&unet.param_shapes(), 99, InitStyle::AllRandom, &Device::Cpu).unwrap();
        let t1 = Instant::now();
        let out = unet.forward_frozen(&params, &t["latents"], &t["timesteps"], &t["ctx"], None).unwrap();
        let e = rel_err(&out, &t["out"]);
        println!(
            "{name}: init {:.1}s, forward {:.1}s, rel err vs diffusers {e:.2e} {}",
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64(),
            if e <= 1e-5 { "OK" } else { "FAIL" }
        );
    }
}

fn bench(res: usize, steps: usize) {
    let cfg = ModelConfig::sd1();
    let unet = UNet::new(&cfg.unet);
    let params = random_params_with(&unet.param_shapes(), 15, InitStyle::Standard, &Device::Cpu).unwrap();
    let hw = res / 8;
    let lat = Tensor::randn(0f32, 1.0, (1, 4, hw, hw), &Device::Cpu).unwrap();
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, 768), &Device::Cpu).unwrap();
    let opts = TrainOptions { checkpointing: true, ctx_grad: true, ..Default::default() };
    println!("weights ready, peak RSS {:.2} GiB", peak_rss_gib());
    for step in 0..steps + 1 {
        let t0 = Instant::now();
        let tape = unet.forward_train(&params, &lat, &t, &ctx, opts).unwrap();
        let t1 = Instant::now();
        let g = tape.output().ones_like().unwrap();
        let mut n = 0usize;
        tape.backward(&g, &mut |gs| {
            n += gs.len();
            Ok(())
        })
        .unwrap();
        let t2 = Instant::now();
        println!(
            "step {step}{}: forward {:.2}s, backward {:.2}s, total {:.2}s ({n} grads), peak RSS {:.2} GiB",
            if step == 0 { " (warm-up)" } else { "" },
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t2 - t0).as_secs_f64(),
            peak_rss_gib()
        );
    }
}

/// Peak resident memory so far (Linux), in GiB.
fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / (1024.0 * 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => check(args.get(1).map(String::as_str).unwrap_or("/tmp/unet_realsize")),
        Some("bench") => bench(
            args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256),
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2),
        ),
        _ => eprintln!("usage: unet_realsize check DIR | bench [RES] [STEPS]"),
    }
}
