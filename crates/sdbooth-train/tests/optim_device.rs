//! The tensor-operation optimizers (`optim/device/`, the path a GPU takes) against their host
//! kernels (the CPU path), on the CPU: every optimizer over several steps on random tensors, with
//! gradient scales, clipping and the fused update; 8-bit state; bf16 stochastic rounding; saved
//! states that resume on the other path.
//!
//! Bound: none — on the CPU the tensor path repeats the host kernels' f32 arithmetic operation by
//! operation, so weights and state are compared bit for bit (measured equal on 2026-11-29).
//! `--full_bf16` included: both paths draw their rounding bits from one counter hash (since
//! 2026-11-30; before, the host used a ChaCha stream and the paths differed by a bf16 step).

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sdbooth_models::ParamStore;
use sdbooth_train::optim::device::{rounding_key, stochastic_round_bf16};
use sdbooth_train::optim::{Kernels, Optimizer, OptimizerConfig, OptimizerKind, StateBuf};
use sdbooth_train::update::{
    apply_accumulated, FusedUpdate, GradAccumulator, GradSink, LearningRates, LossScale, Part, TrainedParams,
};

/// Shapes covering the code paths: 2-D and 4-D (Adafactor factored), 1-D, and sizes above and
/// below AdamW8bit's 4096-value threshold with a partial last block.
const PARAMS: [(&str, &[usize]); 4] =
    [("conv", &[16, 8, 3, 3]), ("proj", &[40, 130]), ("bias", &[37]), ("norm", &[300])];
/// One tensor above the tensor path's chunk of 2^20 values: a partial last chunk that ends in a
/// partial block.
const BIG: [(&str, &[usize]); 2] = [("big", &[1100, 1000]), ("bias", &[37])];

fn random(shape: &[usize], scale: f32, rng: &mut ChaCha8Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn optimizer(config: &OptimizerConfig, kernels: Kernels) -> Optimizer {
    let mut opt = Optimizer::new(config.clone());
    opt.kernels = kernels;
    opt
}

fn cfg(kind: OptimizerKind, args: &[&str]) -> OptimizerConfig {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    OptimizerConfig::from_args(kind, &args).unwrap()
}

/// Every optimizer configuration the comparison covers.
fn configs() -> Vec<(&'static str, OptimizerConfig)> {
    vec![
        ("AdamW", cfg(OptimizerKind::AdamW, &[])),
        (
            "AdamW betas 0.3 (lerp from the end)",
            cfg(OptimizerKind::AdamW, &["betas=0.3,0.99", "weight_decay=0.1"]),
        ),
        ("AdamW8bit", cfg(OptimizerKind::AdamW8bit, &[])),
        ("AdamW8bit no decay", cfg(OptimizerKind::AdamW8bit, &["weight_decay=0", "betas=0.8,0.95"])),
        ("Lion", cfg(OptimizerKind::Lion, &["weight_decay=0.1"])),
        ("SGDNesterov", cfg(OptimizerKind::SGDNesterov, &[])),
        ("SGDNesterov wd", cfg(OptimizerKind::SGDNesterov, &["momentum=0.8", "weight_decay=0.01"])),
        ("Adafactor", cfg(OptimizerKind::Adafactor, &[])),
        (
            "Adafactor fixed lr, beta1, wd",
            cfg(
                OptimizerKind::Adafactor,
                &["relative_step=False", "scale_parameter=False", "beta1=0.9", "weight_decay=0.01"],
            ),
        ),
    ]
}

/// Asserts that two optimizers hold the same state, bit for bit.
fn assert_same_state(what: &str, host: &Optimizer, tensor: &Optimizer) {
    assert_eq!(host.states.len(), tensor.states.len(), "{what}: parameters with state");
    for (name, h) in &host.states {
        let t = &tensor.states[name];
        assert_eq!((h.step, h.last_lr), (t.step, t.last_lr), "{what} {name}: step, last lr");
        assert_eq!(h.bufs.keys().collect::<Vec<_>>(), t.bufs.keys().collect::<Vec<_>>(), "{what} {name}");
        for (key, hb) in &h.bufs {
            assert!(matches!(t.bufs[key], StateBuf::Tensor(_)), "{what} {name}.{key}: not a tensor");
            assert!(*hb == t.bufs[key], "{what} {name}.{key}: state differs");
        }
    }
}

/// Steps both paths `steps` times from the same weights with the same gradients (scaled by
/// `scales` in turn); asserts equal weights after every step and equal state at the end.
fn compare_params(
    params: &[(&str, &[usize])],
    what: &str,
    config: &OptimizerConfig,
    steps: u64,
    scales: &[f32],
    seed: u64,
) -> (Optimizer, Optimizer) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let init: Vec<Tensor> = params.iter().map(|(_, s)| random(s, 0.5, &mut rng)).collect();
    let host_vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let tensor_vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let (mut host, mut tensor) = (optimizer(config, Kernels::Host), optimizer(config, Kernels::Tensor));
    for step in 1..=steps {
        let gs = scales[(step as usize - 1) % scales.len()];
        for (((name, shape), hv), tv) in params.iter().zip(&host_vars).zip(&tensor_vars) {
            let g = random(shape, 0.1, &mut rng);
            host.step_param_scaled(name, hv, &g, 1e-3, gs).unwrap();
            tensor.step_param_scaled(name, tv, &g, 1e-3, gs).unwrap();
            assert!(
                values(hv.as_tensor()) == values(tv.as_tensor()),
                "{what}: {name} differs after step {step}"
            );
        }
    }
    assert_same_state(what, &host, &tensor);
    (host, tensor)
}

