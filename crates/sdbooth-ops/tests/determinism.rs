//! Results must not depend on the thread count: checkpointed and resumed training runs are
//! compared bit for bit. Every custom kernel's forward and backward is run in a 1-thread and a
//! 3-thread rayon pool (gemm's parallel split follows the pool it runs in) and compared exactly.

mod common;

use candle_core::{DType, Tensor};
use common::{grads_of, Rng};
use sdbooth_ops as ops;

type Case = (&'static str, Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + Sync>, Vec<Tensor>);

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn kernels_are_bit_identical_across_thread_counts() {
    let mut r = Rng::new(21);
    let cases: Vec<Case> = vec![
        (
            "conv3x3",
            Box::new(|t| ops::conv2d(&t[0], &t[1], None, 1, 1)),
            vec![r.randn(&[2, 32, 12, 12]), r.randn(&[48, 32, 3, 3])],
        ),
        (
            "conv3x3_s2",
            Box::new(|t| ops::conv2d(&t[0], &t[1], None, 2, 1)),
            vec![r.randn(&[1, 24, 16, 16]), r.randn(&[24, 24, 3, 3])],
        ),
        (
            "linear_bias",
            Box::new(|t| ops::linear(&t[0], &t[1], Some(&t[2]))),
            vec![r.randn(&[2, 150, 64]), r.randn(&[96, 64]), r.randn(&[96])],
        ),
        (
            "conv3x3_bias",
            Box::new(|t| ops::conv2d(&t[0], &t[1], Some(&t[2]), 1, 1)),
            vec![r.randn(&[2, 16, 20, 20]), r.randn(&[24, 16, 3, 3]), r.randn(&[24])],
        ),
        (
            "attention",
            Box::new(|t| ops::attention(&t[0], &t[1], &t[2], true)),
            vec![r.randn(&[1, 4, 160, 16]), r.randn(&[1, 4, 160, 16]), r.randn(&[1, 4, 160, 16])],
        ),
        (
            "group_norm_silu",
            Box::new(|t| ops::group_norm_silu(&t[0], 8, &t[1], &t[2], 1e-5)),
            vec![r.randn(&[2, 32, 9, 9]), r.randn(&[32]), r.randn(&[32])],
        ),
        (
            "layer_norm",
            Box::new(|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            vec![r.randn(&[3, 77, 24]), r.randn(&[24]), r.randn(&[24])],
        ),
        ("upsample", Box::new(|t| ops::upsample_nearest2x(&t[0])), vec![r.randn(&[2, 3, 40, 7])]),
        ("geglu", Box::new(|t| ops::geglu(&t[0])), vec![r.randn(&[2, 150, 2 * 96])]),
        ("gelu_erf", Box::new(|t| ops::gelu_erf(&t[0])), vec![r.randn(&[3, 70, 130])]),
        ("quick_gelu", Box::new(|t| ops::quick_gelu(&t[0])), vec![r.randn(&[2, 77, 300])]),
    ];
    for (name, f, ins) in &cases {
        let g = r.randn(f(ins).unwrap().dims());
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (out, grads) = grads_of(f, ins, &g);
                (bits(&out), grads.iter().map(bits).collect::<Vec<_>>())
            })
        };
        let (a, b) = (run(1), run(3));
        assert!(a.0 == b.0, "{name}: forward differs between 1 and 3 threads");
        for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
            assert!(x == y, "{name}: gradient {i} differs between 1 and 3 threads");
        }
    }
}
