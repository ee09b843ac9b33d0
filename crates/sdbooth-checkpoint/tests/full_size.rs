//! Full-size round trips (random weights, ~4 GB per SD1.5 file, ~5 GB for SD2.1): ignored by
//! default. Run with
//!
//!     SDBOOTH_FULL_DIR=/big/tmp cargo test -p sdbooth-checkpoint --test full_size -- --ignored --nocapture
//!
//! Needs ~6 GB of RAM and ~25 GB of disk at SDBOOTH_FULL_DIR (default: the system temp dir).

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use std::time::UNIX_EPOCH;

use sdbooth_checkpoint::{
    load_model, modelspec_metadata, save_model, LoadOptions, SaveFormat, SaveOptions, TensorIndex,
};

/// Every key of `a` is in `b` with the same dtype, shape and bytes; compared one tensor at a time.
fn assert_files_agree(a: &Path, b: &Path, allow_extra_in_b: bool) {
    let (ia, ib) = (TensorIndex::open(a).unwrap(), TensorIndex::open(b).unwrap());
    if !allow_extra_in_b {
        assert_eq!(ia.entries.len(), ib.entries.len(), "{} vs {}", a.display(), b.display());
    }
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let read = |f: &mut File, off: u64, n: u64| {
        let mut v = vec![0u8; n as usize];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut v).unwrap();
        v
    };
    for ea in &ia.entries {
        let eb = ib.get(&ea.key).unwrap_or_else(|| panic!("{} lacks {}", b.display(), ea.key));
        assert_eq!((ea.dtype, &ea.shape), (eb.dtype, &eb.shape), "{}", ea.key);
        assert!(
            read(&mut fa, ea.offset, ea.nbytes) == read(&mut fb, eb.offset, eb.nbytes),
            "{} differs",
            ea.key
        );
    }
}

#[test]
#[ignore = "full-size models: several GB of RAM and disk"]
fn full_size_round_trips() {
    let root = std::env::var_os("SDBOOTH_FULL_DIR").map(Into::into).unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(root).unwrap();
    let names: Vec<String> = std::env::var("SDBOOTH_FULL_MODELS")
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_else(|_| vec!["sd15-random".into(), "sd21-random".into()]);
    for name in names.iter().map(String::as_str) {
        let p = |s: &str| dir.path().join(format!("{name}{s}"));
        {
            let m = load_model(&format!("builtin:{name}"), &LoadOptions::default()).unwrap();
            let mut o = SaveOptions::new(SaveFormat::Safetensors);
            o.v_parameterization = m.v_parameterization;
            // modelspec.prediction_type is what tells a 768-v single file from a 512-ε one.
            o.metadata = modelspec_metadata(&m.config, m.v_parameterization, &Default::default(), UNIX_EPOCH);
            save_model(&p(".safetensors"), &m.parts(), &m.config, &o).unwrap();
        }
        // single file → internal → single file / ckpt / Diffusers → single file.
        let m = load_model(p(".safetensors").to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert_eq!(m.v_parameterization, name == "sd21-random", "prediction type lost");
        for (fmt, out) in [(SaveFormat::Safetensors, "-2.safetensors"), (SaveFormat::Ckpt, ".ckpt")] {
            let mut o = SaveOptions::new(fmt);
            o.source = Some(&m.source);
            save_model(&p(out), &m.parts(), &m.config, &o).unwrap();
            assert_files_agree(&p(".safetensors"), &p(out), false);
            std::fs::remove_file(p(out)).unwrap();
        }
        let mut o = SaveOptions::new(SaveFormat::DiffusersSafetensors);
        o.v_parameterization = m.v_parameterization;
        save_model(&p("-diffusers"), &m.parts(), &m.config, &o).unwrap();
        drop(m);
        let d = load_model(p("-diffusers").to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert_eq!(d.config.name, if name == "sd15-random" { "sd1" } else { "sd2-768-v" });
        let o = SaveOptions::new(SaveFormat::Safetensors);
        save_model(&p("-back.safetensors"), &d.parts(), &d.config, &o).unwrap();
        drop(d);
        assert_files_agree(&p(".safetensors"), &p("-back.safetensors"), false);
        std::fs::remove_dir_all(p("-diffusers")).unwrap();
        eprintln!("{name}: single file, ckpt and Diffusers round trips bit-identical");
    }
}
