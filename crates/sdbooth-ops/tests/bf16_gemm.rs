//! The bf16 GEMM (bf16 operands, f32 sums), every kernel this CPU has: the AVX512_BF16 one where
//! present and always the f32 fallback, so CI on any CPU tests the fallback.
//!
//! Stated bounds, per output element `c = Σ_k a_k·b_k` with `S = Σ_k |a_k·b_k|`:
//! * vs the f64 sum of the same bf16 inputs: `|c − ref| ≤ k·2⁻²³·S` (f32 accumulation; each of
//!   the k additions rounds by at most 2⁻²⁴ relative to a partial sum ≤ S, doubled for margin).
//! * vs the f32 GEMM on the unrounded f32 inputs: `|c − ref| ≤ 2⁻⁷·S + k·2⁻²³·S` (bf16 keeps 8
//!   significant bits, so rounding an input moves it by at most 2⁻⁸ relative, a product by at
//!   most ≈ 2·2⁻⁸).

use half::bf16;
use sdbooth_ops::kernels::{bf16_gemm, f32_gemm, Mat};
use sdbooth_ops::Bf16Kernel;

mod common;
use common::Rng;

fn kernels() -> Vec<Bf16Kernel> {
    let all = [Bf16Kernel::Avx512Bf16, Bf16Kernel::F32Fallback];
    let have: Vec<_> = all.into_iter().filter(|k| k.available()).collect();
    println!("bf16 kernels on this CPU: {:?}", have.iter().map(|k| k.name()).collect::<Vec<_>>());
    have
}

/// One GEMM case: `m×k · k×n`, each operand stored row-major or transposed.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    a_transposed: bool,
    b_transposed: bool,
}

/// Row-major storage of an `r×c` matrix (or its transpose) and its strided view.
fn view<T>(data: &[T], r: usize, c: usize, transposed: bool) -> Mat<'_, T> {
    if transposed {
        Mat::transposed(data, r)
    } else {
        Mat::rows(data, c)
    }
}

fn at<T: Copy>(m: &Mat<'_, T>, i: usize, j: usize) -> T {
    m.data[i * m.rs + j * m.cs]
}

struct Operands {
    a32: Vec<f32>,
    b32: Vec<f32>,
    a16: Vec<bf16>,
    b16: Vec<bf16>,
}

fn operands(c: Case, seed: u64) -> Operands {
    let mut r = Rng::new(seed);
    let a32 = r.normal_vec(c.m * c.k);
    let b32 = r.normal_vec(c.k * c.n);
    let a16 = a32.iter().map(|&v| bf16::from_f32(v)).collect();
    let b16 = b32.iter().map(|&v| bf16::from_f32(v)).collect();
    Operands { a32, b32, a16, b16 }
}

/// `(Σ a·b, Σ |a·b|)` in f64 for element (i, j).
fn reference<T: Copy + Into<f64>>(
    a: &Mat<'_, T>,
    b: &Mat<'_, T>,
    k: usize,
    i: usize,
    j: usize,
) -> (f64, f64) {
    (0..k).fold((0.0, 0.0), |(s, abs), q| {
        let p = at(a, i, q).into() * at(b, q, j).into();
        (s + p, abs + p.abs())
    })
}

/// Runs `kernel` on the case (with a destination row stride wider than n, and with `accumulate`
/// onto a known start) and checks both stated bounds.
fn check(kernel: Bf16Kernel, c: Case, accumulate: bool) {
    let ops = operands(c, (c.m * 1000 + c.n * 10 + c.k) as u64);
    let (a, b) = (view(&ops.a16, c.m, c.k, c.a_transposed), view(&ops.b16, c.k, c.n, c.b_transposed));
    let (a32, b32) = (view(&ops.a32, c.m, c.k, c.a_transposed), view(&ops.b32, c.k, c.n, c.b_transposed));
    let rs = c.n + 3;
    let start = |i: usize, j: usize| if accumulate { (i as f32) * 0.5 - j as f32 } else { 0.0 };
    let mut dst: Vec<f32> = (0..c.m * rs).map(|x| start(x / rs, x % rs)).collect();
    bf16_gemm(kernel, c.m, c.n, c.k, &mut dst, rs, accumulate, a, b);
    let mut dst32: Vec<f32> = (0..c.m * rs).map(|x| start(x / rs, x % rs)).collect();
    f32_gemm(c.m, c.n, c.k, &mut dst32, rs, accumulate, a32, b32);
    let a64 = Mat { data: &ops.a16.iter().map(|v| v.to_f64()).collect::<Vec<_>>()[..], rs: a.rs, cs: a.cs };
    let b64 = Mat { data: &ops.b16.iter().map(|v| v.to_f64()).collect::<Vec<_>>()[..], rs: b.rs, cs: b.cs };
    let sum_bound = c.k as f64 * 2f64.powi(-23);
    let (mut worst_exact, mut worst_f32) = (0f64, 0f64);
    for i in 0..c.m {
        for j in 0..c.n {
            let (exact, abs) = reference(&a64, &b64, c.k, i, j);
            let want = exact + start(i, j) as f64;
            let got = dst[i * rs + j] as f64;
            let tol = sum_bound * (abs + (start(i, j) as f64).abs()) + 1e-30;
            assert!(
                (got - want).abs() <= tol,
                "{kernel:?} {c:?} ({i},{j}): {got} vs f64 {want}, tol {tol:e}"
            );
            worst_exact = worst_exact.max((got - want).abs() / tol);
            let f32_path = dst32[i * rs + j] as f64;
            let tol32 = 2f64.powi(-7) * abs + tol;
            assert!((got - f32_path).abs() <= tol32, "{kernel:?} {c:?} ({i},{j}): {got} vs f32 {f32_path}");
            worst_f32 = worst_f32.max((got - f32_path).abs() / tol32);
        }
        // Padding columns of the destination are never written.
        for j in c.n..rs {
            assert_eq!(dst[i * rs + j], start(i, j), "{kernel:?} {c:?}: wrote past column n at ({i},{j})");
        }
    }
    println!("{kernel:?} {c:?} acc={accumulate}: worst error / bound: vs f64 {worst_exact:.3}, vs f32 {worst_f32:.3}");
}

