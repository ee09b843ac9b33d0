//! The nearest-2x upsampling kernels and the embedding table gradient against candle's own
//! arithmetic, bit for bit: what the CPU computed before they existed (candle's
//! `upsample_nearest2d` with its conv-based backward; `zeros` + `index_add`); the f32 linear
//! forward with few rows against the GEMM it replaced.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::Rng;
use sdbooth_ops as ops;

/// Normal samples with zeros of both signs, tiny, huge and infinite values mixed in.
fn values(r: &mut Rng, shape: &[usize]) -> Tensor {
    let special = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 3.0e38, f32::INFINITY, -7.5];
    let n = shape.iter().product();
    let mut v = r.normal_vec(n);
    for (i, x) in v.iter_mut().enumerate().step_by(13) {
        *x = special[(i / 13) % special.len()];
    }
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn upsample_is_bit_identical_to_candles_op() {
    let mut r = Rng::new(71);
    // Output rows (2 * B * C * H) span several kernel tasks; odd widths; one plane of 1x1.
    for shape in [[2, 3, 40, 7], [1, 5, 3, 33], [1, 1, 1, 1]] {
        let x = values(&mut r, &shape);
        let (h, w) = (shape[2], shape[3]);
        let g = values(&mut r, &[shape[0], shape[1], 2 * h, 2 * w]);
        let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let var = Var::from_tensor(&x).unwrap();
            let y = f(var.as_tensor()).unwrap();
            let grads = ops::backward_from(&y, &g).unwrap();
            (bits(&y), bits(grads.get(var.as_tensor()).unwrap()))
        };
        let ours = run(&|t| ops::upsample_nearest2x(t));
        let candle = run(&|t| t.upsample_nearest2d(2 * h, 2 * w));
        assert!(ours.0 == candle.0, "{shape:?}: forward differs from candle's");
        assert!(ours.1 == candle.1, "{shape:?}: gradient differs from candle's");
    }
}

#[test]
fn upsample_keeps_half_precision_dtypes() {
    let x =
        Tensor::new(&[[[[1.5f32, -2.0], [0.25, 4.0]]]], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let y = ops::upsample_nearest2x(&x).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    assert_eq!(y.dims(), [1, 1, 4, 4]);
    let row: Vec<f32> = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&row[..4], &[1.5, 1.5, -2.0, -2.0]);
}

#[test]
fn embedding_table_grad_is_bit_identical_to_index_add() {
    let mut r = Rng::new(72);
    let (vocab, dim) = (70_000, 12);
    // Repeated ids (summed in order), the first and last rows.
    let ids = [5u32, 69_999, 5, 0, 12, 5, 12, 40_000];
    let ids = Tensor::new(&ids[..], &Device::Cpu).unwrap();
    let g = values(&mut r, &[8, dim]);
    let ours = ops::embedding_table_grad(&ids, &g, vocab).unwrap();
    let candle =
        Tensor::zeros((vocab, dim), DType::F32, &Device::Cpu).unwrap().index_add(&ids, &g, 0).unwrap();
    assert_eq!(ours.dims(), [vocab, dim]);
    assert!(bits(&ours) == bits(&candle), "table gradient differs from zeros + index_add");
}

#[test]
fn embedding_table_grad_refuses_bad_ids() {
    let g = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[1u32, 9], &Device::Cpu).unwrap();
    let err = ops::embedding_table_grad(&ids, &g, 9).unwrap_err().to_string();
    assert!(err.contains("id 9 is outside the table of 9 rows"), "{err}");
    let err = ops::embedding_table_grad(&Tensor::new(&[1u32], &Device::Cpu).unwrap(), &g, 9).unwrap_err();
    assert!(err.to_string().contains("expected [2]"), "{err}");
}

/// The f32 linear forward with few rows computes `yᵀ = w · xᵀ`: the same bits as the GEMM of
/// `y = x · wᵀ` started from the bias rows, on 1 and 3 threads.
#[test]
fn linear_with_few_rows_matches_the_untransposed_gemm() {
    use ops::kernels::{f32_gemm, Mat};
    let mut r = Rng::new(73);
    for (m, k, n) in
        [(77, 768, 3072), (77, 1100, 200), (16, 1280, 1280), (2, 40, 300), (128, 20, 17), (129, 64, 96)]
    {
        let (x, w, b) = (r.normal_vec(m * k), r.normal_vec(n * k), r.normal_vec(n));
        let mut want = b.repeat(m);
        f32_gemm(m, n, k, &mut want, n, true, Mat::rows(&x, k), Mat::transposed(&w, k));
        let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        let x = Tensor::from_vec(x, (1, m, k), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(b, n, &Device::Cpu).unwrap();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let got = pool.install(|| bits(&ops::linear(&x, &w, Some(&b)).unwrap()));
            assert!(got == want, "m={m} k={k} n={n}, {threads} threads: differs from x · wᵀ");
        }
    }
}
