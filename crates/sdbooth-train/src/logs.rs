//! Training logs: a TensorBoard event-file writer of our own (scalars only) and a JSON-lines log.
//!
//! The event file is a TFRecord stream (u64 length, masked CRC32C of the length, payload, masked
//! CRC32C of the payload) of `Event` protobufs encoded by hand: first `file_version`
//! "brain.Event:2", then one Event per scalar with `Summary { value { tag, simple_value } }`.
//! Tags follow kohya's train_db.py: `loss` and `lr/unet`, `lr/text_encoder1` at the global step,
//! `loss/epoch` at step epoch+1. kohya's logging folder is `{logging_dir}/{log_prefix}{YYYYmmddHHMMSS}`
//! with accelerate's tracker subfolder `dreambooth` (or --log_tracker_name).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::{Result, TrainError};

pub const TAG_LOSS: &str = "loss";
pub const TAG_LOSS_EPOCH: &str = "loss/epoch";
pub const TAG_LR_UNET: &str = "lr/unet";
pub const TAG_LR_TEXT_ENCODER: &str = "lr/text_encoder1";

/// CRC-32C (Castagnoli), bitwise-reflected, table driven.
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: rotate right by 15 and add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Encodes an `Event` with wall_time, step and either a file_version or one scalar summary.
pub fn encode_event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalar: Option<(&str, f32)>,
) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint (int64: two's complement for negatives)
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        len_field(3, v.as_bytes(), &mut e);
    }
    if let Some((tag, value)) = scalar {
        let mut val = Vec::new();
        len_field(1, tag.as_bytes(), &mut val);
        val.push(0x15); // field 2, fixed32 float
        val.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        len_field(1, &val, &mut summary);
        len_field(5, &summary, &mut e);
    }
    e
}

/// Frames one record as TFRecord.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(payload.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    r.extend_from_slice(payload);
    r.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    r
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A TensorBoard event file, flushed after every scalar so a crash loses nothing logged.
pub struct TensorBoardWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TensorBoardWriter {
    /// Creates `dir` and `events.out.tfevents.{unix_seconds}.{host}.{pid}` in it (the pid keeps two
    /// runs started in the same second apart, as torch's SummaryWriter does).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let t = now();
        let path =
            dir.join(format!("events.out.tfevents.{}.{}.{}", t as u64, hostname(), std::process::id()));
        let file = File::create(&path).map_err(|e| TrainError::io(&path, e))?;
        let mut w = TensorBoardWriter { path, out: BufWriter::new(file) };
        w.write_record(&encode_event(t, 0, Some("brain.Event:2"), None))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, payload: &[u8]) -> Result<()> {
        let r = tfrecord(payload);
        self.out.write_all(&r).and_then(|_| self.out.flush()).map_err(|e| TrainError::io(&self.path, e))
    }

    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        self.write_record(&encode_event(now(), step, None, Some((tag, value))))
    }

    /// Several scalars at one step (kohya's `accelerator.log(dict, step)`).
    pub fn add_scalars(&mut self, values: &[(&str, f32)], step: i64) -> Result<()> {
        values.iter().try_for_each(|(tag, v)| self.add_scalar(tag, *v, step))
    }
}

/// kohya's logging folder: `{logging_dir}/{log_prefix}{YYYYmmddHHMMSS}` (UTC here; kohya uses
/// local time) and the tracker subfolder.
pub fn kohya_log_dir(logging_dir: &Path, log_prefix: Option<&str>, tracker_name: Option<&str>) -> PathBuf {
    let stamp = sdbooth_checkpoint::time::UtcTime::now().compact();
    logging_dir
        .join(format!("{}{stamp}", log_prefix.unwrap_or("")))
        .join(tracker_name.unwrap_or("dreambooth"))
}

/// A JSON-lines log: one object per line, flushed per line.
pub struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlWriter {
    /// Appends to `path` (a resumed run continues the same log).
    pub fn append(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(JsonlWriter { path: path.to_path_buf(), out: BufWriter::new(file) })
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|e| TrainError::io(&self.path, e.into()))?;
        writeln!(self.out, "{line}").and_then(|_| self.out.flush()).map_err(|e| TrainError::io(&self.path, e))
    }
}

/// One step's record in the JSON-lines log.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f32,
    pub avr_loss: f32,
    pub lr_unet: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_text_encoder: Option<f64>,
    pub step_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
}

/// kohya's LossRecorder: the moving average over the steps of an epoch; from the second epoch on,
/// step i's slot is replaced, so the average covers the latest epoch's worth of steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct LossRecorder {
    pub loss_list: Vec<f64>,
    pub loss_total: f64,
}

impl LossRecorder {
    pub fn add(&mut self, epoch: u64, step: usize, loss: f64) {
        if epoch == 0 {
            self.loss_list.push(loss);
        } else {
            while self.loss_list.len() <= step {
                self.loss_list.push(0.0);
            }
            self.loss_total -= self.loss_list[step];
            self.loss_list[step] = loss;
        }
        self.loss_total += loss;
    }

    pub fn moving_average(&self) -> f64 {
        if self.loss_list.is_empty() {
            0.0
        } else {
            self.loss_total / self.loss_list.len() as f64
        }
    }
}