#[test]
fn tensor_optimizers_equal_the_host_kernels() {
    for (what, config) in configs() {
        compare_params(&PARAMS, what, &config, 6, &[1.0, 0.37, 1.0], 7);
    }
}

/// Tensors above one chunk are updated chunk by chunk on the tensor path, with the same result.
#[test]
fn chunked_updates_equal_the_host_kernels() {
    let elementwise = ["AdamW", "AdamW8bit", "Lion", "SGDNesterov"];
    for (what, config) in configs().into_iter().filter(|(w, _)| elementwise.contains(w)) {
        let (host, _) = compare_params(&BIG, what, &config, 2, &[0.5], 8);
        // A state read from a file (host buffers) continues chunk by chunk on the tensor path.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.safetensors");
        host.save(&file).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (w, g) = (random(BIG[0].1, 0.5, &mut rng), random(BIG[0].1, 0.1, &mut rng));
        let results: Vec<Vec<f32>> = [Kernels::Host, Kernels::Tensor]
            .into_iter()
            .map(|kernels| {
                let mut opt = Optimizer::load(&file).unwrap();
                opt.kernels = kernels;
                let var = Var::from_tensor(&w).unwrap();
                opt.step_param(BIG[0].0, &var, &g, 1e-3).unwrap();
                values(var.as_tensor())
            })
            .collect();
        assert!(results[0] == results[1], "{what}: loaded state continues differently");
    }
}