#[test]
fn bf16_gemm_matches_f64_and_f32_within_stated_bounds() {
    let cases = [
        // Edges of every blocking: rows and columns not multiples of 12/32/96/128, odd k,
        // k over one block (128 pairs), tiny and degenerate shapes.
        Case { m: 1, n: 1, k: 1, a_transposed: false, b_transposed: false },
        Case { m: 13, n: 33, k: 7, a_transposed: false, b_transposed: false },
        Case { m: 100, n: 130, k: 257, a_transposed: false, b_transposed: true },
        Case { m: 77, n: 64, k: 300, a_transposed: true, b_transposed: false },
        Case { m: 200, n: 40, k: 1000, a_transposed: true, b_transposed: true },
        Case { m: 24, n: 300, k: 2, a_transposed: false, b_transposed: false },
        // A last column panel of 17..31 columns (the 32-wide kernel, masked) and of exactly 16
        // (the 16-wide kernel), each over several k blocks (sums resumed from the destination).
        Case { m: 30, n: 50, k: 520, a_transposed: false, b_transposed: false },
        Case { m: 40, n: 16, k: 600, a_transposed: true, b_transposed: false },
        // More than one group of 16 panels packed from interleaved rows (rhs: 19 panels, the
        // last partial; lhs: 17), an odd k (the last pair padded) across several row blocks.
        Case { m: 200, n: 600, k: 45, a_transposed: true, b_transposed: false },
    ];
    for kernel in kernels() {
        for c in cases {
            for accumulate in [false, true] {
                check(kernel, c, accumulate);
            }
        }
    }
}

#[test]
fn k_zero_writes_zeros_or_leaves_the_destination() {
    for kernel in kernels() {
        let (a, b): (Vec<bf16>, Vec<bf16>) = (vec![], vec![]);
        let mut dst = vec![5f32; 6];
        bf16_gemm(kernel, 2, 3, 0, &mut dst, 3, true, Mat::rows(&a, 0), Mat::rows(&b, 3));
        assert_eq!(dst, vec![5.0; 6]);
        bf16_gemm(kernel, 2, 3, 0, &mut dst, 3, false, Mat::rows(&a, 0), Mat::rows(&b, 3));
        assert_eq!(dst, vec![0.0; 6]);
    }
}

/// The output tiles are fixed, so the result does not depend on how many threads compute them.
#[test]
fn bf16_gemm_does_not_depend_on_the_thread_count() {
    let c = Case { m: 250, n: 300, k: 600, a_transposed: false, b_transposed: true };
    let ops = operands(c, 7);
    for kernel in kernels() {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut dst = vec![0f32; c.m * c.n];
                let (a, b) = (view(&ops.a16, c.m, c.k, false), view(&ops.b16, c.k, c.n, true));
                bf16_gemm(kernel, c.m, c.n, c.k, &mut dst, c.n, false, a, b);
                dst
            })
        };
        let one = run(1);
        assert_eq!(one, run(3), "{kernel:?}: 1 vs 3 threads");
        assert_eq!(one, run(2), "{kernel:?}: 1 vs 2 threads");
    }
}

