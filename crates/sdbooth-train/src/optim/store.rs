//! Saving and loading optimizer state as one safetensors file: every buffer as a tensor named
//! `{param}::{buffer}`, the config, groups and per-parameter step counts as JSON in the metadata.
//! Buffers are streamed to the file one at a time (no copy of the whole state in memory); a
//! buffer held on a device is copied to the host as its turn comes, so the file is the same
//! whichever implementation (host kernels or tensor operations) made the state.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use super::{Optimizer, OptimizerConfig, ParamGroup, ParamState, StateBuf};
use crate::error::{Result, TrainError};

const FORMAT: &str = "sdbooth-optimizer/1";

struct BufView<'a> {
    buf: &'a StateBuf,
    shape: Vec<usize>,
    /// The first device buffer that could not be read (`View::data` cannot fail; `save` checks).
    error: &'a RefCell<Option<TrainError>>,
}

impl View for BufView<'_> {
    fn dtype(&self) -> Dtype {
        match self.buf {
            StateBuf::F32(_) => Dtype::F32,
            StateBuf::U8(_) => Dtype::U8,
            StateBuf::Tensor(t) if t.dtype() == candle_core::DType::U8 => Dtype::U8,
            StateBuf::Tensor(_) => Dtype::F32,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        match self.buf {
            StateBuf::F32(v) => Cow::Owned(f32_bytes(v)),
            StateBuf::U8(v) => Cow::Borrowed(v),
            StateBuf::Tensor(_) => match self.buf.to_host() {
                Ok(StateBuf::F32(v)) => Cow::Owned(f32_bytes(&v)),
                Ok(StateBuf::U8(v)) => Cow::Owned(v),
                other => {
                    let e = other
                        .err()
                        .unwrap_or_else(|| TrainError::Internal("device buffer not copied".into()));
                    self.error.borrow_mut().get_or_insert(e);
                    Cow::Owned(vec![0; self.data_len()])
                }
            },
        }
    }
    fn data_len(&self) -> usize {
        match self.dtype() {
            Dtype::U8 => self.buf.len(),
            _ => self.buf.len() * 4,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    config: OptimizerConfig,
    groups: Vec<(String, f64, Vec<String>)>,
    steps: BTreeMap<String, u64>,
}

impl Optimizer {
    /// Writes the state to `path` (the caller makes the enclosing write atomic; see `state.rs`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = Meta {
            format: FORMAT.into(),
            config: self.config.clone(),
            groups: self.groups.iter().map(|g| (g.name.clone(), g.lr, g.params.clone())).collect(),
            steps: self.states.iter().map(|(k, s)| (k.clone(), s.step)).collect(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| TrainError::state(path, e.to_string()))?;
        let info = Some(HashMap::from([("sdbooth_optimizer".to_string(), json)]));
        let error = RefCell::new(None);
        let views = self.states.iter().flat_map(|(p, s)| {
            let error = &error;
            s.bufs
                .iter()
                .map(move |(k, b)| (format!("{p}::{k}"), BufView { buf: b, shape: vec![b.len()], error }))
                .filter(|(_, v)| !(v.dtype() == Dtype::F32 && v.buf.is_empty()))
        });
        safetensors::serialize_to_file(views, &info, path)
            .map_err(|e| TrainError::state(path, e.to_string()))?;
        match error.into_inner() {
            Some(e) => {
                Err(TrainError::state(path, format!("reading the optimizer state from the device: {e}")))
            }
            None => Ok(()),
        }
    }

    /// Reads a state written by `save`. The optimizer kind must match; hyper-parameters are taken
    /// from the file except the learning rates of the groups, which the caller sets.
    pub fn load(path: &Path) -> Result<Optimizer> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| TrainError::state(path, e.to_string()))?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| TrainError::state(path, e.to_string()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("sdbooth_optimizer"))
            .ok_or_else(|| TrainError::state(path, "not an sdbooth optimizer state (no metadata)"))?;
        let meta: Meta = serde_json::from_str(json).map_err(|e| TrainError::state(path, e.to_string()))?;
        if meta.format != FORMAT {
            return Err(TrainError::state(path, format!("unknown format {:?}", meta.format)));
        }
        let mut states: BTreeMap<String, ParamState> = meta
            .steps
            .iter()
            .map(|(k, &step)| (k.clone(), ParamState { step, ..Default::default() }))
            .collect();
        for (name, view) in st.tensors() {
            let (param, key) = name
                .rsplit_once("::")
                .ok_or_else(|| TrainError::state(path, format!("bad tensor name {name}")))?;
            let buf = match view.dtype() {
                Dtype::F32 => StateBuf::F32(
                    view.data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ),
                Dtype::U8 => StateBuf::U8(view.data().to_vec()),
                d => return Err(TrainError::state(path, format!("{name}: unexpected dtype {d:?}"))),
            };
            states
                .get_mut(param)
                .ok_or_else(|| TrainError::state(path, format!("{name}: no step count for {param}")))?
                .bufs
                .insert(key.to_string(), buf);
        }
        Ok(Optimizer {
            config: meta.config,
            groups: meta
                .groups
                .into_iter()
                .map(|(name, lr, params)| ParamGroup { name, lr, params })
                .collect(),
            states,
            kernels: super::Kernels::ByDevice,
        })
    }
}