#[test]
fn adamw8bit_state_is_8bit_on_the_tensor_path() {
    let (_, tensor) = compare_params(&PARAMS, "AdamW8bit", &cfg(OptimizerKind::AdamW8bit, &[]), 2, &[1.0], 3);
    let st = &tensor.states["proj"];
    let n = 40 * 130;
    let dtype = |k: &str| match &st.bufs[k] {
        StateBuf::Tensor(t) => (t.dtype(), t.elem_count()),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(dtype("state1"), (DType::U8, n));
    assert_eq!(dtype("state2"), (DType::U8, n));
    assert_eq!(dtype("absmax1"), (DType::F32, n.div_ceil(256)));
    // Below the threshold the moments stay f32, as bitsandbytes does.
    assert!(matches!(&tensor.states["norm"].bufs["state1"], StateBuf::Tensor(t) if t.dtype() == DType::F32));
}

#[test]
fn adamw8bit_non_finite_gradients_zero_the_moments_on_both_paths() {
    let config = cfg(OptimizerKind::AdamW8bit, &[]);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let init = random(&[5000], 0.5, &mut rng);
    let (hv, tv) = (Var::from_tensor(&init).unwrap(), Var::from_tensor(&init).unwrap());
    let (mut host, mut tensor) = (optimizer(&config, Kernels::Host), optimizer(&config, Kernels::Tensor));
    for step in 0..3 {
        let mut g = values(&random(&[5000], 0.1, &mut rng));
        g[17 + step] = f32::NAN;
        g[4000 + step] = f32::INFINITY;
        g[300] = 0.0; // zero gradients exercise the sign rule at zero
        g[301] = -0.0;
        let g = Tensor::from_vec(g, 5000, &Device::Cpu).unwrap();
        host.step_param("w", &hv, &g, 1e-3).unwrap();
        tensor.step_param("w", &tv, &g, 1e-3).unwrap();
        assert!(values(hv.as_tensor()) == values(tv.as_tensor()), "weights differ after step {step}");
    }
    assert_same_state("AdamW8bit non-finite", &host, &tensor);
}

/// A state saved by either path is the same file, and continues on the other path as on its own.
#[test]
fn saved_state_is_the_same_file_and_resumes_on_the_other_path() {
    for (what, config) in configs() {
        let (mut host, mut tensor) = compare_params(&PARAMS, what, &config, 3, &[1.0], 5);
        host.add_group("unet", 1e-3, PARAMS.iter().map(|(n, _)| n.to_string()).collect());
        tensor.add_group("unet", 1e-3, PARAMS.iter().map(|(n, _)| n.to_string()).collect());
        let dir = tempfile::tempdir().unwrap();
        let (hp, tp) = (dir.path().join("host.safetensors"), dir.path().join("tensor.safetensors"));
        host.save(&hp).unwrap();
        tensor.save(&tp).unwrap();
        assert!(std::fs::read(&hp).unwrap() == std::fs::read(&tp).unwrap(), "{what}: saved files differ");
        // Crossed: the host path continues from the tensor path's file and the other way round.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let init: Vec<Tensor> = PARAMS.iter().map(|(_, s)| random(s, 0.5, &mut rng)).collect();
        let mut results = Vec::new();
        for (file, kernels) in [(&tp, Kernels::Host), (&hp, Kernels::Tensor)] {
            let mut opt = Optimizer::load(file).unwrap();
            opt.kernels = kernels;
            let mut rng = ChaCha8Rng::seed_from_u64(10);
            let vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            for _ in 0..3 {
                for ((name, shape), v) in PARAMS.iter().zip(&vars) {
                    opt.step_param(name, v, &random(shape, 0.1, &mut rng), 1e-3).unwrap();
                }
            }
            results.push(vars.iter().map(|v| values(v.as_tensor())).collect::<Vec<_>>());
        }
        assert!(results[0] == results[1], "{what}: resumed runs differ between the paths");
    }
}

fn part_store(names: &[&str], rng: &mut ChaCha8Rng) -> ParamStore {
    let mut store = ParamStore::default();
    for (i, name) in names.iter().enumerate() {
        let shape: &[usize] = if i % 2 == 0 { &[12, 9] } else { &[33] };
        store.insert(*name, random(shape, 0.5, rng)).unwrap();
    }
    store
}

/// The update paths of `crate::update` (global clipping with the fp16 loss scale, and the fused
/// per-tensor update) give the same weights with either implementation.
#[test]
fn accumulated_and_fused_updates_equal_the_host_kernels() {
    for kind in [OptimizerKind::AdamW, OptimizerKind::AdamW8bit] {
        let run = |kernels: Kernels, fused: bool| -> Vec<Vec<f32>> {
            let mut rng = ChaCha8Rng::seed_from_u64(21);
            let unet = part_store(&["a", "b"], &mut rng);
            let text_encoder = part_store(&["c"], &mut rng);
            let params = TrainedParams { unet: &unet, text_encoder: &text_encoder };
            let mut opt = optimizer(&OptimizerConfig::new(kind), kernels);
            let lrs = LearningRates { unet: 1e-3, text_encoder: 5e-4 };
            let mut scale = Some(LossScale::default());
            for _ in 0..4 {
                let grads: Vec<(Part, &str, Tensor)> =
                    [(Part::Unet, "a"), (Part::Unet, "b"), (Part::TextEncoder, "c")]
                        .into_iter()
                        .map(|(p, n)| {
                            let shape = params.var(p, n).unwrap().dims().to_vec();
                            (p, n, random(&shape, 3.0 * 65536.0, &mut rng))
                        })
                        .collect();
                if fused {
                    let mut sink = FusedUpdate { optimizer: &mut opt, params, lrs, max_norm: 1.0 };
                    for (p, n, g) in &grads {
                        sink.add(*p, n, &(g / 65536.0).unwrap()).unwrap();
                    }
                } else {
                    let mut acc = GradAccumulator::default();
                    for (p, n, g) in &grads {
                        acc.add(*p, n, g).unwrap();
                    }
                    apply_accumulated(&mut opt, params, &acc, lrs, 1.0, scale.as_mut()).unwrap();
                }
            }
            ["a", "b"]
                .iter()
                .map(|n| values(unet.var(n).unwrap().as_tensor()))
                .chain([values(text_encoder.var("c").unwrap().as_tensor())])
                .collect()
        };
        for fused in [false, true] {
            assert!(run(Kernels::Host, fused) == run(Kernels::Tensor, fused), "{kind:?} fused={fused}");
        }
    }
}

/// bf16 weights: both paths round with one stream, so they give the same bits; the tensor path's
/// rounding is unbiased, deterministic and depends on the seed.
#[test]
fn bf16_weights_round_stochastically_on_the_tensor_path() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let init = random(&[64, 50], 0.5, &mut rng).to_dtype(DType::BF16).unwrap();
    for kind in [OptimizerKind::AdamW, OptimizerKind::AdamW8bit] {
        let config = cfg(kind, &[]);
        let (hv, tv) = (Var::from_tensor(&init).unwrap(), Var::from_tensor(&init).unwrap());
        let (mut host, mut tensor) = (optimizer(&config, Kernels::Host), optimizer(&config, Kernels::Tensor));
        for _ in 0..3 {
            let g = random(&[64, 50], 0.1, &mut rng);
            host.step_param("w", &hv, &g, 1e-3).unwrap();
            tensor.step_param("w", &tv, &g, 1e-3).unwrap();
        }
        assert_eq!(tv.dtype(), DType::BF16);
        let (h, t, w0) = (values(hv.as_tensor()), values(tv.as_tensor()), values(&init));
        assert!(h == t, "{kind:?}: host and tensor paths round differently");
        // Stochastic: some weights moved by less than a bf16 step on average still changed.
        let changed = h.iter().zip(&w0).filter(|(a, b)| a != b).count();
        assert!(changed > 0 && changed < h.len(), "{kind:?}: {changed} of {} changed", h.len());
    }

    // Unbiased: 1e-6 steps on weights of 1.0 (bf16 step 2^-7) move the mean by the right amount.
    let n = 20_000;
    let run = |seed: u64| {
        let var = Var::from_tensor(&Tensor::ones(n, DType::BF16, &Device::Cpu).unwrap()).unwrap();
        let mut c = cfg(OptimizerKind::SGDNesterov, &[]);
        c.momentum = 1e-9;
        c.rounding_seed = seed;
        let mut opt = optimizer(&c, Kernels::Tensor);
        let g = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        for _ in 0..10 {
            opt.step_param("w", &var, &g, 1e-4).unwrap();
        }
        values(var.as_tensor())
    };
    let a = run(1);
    let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
    assert!((mean - 0.999).abs() < 1e-4, "mean {mean}");
    assert!(a == run(1), "same seed must give the same weights");
    assert!(a != run(2), "another seed must give other weights");
}