/// f32 operands are rounded to bf16 as they are packed (vectorised on AVX512_BF16): the product
/// is bit for bit that of the operands rounded beforehand, in every layout, for shapes that cut
/// the 16-value vectors, the 12-row and 32-column panels and odd k at every edge.
#[test]
fn f32_operands_give_the_products_of_their_bf16_rounding_exactly() {
    for kernel in kernels() {
        for (m, n, k) in
            [(1, 1, 1), (13, 33, 7), (12, 32, 32), (25, 70, 33), (40, 17, 129), (3, 100, 64), (200, 600, 45)]
        {
            for (a_transposed, b_transposed) in [(false, false), (false, true), (true, false), (true, true)] {
                let c = Case { m, n, k, a_transposed, b_transposed };
                let ops = operands(c, (m * 7 + n * 3 + k) as u64);
                let a32 = view(&ops.a32, m, k, a_transposed);
                let b32 = view(&ops.b32, k, n, b_transposed);
                let (a16, b16) = (view(&ops.a16, m, k, a_transposed), view(&ops.b16, k, n, b_transposed));
                let mut want = vec![0f32; m * n];
                bf16_gemm(kernel, m, n, k, &mut want, n, false, a16, b16);
                let mut got = vec![0f32; m * n];
                bf16_gemm(kernel, m, n, k, &mut got, n, false, a32, b32);
                assert_eq!(got, want, "{kernel:?} {c:?}: both operands f32");
                let mut mixed = vec![0f32; m * n];
                bf16_gemm(kernel, m, n, k, &mut mixed, n, false, a16, b32);
                assert_eq!(mixed, want, "{kernel:?} {c:?}: bf16 lhs, f32 rhs");
            }
        }
    }
}

/// Rows and columns of the output come out bit for bit the same whether the product has one
/// tile row or column (the tiles then pack that operand themselves, a k block at a time) or
/// many (it is packed whole first): the packed values and the k order of every sum do not
/// depend on the rest of the output. Every layout, odd k over two k blocks, f32 operands, with
/// and without accumulation, 1 and 3 threads.
#[test]
fn operands_packed_by_the_tiles_give_the_same_bits_as_packed_whole() {
    let (m, n, k) = (300, 400, 333);
    for kernel in kernels() {
        for (a_transposed, b_transposed) in [(false, false), (false, true), (true, false), (true, true)] {
            let c = Case { m, n, k, a_transposed, b_transposed };
            let ops = operands(c, 11);
            let (a, b) = (view(&ops.a32, m, k, a_transposed), view(&ops.b32, k, n, b_transposed));
            for accumulate in [false, true] {
                let start = |len: usize| (0..len).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>();
                let mut whole = start(m * n);
                bf16_gemm(kernel, m, n, k, &mut whole, n, accumulate, a, b);
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    // The first 40 columns (one tile column) and the first 50 rows (one tile row),
                    // written into the whole output's rows.
                    let (mut left, mut top) = (start(m * n), start(m * n));
                    pool.install(|| {
                        bf16_gemm(kernel, m, 40, k, &mut left, n, accumulate, a, b);
                        bf16_gemm(kernel, 50, n, k, &mut top, n, accumulate, a, b);
                    });
                    for i in 0..m {
                        let row = &whole[i * n..][..n];
                        assert_eq!(
                            &left[i * n..][..40],
                            &row[..40],
                            "{kernel:?} {c:?} acc={accumulate}: row {i}"
                        );
                        assert_eq!(&left[i * n + 40..][..n - 40], &start(m * n)[i * n + 40..][..n - 40]);
                    }
                    assert_eq!(top[..50 * n], whole[..50 * n], "{kernel:?} {c:?} acc={accumulate}: top rows");
                    assert_eq!(top[50 * n..], start(m * n)[50 * n..], "{kernel:?} {c:?}: wrote past row 50");
                }
            }
        }
    }
}

/// Every output element comes out bit for bit the same whichever microkernel computes it: the
/// product computed whole (12-row blocks, 32 columns, a last row panel of 5 and columns of 16)
/// and in sub-products of 1, 5 and 7 rows by 8 or 16 columns (the 4- and 8-row kernels, the
/// 8-wide ymm and 16-wide kernels). AVX512_BF16 only: the fallback's f32 GEMM may sum a
/// smaller product in another order.
#[test]
fn every_microkernel_shape_gives_the_same_bits() {
    let kernel = Bf16Kernel::Avx512Bf16;
    if !kernel.available() {
        println!("skipped: no AVX512_BF16");
        return;
    }
    let (m, n, k) = (29, 41, 333);
    for (a_transposed, b_transposed) in [(false, false), (true, true)] {
        let c = Case { m, n, k, a_transposed, b_transposed };
        let ops = operands(c, 29);
        let (a, b) = (view(&ops.a32, m, k, a_transposed), view(&ops.b32, k, n, b_transposed));
        for accumulate in [false, true] {
            let start = || (0..m * n).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>();
            let mut whole = start();
            bf16_gemm(kernel, m, n, k, &mut whole, n, accumulate, a, b);
            for (rows, cols) in [(1, 8), (5, 8), (7, 16), (1, 41)] {
                let mut parts = start();
                for i0 in (0..m).step_by(rows) {
                    for j0 in (0..n).step_by(cols) {
                        let (r, w) = (rows.min(m - i0), cols.min(n - j0));
                        let a_rows = Mat { data: &a.data[i0 * a.rs..], ..a };
                        let b_cols = Mat { data: &b.data[j0 * b.cs..], ..b };
                        bf16_gemm(kernel, r, w, k, &mut parts[i0 * n + j0..], n, accumulate, a_rows, b_cols);
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&parts) == bits(&whole), "{c:?} acc={accumulate}: {rows}x{cols} sub-products");
            }
        }
    }
}
