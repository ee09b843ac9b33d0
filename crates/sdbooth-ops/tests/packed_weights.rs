//! Kept bf16 weight packings (`PackedWeights`, for gradient checkpointing's recompute): inside a
//! step the forward's packing of a weight is reused, with the same results as packing it again;
//! after the step a weight changed in place (the optimizer's update) is packed anew.

use candle_core::{Tensor, Var};
use sdbooth_ops::{self as ops, Bf16Kernel, PackedWeights, Precision};

mod common;
use common::Rng;

/// `bytes` where the bf16 kernel packs (AVX512_BF16), 0 where the f32 fallback runs (it packs
/// nothing, so nothing is kept).
fn if_packing(bytes: usize) -> usize {
    if ops::bf16_kernel() == Bf16Kernel::Avx512Bf16 {
        bytes
    } else {
        0
    }
}

/// The products of the two forward ops that keep their weight's packing.
fn forwards(x_lin: &Tensor, w_lin: &Tensor, x_conv: &Tensor, w_conv: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let y = ops::linear_with(x_lin, w_lin, None, Precision::Bf16).unwrap();
    let z = ops::conv2d_with(x_conv, w_conv, None, 1, 1, Precision::Bf16).unwrap();
    (y.flatten_all().unwrap().to_vec1().unwrap(), z.flatten_all().unwrap().to_vec1().unwrap())
}

#[test]
fn kept_packings_give_the_same_products_and_follow_weight_updates() {
    let mut r = Rng::new(5);
    let (x_lin, x_conv) = (r.randn(&[2, 7, 40]), r.randn(&[1, 6, 9, 9]));
    let w_lin = Var::from_tensor(&r.randn(&[20, 40])).unwrap();
    let w_conv = Var::from_tensor(&r.randn(&[13, 6, 3, 3])).unwrap();
    let run = || forwards(&x_lin, w_lin.as_tensor(), &x_conv, w_conv.as_tensor());
    let fresh = run();

    let kept = PackedWeights::new();
    {
        let _step = kept.step();
        assert_eq!(run(), fresh, "first use in a step: packed as without keeping");
        let bytes = kept.kept_bytes();
        // linear: 20 outputs in one 32-wide panel × 20 pairs; conv: 13 rows in two 12-row
        // panels × 27 pairs (k = 54); 4 bytes per pair.
        assert_eq!(bytes, if_packing((32 * 20 + 24 * 27) * 4), "both weights' forward packings kept");
        assert_eq!(run(), fresh, "reused packing: same products");
        // The detached view of the same storage (how a no-grad forward passes weights) too.
        let again = forwards(&x_lin, &w_lin.as_tensor().detach(), &x_conv, &w_conv.as_tensor().detach());
        assert_eq!(again, fresh, "detached view: same products");
        assert_eq!(kept.kept_bytes(), bytes, "no second packing of the same weights");
    }
}

#[test]
fn weights_changed_between_steps_are_packed_again() {
    let mut r = Rng::new(6);
    let x = r.randn(&[3, 64]);
    let w = Var::from_tensor(&r.randn(&[48, 64])).unwrap();
    let y = |w: &Tensor| -> Vec<f32> {
        ops::linear_with(&x, w, None, Precision::Bf16).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let kept = PackedWeights::new();
    for step in 0..3 {
        // Without an open step nothing is kept or used: the reference products.
        let want = y(w.as_tensor());
        let packings = kept.step();
        assert_eq!(y(w.as_tensor()), want, "step {step}: first use");
        assert_eq!(y(w.as_tensor()), want, "step {step}: reuse");
        drop(packings);
        // Two 32-wide panels × 32 pairs, the same buffer every step.
        assert_eq!(kept.kept_bytes(), if_packing(64 * 32 * 4), "step {step}: one packing kept");
        // The optimizer's update, in place (same storage, so the same address).
        w.set(&r.randn(&[48, 64])).unwrap();
    }
    drop(kept);
    assert_eq!(PackedWeights::new().kept_bytes(), 0, "dropping the owner frees the packings");
}