/// The rounding rule itself: bf16 values stay; other values go to one of their two bf16
/// neighbours, up with a frequency equal to their position between them.
#[test]
fn stochastic_round_bf16_picks_a_neighbour_with_the_right_frequency() {
    let spacing = 2f32.powi(-7); // bf16 spacing in [1, 2)
    for frac in [0.0f32, 0.25, 0.5, 0.9] {
        for sign in [1.0f32, -1.0] {
            let x = sign * (1.0 + 3.0 * spacing + frac * spacing);
            let n = 40_000;
            let t = Tensor::full(x, n, &Device::Cpu).unwrap();
            let r = values(&stochastic_round_bf16(&t, 12345).unwrap());
            let (lo, hi) = (sign * (1.0 + 3.0 * spacing), sign * (1.0 + 4.0 * spacing));
            assert!(r.iter().all(|&v| v == lo || v == hi), "x {x}: a value is not a neighbour");
            let ups = r.iter().filter(|&&v| v == hi).count() as f64 / n as f64;
            // Binomial standard deviation at most 0.0025 for 40000 draws.
            assert!((ups - f64::from(frac)).abs() < 0.01, "x {x}: rounded away {ups}, expected {frac}");
        }
    }
    let specials =
        Tensor::new(&[0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -3.5], &Device::Cpu).unwrap();
    let r = values(&stochastic_round_bf16(&specials, 1).unwrap());
    assert_eq!(&r[..4], &[0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY]);
    assert!(r[1].is_sign_negative(), "-0 keeps its sign");
    assert!((r[4] - 1e-30).abs() <= 1e-30 * 2f32.powi(-7), "{}", r[4]);
    assert_eq!(r[5], -3.5);
    let nan = values(&stochastic_round_bf16(&Tensor::new(&[f32::NAN], &Device::Cpu).unwrap(), 1).unwrap());
    assert!(nan[0].is_nan());
}

