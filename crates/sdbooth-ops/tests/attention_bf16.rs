//! Attention with its products in bf16 (`attention_with(.., Precision::Bf16)`, what
//! `--mixed_precision bf16` runs on the CPU): forward and every gradient against the f64
//! reference on the same f32 inputs, at shapes that cross the kernel's query (64) and key (256)
//! tiles, an odd head width (the bf16 pairs along k padded) and CLIP's causal shape; and the
//! same bits whatever the thread count.
//!
//! Stated bound: norm-relative error ≤ 1e-2 for the output and ≤ 2e-2 for each gradient (bf16
//! keeps 8 significant bits: each rounded operand moves by ≤ 2⁻⁹ relative, and a product of
//! two of them, summed in f32, by ≈ 2⁻⁸ ≈ 4e-3; the gradients go through two such products).
//! The f32 kernel's error on the same cases is ≤ 1e-5, so the bound also shows the products
//! did run in bf16 (the error must exceed 1e-5).

mod common;

use candle_core::{DType, Tensor};
use common::{grads_of, norm_rel, Rng};
use sdbooth_ops::{self as ops, Precision};

/// (name, causal, q, k, v shapes)
type Case = (&'static str, bool, [usize; 4], [usize; 4], [usize; 4]);
const CASES: [Case; 4] = [
    ("self_tiles", false, [1, 2, 300, 40], [1, 2, 300, 40], [1, 2, 300, 40]),
    ("cross_odd_width", false, [1, 2, 70, 7], [1, 2, 77, 7], [1, 2, 77, 5]),
    ("causal_tiles", true, [1, 1, 270, 16], [1, 1, 270, 16], [1, 1, 270, 16]),
    ("clip_causal", true, [1, 2, 77, 64], [1, 2, 77, 64], [1, 2, 77, 64]),
];

fn inputs(r: &mut Rng, c: &Case) -> (Vec<Tensor>, Tensor) {
    // Scaled so the softmax is far from uniform (the statistics matter).
    let ins = [c.2, c.3, c.4].iter().map(|s| (r.randn(s) * 2.0).unwrap()).collect();
    let g = r.randn(&[c.2[0], c.2[1], c.2[2], c.4[3]]);
    (ins, g)
}

fn bf16_attention(causal: bool) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> {
    move |t| ops::attention_with(&t[0], &t[1], &t[2], causal, Precision::Bf16)
}

#[test]
fn bf16_products_match_the_f64_reference_within_the_stated_bound() {
    let mut r = Rng::new(1207);
    for case in &CASES {
        let (name, causal) = (case.0, case.1);
        let (ins, g) = inputs(&mut r, case);
        let f64s: Vec<Tensor> = ins.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
        let reference = |t: &[Tensor]| ops::reference::attention(&t[0], &t[1], &t[2], causal);
        let (out_ref, grads_ref) = grads_of(reference, &f64s, &g.to_dtype(DType::F64).unwrap());
        let (out, grads) = grads_of(bf16_attention(causal), &ins, &g);
        assert_eq!(out.dtype(), DType::F32, "{name}: f32 inputs give an f32 output");
        let e = norm_rel(&out, &out_ref);
        println!("{name}: output error {e:.2e}");
        assert!(e <= 1e-2 && e > 1e-5, "{name}: output error {e:.2e} (bf16 products: 1e-5 < e <= 1e-2)");
        for (i, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
            assert_eq!(a.dtype(), DType::F32, "{name}: gradient {i} dtype");
            let e = norm_rel(a, b);
            println!("{name}: gradient {i} error {e:.2e}");
            assert!(e <= 2e-2 && e > 1e-5, "{name}: gradient {i} error {e:.2e} (1e-5 < e <= 2e-2)");
        }
        // The f32 products on the same inputs (the default precision) stay at f32 accuracy.
        let f32_attention = |t: &[Tensor]| ops::attention(&t[0], &t[1], &t[2], causal);
        let (out, _) = grads_of(f32_attention, &ins, &g);
        assert!(norm_rel(&out, &out_ref) <= 1e-5, "{name}: f32 attention output");
    }
}

#[test]
fn bf16_attention_is_bit_identical_across_thread_counts() {
    let mut r = Rng::new(88);
    for case in &CASES {
        let (ins, g) = inputs(&mut r, case);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (out, grads) = grads_of(bf16_attention(case.1), &ins, &g);
                let bits = |t: &Tensor| {
                    t.flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>()
                };
                std::iter::once(&out).chain(&grads).map(bits).collect::<Vec<_>>()
            })
        };
        assert!(run(1) == run(3), "{}: bf16 attention differs between 1 and 3 threads", case.0);
    }
}
