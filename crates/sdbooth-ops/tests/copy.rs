//! `ops::contiguous`: the parallel strided copy gives candle's `contiguous()` exactly, for every
//! kind of view the models copy (transposes, permutations, narrowed offsets, a strided last
//! dimension), in every float dtype, whatever the thread count; its gradient is the identity.

mod common;

use candle_core::{DType, Tensor};
use common::{check_grads, Rng};
use sdbooth_ops as ops;

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

type View = fn(&Tensor) -> candle_core::Result<Tensor>;

#[test]
fn copies_every_view_like_candle() {
    let mut r = Rng::new(71);
    // [2, 300, 8, 40]: 192 000 elements, several copy chunks.
    let x = r.randn(&[2, 300, 8, 40]);
    let views: [(&str, View); 5] = [
        ("transpose(1, 2)", |t| t.transpose(1, 2)),
        ("permute(0, 2, 3, 1)", |t| t.permute((0, 2, 3, 1))),
        ("narrow + transpose", |t| t.narrow(1, 7, 250)?.transpose(1, 2)),
        ("last dim strided", |t| t.transpose(2, 3)),
        ("wide rows", |t| t.reshape((2, 300, 320))?.narrow(2, 3, 300)?.transpose(0, 1)),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let x = x.to_dtype(dtype).unwrap();
        for (name, view) in views {
            let v = view(&x).unwrap();
            assert!(!v.is_contiguous(), "{name}: the test view should be strided");
            let want = v.contiguous().unwrap();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let got = pool.install(|| ops::contiguous(&v).unwrap());
                assert!(got.is_contiguous(), "{name}");
                assert_eq!(got.dims(), want.dims(), "{name}");
                assert!(bits(&got) == bits(&want), "{name} {dtype:?} {threads} threads: values differ");
            }
        }
    }
}

#[test]
fn fd_contiguous() {
    let mut r = Rng::new(72);
    check_grads(
        "contiguous",
        |t| ops::contiguous(&t[0].permute((0, 2, 3, 1))?)?.sqr(),
        &[r.randn(&[2, 3, 4, 5])],
        1e-2,
        5e-3,
    );
}
