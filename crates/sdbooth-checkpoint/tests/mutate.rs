//! A cheap in-CI stand-in for the fuzz targets (fuzz/): thousands of seeded random mutations of
//! real files through the safetensors header parser, the pickle machine, and whole-file loading.
//! Any panic fails the test; errors are the expected outcome.

mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sdbooth_checkpoint::{pickle, safetensors_io, LoadOptions};

fn mutate(rng: &mut ChaCha8Rng, src: &[u8], region: usize) -> Vec<u8> {
    let mut v = src.to_vec();
    for _ in 0..rng.gen_range(1..8) {
        let i = rng.gen_range(0..region.min(v.len()));
        v[i] = match rng.gen_range(0..4) {
            0 => rng.gen(),
            1 => v[i].wrapping_add(1),
            2 => b"0123456789[]{},:\"-"[rng.gen_range(0..18)],
            _ => 0xff,
        };
    }
    if rng.gen_bool(0.2) {
        v.truncate(rng.gen_range(0..v.len()));
    }
    v
}

#[test]
fn mutated_safetensors_headers_never_panic() {
    let bytes = std::fs::read(common::fixtures().join("kohya-sd2.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut accepted = 0;
    for _ in 0..1000 {
        let m = mutate(&mut rng, &bytes, header_end);
        if let Ok((entries, _)) = safetensors_io::parse_file_bytes(&m) {
            accepted += 1;
            assert!(entries.iter().all(|e| e.offset + e.nbytes <= m.len() as u64));
        }
    }
    assert!(accepted < 1000, "no mutation was rejected: the parser checks nothing");
}

#[test]
fn mutated_pickles_never_panic() {
    let f = std::fs::File::open(common::fixtures().join("source-sd1.ckpt")).unwrap();
    let mut z = zip::ZipArchive::new(f).unwrap();
    let name = z.file_names().find(|n| n.ends_with("data.pkl")).unwrap().to_string();
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name(&name).unwrap(), &mut pkl).unwrap();
    assert!(pickle::load(&pkl).is_ok());
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..500 {
        let m = mutate(&mut rng, &pkl, pkl.len());
        let _ = pickle::load(&m);
    }
}

#[test]
fn mutated_whole_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for name in ["source-sd1.ckpt", "kohya-sd2.safetensors"] {
        let bytes = std::fs::read(common::fixtures().join(name)).unwrap();
        let p = dir.path().join(name);
        for _ in 0..40 {
            let m = mutate(&mut rng, &bytes, bytes.len());
            std::fs::write(&p, &m).unwrap();
            let _ = sdbooth_checkpoint::load_model(p.to_str().unwrap(), &LoadOptions::default());
            let _ = sdbooth_checkpoint::inspect(p.to_str().unwrap());
        }
    }
}
