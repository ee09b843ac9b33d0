//! The bf16 attention with each head's operands packed once ([`Packing::PerHead`], what runs
//! under the AVX512_BF16 kernel) gives the same bits as with every tile product packing its own
//! operands ([`Packing::PerProduct`]): forward output and log-sum-exp, and every gradient, at
//! shapes whose token counts are not multiples of the query (64) or key (256) tiles, odd head
//! widths (bf16 pairs padded along k), `dv ≠ d`, causal or not, and with some gradients
//! unwanted.

use super::cpu::{backward, forward, BackwardInputs, Packing};
use super::{Dims, Want};
use crate::bf16_gemm::Panels;
use crate::cpu::Precision;
use crate::selftest::SplitMix;

/// (batch·heads, query tokens, key tokens, head width, value width, causal)
const CASES: [(usize, usize, usize, usize, usize, bool); 7] = [
    (2, 131, 300, 7, 5, false),
    (1, 65, 513, 9, 33, false),
    (1, 300, 77, 40, 40, false),
    (1, 270, 270, 16, 24, true),
    (2, 77, 77, 64, 64, true),
    (1, 129, 129, 33, 31, true),
    (1, 5, 3, 3, 2, false),
];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn packing_per_head_gives_the_bits_of_packing_per_product() {
    if !Panels::supported() {
        println!("skipped: the active bf16 kernel reads no packed panels");
        return;
    }
    let mut rng = SplitMix::new(4242);
    for (bh, n, m, d, dv, causal) in CASES {
        let dm = Dims { bh, n, m, d, dv };
        let scale = 1.0 / (d as f32).sqrt();
        // Scaled so the softmax is far from uniform.
        let mut randn =
            |len: usize, s: f32| rng.normal_vec(len).into_iter().map(|x| x * s).collect::<Vec<_>>();
        let (q, k, v) = (randn(bh * n * d, 2.0), randn(bh * m * d, 2.0), randn(bh * m * dv, 1.0));
        let go = randn(bh * n * dv, 1.0);
        let run_forward = |packing| forward(&q, &k, &v, &dm, scale, causal, Precision::Bf16, packing);
        let (o, lse) = run_forward(Packing::PerProduct);
        let (o_head, lse_head) = run_forward(Packing::PerHead);
        let case = format!("bh {bh} n {n} m {m} d {d} dv {dv} causal {causal}");
        assert!(bits(&o) == bits(&o_head), "{case}: forward output");
        assert!(bits(&lse) == bits(&lse_head), "{case}: log-sum-exp");
        let inputs = BackwardInputs { q: &q, k: &k, v: &v, o: &o, go: &go, lse: &lse };
        let wants = [
            Want { dq: true, dk: true, dv: true },
            Want { dq: true, dk: false, dv: false },
            Want { dq: false, dk: true, dv: true },
        ];
        for want in wants {
            let run_backward =
                |packing| backward(&inputs, &dm, scale, causal, want, Precision::Bf16, packing);
            let (per_product, per_head) = (run_backward(Packing::PerProduct), run_backward(Packing::PerHead));
            let which = format!("{case}, want dq {} dk {} dv {}", want.dq, want.dk, want.dv);
            assert!(bits(&per_product.0) == bits(&per_head.0), "{which}: dq");
            assert!(bits(&per_product.1) == bits(&per_head.1), "{which}: dk");
            assert!(bits(&per_product.2) == bits(&per_head.2), "{which}: dv");
        }
    }
}
