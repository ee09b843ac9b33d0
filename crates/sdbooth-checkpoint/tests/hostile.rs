//! Bad, truncated, lying and malicious files give clear errors, never a panic, and never run code.

mod common;

use std::io::Write;

use common::fixtures;
use sdbooth_checkpoint::{inspect, load_model, CheckpointError, LoadOptions};

fn load_err(path: &std::path::Path) -> CheckpointError {
    load_model(path.to_str().unwrap(), &LoadOptions::default()).unwrap_err()
}

fn zip_with(path: &std::path::Path, files: &[(&str, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in files {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn malicious_ckpt_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let payload = format!("cos\nsystem\n(S'touch {}'\ntR.", marker.display());
    let evil = dir.path().join("evil.ckpt");
    zip_with(&evil, &[("archive/data.pkl", payload.as_bytes()), ("archive/version", b"3\n")]);
    let e = load_err(&evil);
    assert!(matches!(e, CheckpointError::UnsafePickle { ref global, .. } if global == "os.system"), "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(inspect(evil.to_str().unwrap()).is_err());
    assert!(!marker.exists(), "the pickle's command ran");
    // Hidden inside a state dict, after legitimate-looking data: still refused.
    let mut p = b"\x80\x02}q\x00(X\x0a\x00\x00\x00state_dictq\x01".to_vec();
    p.extend_from_slice(b"cbuiltins\nexec\n(X\x05\x00\x00\x00printtR");
    p.extend_from_slice(b"u.");
    let evil2 = dir.path().join("evil2.ckpt");
    zip_with(&evil2, &[("archive/data.pkl", &p)]);
    assert!(
        matches!(load_err(&evil2), CheckpointError::UnsafePickle { ref global, .. } if global == "builtins.exec")
    );
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("kohya-sd1.safetensors")).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join("cut.safetensors");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = load_err(&p);
        assert!(matches!(e, CheckpointError::BadSafetensors { .. }), "cut {cut}: {e}");
        assert!(e.to_string().contains("cut.safetensors"), "error does not name the file: {e}");
    }
}

#[test]
fn lying_header_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 4] = [
        (r#"{"a":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#, "truncated"),
        (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, "needs 8"),
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
            "overlap",
        ),
        (r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}"#, "unknown dtype"),
    ];
    for (json, want) in cases {
        let p = dir.path().join("lie.safetensors");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        f.write_all(json.as_bytes()).unwrap();
        f.write_all(&[0u8; 16]).unwrap();
        drop(f);
        let e = load_err(&p);
        assert!(e.to_string().contains(want), "{json}: {e}");
    }
    // Header length larger than the file.
    let p = dir.path().join("len.safetensors");
    std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
    assert!(load_err(&p).to_string().contains("impossible"));
}

#[test]
fn non_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A valid safetensors file that is not a model.
    let p = dir.path().join("lora.safetensors");
    let json = r#"{"lora_unet_down.alpha":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(&[0u8; 4]);
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(&p);
    assert!(matches!(e, CheckpointError::NotAModel { .. }), "{e}");
    assert!(inspect(p.to_str().unwrap()).is_err());
    // Text with a model extension.
    let p = dir.path().join("readme.ckpt");
    std::fs::write(&p, "just some text").unwrap();
    assert!(matches!(load_err(&p), CheckpointError::BadCkpt { .. }));
    let p = dir.path().join("readme.safetensors");
    std::fs::write(&p, "just some text, long enough").unwrap();
    assert!(matches!(load_err(&p), CheckpointError::BadSafetensors { .. }));
    // A zip that is not a torch file.
    let p = dir.path().join("other.ckpt");
    zip_with(&p, &[("hello.txt", b"hi")]);
    assert!(load_err(&p).to_string().contains("data.pkl"));
    // A Diffusers folder missing its VAE.
    let d = dir.path().join("partial");
    std::fs::create_dir_all(d.join("unet")).unwrap();
    assert!(matches!(load_err(&d), CheckpointError::NotAModel { .. }));
    assert!(matches!(load_err(&dir.path().join("nope")), CheckpointError::NotFound { .. }));
    assert!(load_model("builtin:nope", &LoadOptions::default())
        .unwrap_err()
        .to_string()
        .contains("builtin:tiny-sd1"));
}

/// Torch-written ckpt whose data.pkl is cut short: malformed, not a panic.
#[test]
fn truncated_pickle_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::File::open(fixtures().join("source-sd1.ckpt")).unwrap();
    let mut z = zip::ZipArchive::new(src).unwrap();
    let name = z.file_names().find(|n| n.ends_with("data.pkl")).unwrap().to_string();
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name(&name).unwrap(), &mut pkl).unwrap();
    for cut in [1, pkl.len() / 3, pkl.len() - 1] {
        let p = dir.path().join("cut.ckpt");
        zip_with(&p, &[(name.as_str(), &pkl[..cut])]);
        let e = load_err(&p);
        assert!(matches!(e, CheckpointError::BadCkpt { .. }), "{e}");
    }
    // Intact pickle, storages missing from the archive.
    let p = dir.path().join("nostorage.ckpt");
    zip_with(&p, &[(name.as_str(), &pkl)]);
    assert!(matches!(load_err(&p), CheckpointError::BadTensor { .. }));
}