/// bf16 weights on the tensor path are the f32 update rounded with the stream of (seed, name,
/// step), also when the tensor is updated and rounded chunk by chunk.
#[test]
fn bf16_tensor_path_is_the_f32_update_rounded_also_by_chunks() {
    for (name, shape) in BIG {
        let mut rng = ChaCha8Rng::seed_from_u64(30);
        let w16 = random(shape, 0.5, &mut rng).to_dtype(DType::BF16).unwrap();
        let g = random(shape, 0.1, &mut rng);
        let mut config = cfg(OptimizerKind::AdamW8bit, &[]);
        config.rounding_seed = 77;
        // The f32 update of the same values, by the host kernels.
        let f32_var = Var::from_tensor(&w16.to_dtype(DType::F32).unwrap()).unwrap();
        optimizer(&config, Kernels::Host).step_param(name, &f32_var, &g, 1e-3).unwrap();
        let expected = stochastic_round_bf16(f32_var.as_tensor(), rounding_key(77, name, 1)).unwrap();
        let var = Var::from_tensor(&w16).unwrap();
        optimizer(&config, Kernels::Tensor).step_param(name, &var, &g, 1e-3).unwrap();
        assert_eq!(var.dtype(), DType::BF16);
        assert!(values(var.as_tensor()) == values(&expected), "{name}: bf16 weights differ");
        assert!(values(var.as_tensor()) != values(&w16), "{name}: nothing moved");
    }
}

/// The fused update handed a block's gradients at once (their norms computed together, in
/// parallel) gives the bits of handing them over one by one, clipping included.
#[test]
fn fused_update_by_block_equals_one_gradient_at_a_time() {
    for kind in [OptimizerKind::AdamW, OptimizerKind::AdamW8bit] {
        let run = |by_block: bool| -> Vec<Vec<f32>> {
            let mut rng = ChaCha8Rng::seed_from_u64(22);
            let names = ["a", "b", "c", "d"];
            let unet = part_store(&names, &mut rng);
            let text_encoder = ParamStore::default();
            let params = TrainedParams { unet: &unet, text_encoder: &text_encoder };
            let mut opt = optimizer(&OptimizerConfig::new(kind), Kernels::Host);
            let lrs = LearningRates { unet: 1e-3, text_encoder: 0.0 };
            for _ in 0..3 {
                let grads: Vec<(String, Tensor)> = names
                    .iter()
                    .map(|n| {
                        (n.to_string(), random(params.var(Part::Unet, n).unwrap().dims(), 2.0, &mut rng))
                    })
                    .collect();
                let mut sink = FusedUpdate { optimizer: &mut opt, params, lrs, max_norm: 1.0 };
                if by_block {
                    sink.add_block(Part::Unet, &grads).unwrap();
                } else {
                    for (n, g) in &grads {
                        sink.add(Part::Unet, n, g).unwrap();
                    }
                }
            }
            names.iter().map(|n| values(unet.var(n).unwrap().as_tensor())).collect()
        };
        assert!(run(true) == run(false), "{kind:?}");
    }
}
