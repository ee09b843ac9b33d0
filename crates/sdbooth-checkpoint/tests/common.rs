//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use sdbooth_checkpoint::dtype::write_tensor_data;
use sdbooth_checkpoint::{Dtype, TensorIndex, TensorMap};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn bytes(t: &Tensor) -> Vec<u8> {
    let mut v = Vec::new();
    write_tensor_data(&mut v, t, Dtype::from_candle(t.dtype()).unwrap()).unwrap();
    v
}

/// Same names, dtypes, shapes and bits.
pub fn assert_same(a: &TensorMap, b: &TensorMap, what: &str) {
    let ka: Vec<&String> = a.keys().collect();
    let kb: Vec<&String> = b.keys().collect();
    assert_eq!(ka, kb, "{what}: key sets differ");
    for (k, ta) in a {
        let tb = &b[k];
        assert_eq!(ta.dtype(), tb.dtype(), "{what}: {k} dtype");
        assert_eq!(ta.dims(), tb.dims(), "{what}: {k} shape");
        assert!(bytes(ta) == bytes(tb), "{what}: {k} differs");
    }
}

/// Every tensor of a single file as (dtype, shape, raw bytes).
pub fn raw_tensors(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let ix = TensorIndex::open(path).unwrap();
    let mut f = File::open(path).unwrap();
    ix.entries
        .iter()
        .map(|e| {
            let mut buf = vec![0u8; e.nbytes as usize];
            f.seek(SeekFrom::Start(e.offset)).unwrap();
            f.read_exact(&mut buf).unwrap();
            (e.key.clone(), (e.dtype, e.shape.clone(), buf))
        })
        .collect()
}
