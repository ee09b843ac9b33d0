//! .safetensors reading and writing with our own header parser: the header is validated in full
//! (sizes, offsets, overlaps) before any tensor is touched, and tensors are read one by one
//! straight into their destination (no mmap of the whole file plus a copy).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde_json::Value;

use crate::atomic::atomic_write;
use crate::dtype::{checked_numel, Dtype};
use crate::error::{io_err, CheckpointError, Result};
use crate::tensor_file::{OutTensor, RawEntry, SingleFormat, TensorIndex};

/// Headers above this are refused: real ones are well under 1 MB, and the length is read before
/// anything is allocated.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// Parses a safetensors header (the JSON after the 8-byte length) for a file of `file_len` bytes.
/// Pure function of its inputs, so the fuzz target drives it directly.
pub fn parse_header(
    json: &[u8],
    file_len: u64,
) -> std::result::Result<(Vec<RawEntry>, BTreeMap<String, String>), String> {
    let data_start = 8u64 + json.len() as u64;
    if data_start > file_len {
        return Err(format!("header claims {} bytes but the file has {file_len}", json.len()));
    }
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("header is not a JSON object")?;
    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(obj.len());
    for (key, val) in obj {
        if key == "__metadata__" {
            let m = val.as_object().ok_or("__metadata__ is not an object")?;
            for (mk, mv) in m {
                let s = mv.as_str().ok_or_else(|| format!("__metadata__ value `{mk}` is not a string"))?;
                metadata.insert(mk.clone(), s.to_string());
            }
            continue;
        }
        let t = val.as_object().ok_or_else(|| format!("`{key}`: entry is not an object"))?;
        let dtype_s = t.get("dtype").and_then(Value::as_str).ok_or_else(|| format!("`{key}`: no dtype"))?;
        let dtype = Dtype::from_safetensors_name(dtype_s)
            .ok_or_else(|| format!("`{key}`: unknown dtype {dtype_s}"))?;
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("`{key}`: no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("`{key}`: bad shape"))?;
        let offs = t
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| format!("`{key}`: no data_offsets"))?;
        let (s, e) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => return Err(format!("`{key}`: bad data_offsets")),
        };
        let want = checked_numel(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| format!("`{key}`: shape {shape:?} overflows"))?;
        if e - s != want as u64 {
            return Err(format!(
                "`{key}`: data_offsets span {} bytes, shape {shape:?} {dtype} needs {want}",
                e - s
            ));
        }
        let end = data_start.checked_add(e).ok_or_else(|| format!("`{key}`: offset overflows"))?;
        if end > file_len {
            return Err(format!(
                "`{key}`: data ends at byte {end} but the file has {file_len} (truncated file or lying header)"
            ));
        }
        entries.push(RawEntry { key: key.clone(), dtype, shape, offset: data_start + s, nbytes: e - s });
    }
    entries.sort_by_key(|e| (e.offset, e.nbytes));
    for w in entries.windows(2) {
        if w[0].offset + w[0].nbytes > w[1].offset {
            return Err(format!("tensors `{}` and `{}` overlap", w[0].key, w[1].key));
        }
    }
    Ok((entries, metadata))
}

/// Parses a whole in-memory safetensors file's header (length prefix included), as
/// [`read_safetensors_index`] does for a file: the fuzz target's entry point.
pub fn parse_file_bytes(
    bytes: &[u8],
) -> std::result::Result<(Vec<RawEntry>, BTreeMap<String, String>), String> {
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or("shorter than 8 bytes")?;
    let n = u64::from_le_bytes(len_bytes);
    let file_len = bytes.len() as u64;
    if n > MAX_HEADER_LEN || n > file_len - 8 {
        return Err(format!("header length {n} is impossible for a {file_len}-byte file"));
    }
    parse_header(&bytes[8..8 + n as usize], file_len)
}

pub fn read_safetensors_index(path: &Path) -> Result<TensorIndex> {
    let bad = |reason: String| CheckpointError::BadSafetensors { path: path.into(), reason };
    let mut f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|_| bad(format!("file is only {file_len} bytes")))?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_LEN || n > file_len.saturating_sub(8) {
        return Err(bad(format!("header length {n} is impossible for a {file_len}-byte file")));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(io_err(path))?;
    let (entries, metadata) = parse_header(&json, file_len).map_err(bad)?;
    Ok(TensorIndex {
        path: path.into(),
        format: SingleFormat::Safetensors,
        entries,
        metadata,
        epoch: None,
        global_step: None,
        notes: Vec::new(),
        file_len,
    })
}

/// Builds the header bytes (padded with spaces to 8-byte alignment, as the reference writer does)
/// for tensors laid out back to back in the given order.
fn build_header(tensors: &[OutTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, Value> =
            metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        obj.insert("__metadata__".into(), Value::Object(m));
    }
    let mut off = 0u64;
    for t in tensors {
        let n = t.nbytes();
        obj.insert(
            t.key.clone(),
            serde_json::json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut bytes = Value::Object(obj).to_string().into_bytes();
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
}

/// Writes `tensors` (in the given order) atomically, streaming one tensor at a time.
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if !seen.insert(t.key.as_str()) {
            return Err(CheckpointError::Invalid(format!("{}: duplicate key {}", path.display(), t.key)));
        }
    }
    let header = build_header(tensors, metadata);
    atomic_write(path, |w| -> Result<()> {
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io_err(path))?;
        w.write_all(&header).map_err(io_err(path))?;
        let mut raw_files = BTreeMap::new();
        for t in tensors {
            t.write_to(w, path, &mut raw_files)?;
        }
        Ok(())
    })
    .map_err(|e| e.at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> Vec<u8> {
        json.as_bytes().to_vec()
    }

    #[test]
    fn rejects_lies_and_overlaps() {
        let ok = header(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#);
        let len = 8 + ok.len() as u64 + 8;
        assert!(parse_header(&ok, len).is_ok());
        let e = parse_header(&ok, len - 1).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let wrong_span = header(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#);
        assert!(parse_header(&wrong_span, 1000).unwrap_err().contains("needs 12"));
        let overlap = header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        );
        assert!(parse_header(&overlap, 1000).unwrap_err().contains("overlap"));
        let huge = header(r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#);
        assert!(parse_header(&huge, 1000).unwrap_err().contains("overflows"));
        assert!(parse_header(b"[1,2]", 1000).is_err());
        assert!(parse_header(b"\xff\xfe", 1000).is_err());
    }
}
