//! Peak memory of attention forward + backward at SD's largest self-attention (64×64 latents:
//! 4096 tokens, 8 heads, head dim 40).
//!
//! How it is measured: this test binary installs a counting global allocator that tracks live
//! bytes, the peak of live bytes, and the largest single allocation. The test holds its inputs,
//! resets the peak, then runs forward, the loss `Σ out·g` and backward. A naive implementation
//! allocates the 4096×4096 score matrix per head (64 MiB each, 512 MiB for 8 heads, more for its
//! backward); the tiled kernel's peak must stay a small multiple of one q-sized tensor (5 MiB)
//! and no single allocation may reach even 1/8 of one head's score matrix. The file holds one
//! test so no other test's allocations are counted.

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use common::Rng;
use counting_alloc::Counting;

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn attention_4096_tokens_peak_memory_is_linear() {
    let (b, h, n, d) = (1usize, 8usize, 4096usize, 40usize);
    let mut r = Rng::new(41);
    let q = candle_core::Var::from_tensor(&r.randn(&[b, h, n, d])).unwrap();
    let k = candle_core::Var::from_tensor(&r.randn(&[b, h, n, d])).unwrap();
    let v = candle_core::Var::from_tensor(&r.randn(&[b, h, n, d])).unwrap();
    let g = r.randn(&[b, h, n, d]);
    let qsize = b * h * n * d * 4;
    let base = counting_alloc::start();

    let out = sdbooth_ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), false).unwrap();
    let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let (peak, largest) = counting_alloc::peak_and_largest(base);
    for t in [&q, &k, &v] {
        assert_eq!(grads.get(t.as_tensor()).unwrap().dims(), &[b, h, n, d]);
    }
    let head_scores = n * n * 4;
    eprintln!(
        "attention {n} tokens × {h} heads × d {d}: peak extra {:.1} MiB ({:.1}× q), largest allocation \
         {:.1} MiB; one head's scores would be {:.0} MiB",
        peak as f64 / 1048576.0,
        peak as f64 / qsize as f64,
        largest as f64 / 1048576.0,
        head_scores as f64 / 1048576.0
    );
    assert!(largest <= qsize, "largest allocation {largest} B exceeds one q-sized tensor ({qsize} B)");
    assert!(largest < head_scores / 8);
    assert!(peak <= 16 * qsize, "peak {peak} B is not O(N·d) (q is {qsize} B)");
}
