//! PyTorch `.ckpt` files (torch.save's zip format): reading the tensor index through the safe
//! pickle reader, and writing kohya-shaped `{"state_dict", "epoch", "global_step"}` files that
//! `torch.load(..., weights_only=True)` accepts.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use crate::atomic::atomic_write_file;
use crate::dtype::{checked_numel, Dtype};
use crate::error::{io_err, CheckpointError, Result};
use crate::pickle::{self, PVal, PickleError, PickleWriter};
use crate::tensor_file::{OutTensor, RawEntry, SingleFormat, TensorIndex};

/// data.pkl of a real SD checkpoint is ~100 kB; anything near this is not a model.
const MAX_PICKLE: u64 = 512 * 1024 * 1024;

pub fn read_ckpt_index(path: &Path) -> Result<TensorIndex> {
    let bad = |reason: String| CheckpointError::BadCkpt { path: path.into(), reason };
    let f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut zip = ZipArchive::new(f).map_err(|e| bad(format!("zip: {e}")))?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .map(str::to_string)
        .ok_or_else(|| bad("no data.pkl inside (not a torch.save file)".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let pkl = {
        let entry = zip.by_name(&pkl_name).map_err(|e| bad(format!("zip: {e}")))?;
        if entry.size() > MAX_PICKLE {
            return Err(bad(format!("data.pkl is {} bytes", entry.size())));
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry.take(MAX_PICKLE).read_to_end(&mut buf).map_err(|e| bad(format!("reading data.pkl: {e}")))?;
        buf
    };
    let root = pickle::load(&pkl).map_err(|e| match e {
        PickleError::Unsafe(global) => CheckpointError::UnsafePickle { path: path.into(), global },
        PickleError::Malformed(m) => bad(format!("data.pkl: {m}")),
    })?;
    let (state, epoch, global_step) = match root.get("state_dict") {
        Some(sd @ PVal::Dict(..)) => {
            (sd, root.get("epoch").and_then(PVal::as_int), root.get("global_step").and_then(PVal::as_int))
        }
        _ => (&root, None, None),
    };
    let PVal::Dict(items, _) = state else {
        return Err(bad("the pickle holds no dict of tensors".into()));
    };
    let mut entries = Vec::new();
    let mut notes = Vec::new();
    for (k, v) in items {
        let Some(key) = k.as_str() else { continue };
        let PVal::Tensor(t) = v else {
            notes.push(format!("{key}: non-tensor value"));
            continue;
        };
        let tbad = |reason: String| CheckpointError::BadTensor { path: path.into(), key: key.into(), reason };
        let numel = checked_numel(&t.shape).ok_or_else(|| tbad("shape overflows".into()))? as u64;
        // Contiguous row-major only; SD checkpoints never hold strided views.
        let mut expect = 1usize;
        for (d, s) in t.shape.iter().zip(&t.stride).rev() {
            if *d > 1 && *s != expect {
                return Err(tbad(format!("non-contiguous tensor (stride {:?})", t.stride)));
            }
            expect = expect.saturating_mul(*d);
        }
        if t.offset.checked_add(numel).is_none_or(|end| end > t.storage.numel) {
            return Err(tbad("view reaches past its storage".into()));
        }
        let name = format!("{prefix}data/{}", t.storage.key);
        let entry = zip.by_name(&name).map_err(|e| tbad(format!("storage {name}: {e}")))?;
        if entry.compression() != CompressionMethod::Stored {
            return Err(tbad("compressed storage (torch writes them uncompressed)".into()));
        }
        let es = t.storage.dtype.size() as u64;
        if entry.size() < t.storage.numel.saturating_mul(es) {
            return Err(tbad(format!("storage {name} is shorter than its declared size")));
        }
        let offset = entry.data_start() + t.offset * es;
        let nbytes = numel * es;
        if offset.checked_add(nbytes).is_none_or(|end| end > file_len) {
            return Err(tbad("data past the end of the file (truncated?)".into()));
        }
        entries.push(RawEntry {
            key: key.to_string(),
            dtype: t.storage.dtype,
            shape: t.shape.clone(),
            offset,
            nbytes,
        });
    }
    Ok(TensorIndex {
        path: path.into(),
        format: SingleFormat::Ckpt,
        entries,
        metadata: BTreeMap::new(),
        epoch,
        global_step,
        notes,
        file_len,
    })
}

/// Writes `{"state_dict": {...}, "epoch": e, "global_step": s}` as torch.save would, atomically,
/// streaming one tensor at a time into the archive.
pub fn write_ckpt(path: &Path, tensors: &[OutTensor], epoch: i64, global_step: i64) -> Result<()> {
    write_torch_zip(path, tensors, Some((epoch, global_step)))
}

/// Writes a flat `{name: tensor}` dict (a Diffusers `.bin` weights file).
pub fn write_torch_state_dict(path: &Path, tensors: &[OutTensor]) -> Result<()> {
    write_torch_zip(path, tensors, None)
}

fn write_torch_zip(path: &Path, tensors: &[OutTensor], counters: Option<(i64, i64)>) -> Result<()> {
    let stem = "archive";
    let mut w = PickleWriter::new();
    if counters.is_some() {
        w.op(b'}');
        w.op(b'(');
        w.str("state_dict");
    }
    w.op(b'}');
    w.op(b'(');
    for (i, t) in tensors.iter().enumerate() {
        let st = pickle::storage_type_name(t.dtype).ok_or_else(|| CheckpointError::BadTensor {
            path: path.into(),
            key: t.key.clone(),
            reason: format!("no torch storage type for {}", t.dtype),
        })?;
        w.str(&t.key);
        w.tensor(st, &i.to_string(), &t.shape);
    }
    w.op(b'u');
    if let Some((epoch, global_step)) = counters {
        w.str("epoch");
        w.int(epoch);
        w.str("global_step");
        w.int(global_step);
        w.op(b'u');
    }
    w.op(b'.');
    let zerr = |e: zip::result::ZipError| CheckpointError::Invalid(format!("{}: zip: {e}", path.display()));
    atomic_write_file(path, |file| -> Result<File> {
        let mut z = ZipWriter::new(file);
        // Stored and 64-byte aligned as torch writes, so torch.load(mmap=True) works on our files.
        let opts = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(false);
        z.start_file(format!("{stem}/data.pkl"), opts).map_err(zerr)?;
        z.write_all(&w.buf).map_err(io_err(path))?;
        z.start_file(format!("{stem}/byteorder"), opts).map_err(zerr)?;
        z.write_all(b"little").map_err(io_err(path))?;
        let mut raw_files = BTreeMap::new();
        for (i, t) in tensors.iter().enumerate() {
            let big = t.nbytes() >= u32::MAX as u64;
            z.start_file(format!("{stem}/data/{i}"), opts.large_file(big)).map_err(zerr)?;
            let mut bw = std::io::BufWriter::with_capacity(1 << 20, &mut z);
            t.write_to(&mut bw, path, &mut raw_files)?;
            bw.flush().map_err(io_err(path))?;
        }
        z.start_file(format!("{stem}/version"), opts).map_err(zerr)?;
        z.write_all(b"3\n").map_err(io_err(path))?;
        z.finish().map_err(zerr)
    })
    .map_err(|e| e.at(path))
}

/// Element types torch can hold in a .ckpt (all of ours).
pub fn ckpt_supports(d: Dtype) -> bool {
    pickle::storage_type_name(d).is_some()
}
