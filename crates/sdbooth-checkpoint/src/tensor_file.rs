//! A located-but-unread view of a single-file checkpoint's tensors, shared by the .safetensors
//! and .ckpt readers, and the output side: a list of tensors to stream into a file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::dtype::{read_tensor_data, write_tensor_data, Dtype};
use crate::error::{io_err, CheckpointError, Result};

/// Which single-file container a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleFormat {
    Safetensors,
    Ckpt,
}

/// One tensor inside a file: where its bytes are, not the bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RawEntry {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first element in the file.
    pub offset: u64,
    pub nbytes: u64,
}

/// The tensor index of one single-file checkpoint.
#[derive(Clone, Debug)]
pub struct TensorIndex {
    pub path: PathBuf,
    pub format: SingleFormat,
    /// In file order.
    pub entries: Vec<RawEntry>,
    /// safetensors `__metadata__` (empty for .ckpt).
    pub metadata: BTreeMap<String, String>,
    /// .ckpt only: the training counters kohya adds to on save.
    pub epoch: Option<i64>,
    pub global_step: Option<i64>,
    /// .ckpt only: non-tensor values in the state dict (kept as notes for inspect).
    pub notes: Vec<String>,
    pub file_len: u64,
}

impl TensorIndex {
    pub fn open(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        let mut f = File::open(path).map_err(io_err(path))?;
        let mut magic = [0u8; 4];
        let got = f.read(&mut magic).map_err(io_err(path))?;
        // Zip files start with "PK\x03\x04"; trust content over the extension.
        if got == 4 && &magic == b"PK\x03\x04" {
            return crate::ckpt_pickle::read_ckpt_index(path);
        }
        if ext.as_deref() == Some("ckpt") || ext.as_deref() == Some("pt") || ext.as_deref() == Some("pth") {
            return Err(CheckpointError::BadCkpt {
                path: path.into(),
                reason: "not a zip archive (legacy pre-1.6 torch.save format or not a checkpoint at all)"
                    .into(),
            });
        }
        crate::safetensors_io::read_safetensors_index(path)
    }

    pub fn get(&self, key: &str) -> Option<&RawEntry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Reads one tensor straight from the file into a new CPU tensor of the file's dtype.
    pub fn read(&self, file: &mut File, e: &RawEntry) -> Result<Tensor> {
        file.seek(SeekFrom::Start(e.offset)).map_err(io_err(&self.path))?;
        let mut r = file.take(e.nbytes);
        read_tensor_data(&mut r, e.dtype, &e.shape).map_err(|reason| CheckpointError::BadTensor {
            path: self.path.clone(),
            key: e.key.clone(),
            reason,
        })
    }

    /// Opens the file for [`TensorIndex::read`], checking it has not changed size since indexing
    /// (training may run for hours; a replaced source would otherwise give garbage).
    pub fn reopen(&self) -> Result<File> {
        let f = File::open(&self.path).map_err(io_err(&self.path))?;
        let len = f.metadata().map_err(io_err(&self.path))?.len();
        if len != self.file_len {
            return Err(CheckpointError::Mismatch {
                path: self.path.clone(),
                reason: format!("file changed since it was loaded ({} bytes, now {len})", self.file_len),
            });
        }
        Ok(f)
    }
}

/// Where an output tensor's bytes come from.
#[derive(Clone, Debug)]
pub enum OutData {
    /// A tensor in memory (any device), converted to the entry's dtype as it is written.
    Tensor(Tensor),
    /// Bytes copied unchanged from a source file (keys we do not train: bit-identical).
    Raw { path: PathBuf, offset: u64 },
}

#[derive(Clone, Debug)]
pub struct OutTensor {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: OutData,
}

impl OutTensor {
    pub fn nbytes(&self) -> u64 {
        crate::dtype::checked_numel(&self.shape).unwrap_or(0) as u64 * self.dtype.size() as u64
    }

    /// Streams this tensor's bytes to `w`. `raw_files` caches open source files.
    pub fn write_to<W: Write>(
        &self,
        w: &mut W,
        out_path: &Path,
        raw_files: &mut BTreeMap<PathBuf, File>,
    ) -> Result<()> {
        let bad = |reason: String| CheckpointError::BadTensor {
            path: out_path.to_path_buf(),
            key: self.key.clone(),
            reason,
        };
        match &self.data {
            OutData::Tensor(t) => {
                if t.elem_count() as u64 * self.dtype.size() as u64 != self.nbytes() {
                    return Err(bad(format!("tensor has shape {:?}, entry says {:?}", t.dims(), self.shape)));
                }
                write_tensor_data(w, t, self.dtype).map_err(bad)
            }
            OutData::Raw { path, offset } => {
                if !raw_files.contains_key(path) {
                    raw_files.insert(path.clone(), File::open(path).map_err(io_err(path))?);
                }
                let f = raw_files.get_mut(path).ok_or_else(|| bad("source file vanished".into()))?;
                f.seek(SeekFrom::Start(*offset)).map_err(io_err(path))?;
                let n = std::io::copy(&mut f.take(self.nbytes()), w).map_err(io_err(out_path))?;
                if n != self.nbytes() {
                    return Err(bad(format!("source {} ended early", path.display())));
                }
                Ok(())
            }
        }
    }
}
