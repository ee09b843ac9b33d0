//! The f32 GEMM's hand split of products whose left operand `gemm` would pack serially
//! (linear forwards `x · wᵀ`, pointwise conv weight gradients): the same bits as one unsplit
//! `gemm` call, with 1 and 3 threads, for row counts that leave remainders, and accumulating.

use sdbooth_ops::kernels::{f32_gemm, Mat};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0) * 1.37).collect()
}

/// `dst = (accumulate ? dst : 0) + a · b` by one `gemm` call on the calling thread.
fn unsplit(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, a: Mat<'_>, b: Mat<'_>) {
    // SAFETY: dst is m × n row-major, a is m × k and b is k × n as their strides say (the
    // test builds them so).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[test]
fn split_products_equal_one_gemm_call_bit_for_bit() {
    // (rows of x, out features, in features): linear forward shapes `y = x · wᵀ` with 128..1024
    // outputs (the split range), remainders of 1, 13 and 63 rows, long and short k.
    let shapes =
        [(256, 320, 320), (129, 640, 1280), (300, 200, 700), (77, 1000, 96), (1024, 191, 3), (65, 128, 2560)];
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for &(m, n, k) in &shapes {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            for accumulate in [false, true] {
                let start = values(m * n, 3);
                let (mut got, mut want) = (start.clone(), start);
                pool.install(|| {
                    f32_gemm(m, n, k, &mut got, n, accumulate, Mat::rows(&x, k), Mat::transposed(&w, k))
                });
                unsplit(m, n, k, &mut want, accumulate, Mat::rows(&x, k), Mat::transposed(&w, k));
                let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{m}x{n}x{k}, accumulate {accumulate}, {threads} threads: bits differ");
            }
        }
    }
}
