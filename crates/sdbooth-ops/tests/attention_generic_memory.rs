//! Peak memory of the device-generic attention (what CUDA runs) forward + backward at SD's
//! largest self-attention: 64×64 latents, 4096 tokens, 8 heads, head dim 40.
//!
//! Measured like `attention_memory.rs`: a counting global allocator tracks live bytes, their peak
//! and the largest single allocation, on the CPU backend running the production code (candle's
//! CPU ops allocate each result tensor, as its CUDA ops do on the GPU). The full score matrix is
//! 8 × 4096 × 4096 f32 = 512 MiB, and the reference composition keeps ~5 and peaks at ~16 of
//! them. The block loop may hold only a few score tensors of one block of queries: no allocation
//! larger than one block's `[8, rows, 4096]` f32 scores, and a peak of a few of those plus a few
//! q-sized tensors. Run at two block sizes (the default, 512 rows, and 128) so the bound is shown
//! to follow the block, not the token count. One test per file, so no other test's allocations
//! are counted.

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use common::Rng;
use counting_alloc::Counting;
use sdbooth_ops::generic;

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn generic_attention_4096_tokens_holds_one_query_block_of_scores() {
    let (b, h, n, d) = (1usize, 8usize, 4096usize, 40usize);
    let mut r = Rng::new(42);
    let q = candle_core::Var::from_tensor(&r.randn(&[b, h, n, d])).unwrap();
    let k = candle_core::Var::from_tensor(&r.randn(&[b, h, n, d])).unwrap();
    let v = candle_core::Var::from_tensor(&r.randn(&[b, h, n, d])).unwrap();
    let g = r.randn(&[b, h, n, d]);
    let qsize = b * h * n * d * 4;
    let full_scores = b * h * n * n * 4;
    let default_rows = generic::block_rows(b * h, n);
    assert_eq!(default_rows, 512);
    for rows in [default_rows, 128] {
        let base = counting_alloc::start();

        let out =
            generic::attention_in_blocks(q.as_tensor(), k.as_tensor(), v.as_tensor(), false, rows).unwrap();
        let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (peak, largest) = counting_alloc::peak_and_largest(base);
        for t in [&q, &k, &v] {
            assert_eq!(grads.get(t.as_tensor()).unwrap().dims(), &[b, h, n, d]);
        }
        let block_scores = b * h * rows * n * 4;
        eprintln!(
            "generic attention {n} tokens × {h} heads × d {d}, {rows}-row blocks: peak extra {:.1} MiB \
             ({:.2}× one block's scores), largest allocation {:.1} MiB; one block's scores {:.0} MiB, \
             the full score matrix {:.0} MiB",
            peak as f64 / 1048576.0,
            peak as f64 / block_scores as f64,
            largest as f64 / 1048576.0,
            block_scores as f64 / 1048576.0,
            full_scores as f64 / 1048576.0,
        );
        assert!(largest <= block_scores, "{rows} rows: allocation of {largest} B exceeds one block's scores");
        assert!(
            peak <= 4 * block_scores + 16 * qsize,
            "{rows} rows: peak {peak} B is more than 4 blocks of scores ({block_scores} B) + 16 q ({qsize} B)"
        );
        assert!(peak < full_scores, "{rows} rows: peak {peak} B reaches the full score matrix");
    }
}
