//! Optimizers with per-parameter updates.
//!
//! `Optimizer::step_param_scaled` updates one parameter as soon as its gradient is final (the
//! fused backward calls it block by block; the plain loop calls it for every parameter after
//! backward); `crate::update` decides when and with which clipping factor.
//!
//! Two implementations of every optimizer, chosen per parameter by [`Kernels::for_device`]:
//! - on the CPU, host kernels (`adamw.rs`, `adamw8bit.rs`, …) change the weights in place (see
//!   `access`) with state buffers in host vectors;
//! - on any other device (a GPU), and on the CPU when `SDBOOTH_REFERENCE_OPS=1` asks for the
//!   generic path, `device/` runs the same algorithms as candle tensor operations on the
//!   parameter's device, with the state as tensors there: nothing but scalars crosses to the
//!   host during a step. On the CPU both give the same bits.
//!
//! State buffers are keyed by parameter name (so the state of a text encoder that stops training
//! can be freed by group) and saved in one layout whichever implementation made them (`store.rs`).
//! Weights stored as bf16 (`--full_bf16`) are updated in f32 and rounded back stochastically from
//! a counter-based stream (seed, parameter name, step; `rounding.rs`), the same on both
//! implementations: the result does not depend on the order in which parameters are updated, and
//! resuming needs only the seed and the step counts.

pub mod access;
mod adafactor;
mod adamw;
pub mod adamw8bit;
mod config;
pub mod device;
mod lion;
pub mod rounding;
pub mod selftest;
mod sgd;
mod store;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

pub use access::{with_f32, with_grad, with_weights_mut, GradRef, WeightsMut};
pub use config::{OptimizerConfig, OptimizerKind, PyLiteral};

use crate::error::{Result, TrainError};

/// Elementwise updates run in parallel over chunks of this many values (results do not depend on
/// the split: every element is updated independently).
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// One state buffer of one parameter.
#[derive(Clone)]
pub enum StateBuf {
    F32(Vec<f32>),
    U8(Vec<u8>),
    /// A 1-D f32 or u8 tensor on the parameter's device (the tensor-operation optimizers' state).
    Tensor(Tensor),
}

impl StateBuf {
    /// The contents in host memory (a device buffer is copied: for saving and comparing).
    pub fn to_host(&self) -> Result<StateBuf> {
        Ok(match self {
            StateBuf::Tensor(t) => match t.dtype() {
                DType::U8 => StateBuf::U8(t.flatten_all()?.to_vec1()?),
                DType::F32 => StateBuf::F32(t.flatten_all()?.to_vec1()?),
                d => return Err(TrainError::Internal(format!("optimizer state tensor of dtype {d:?}"))),
            },
            host => host.clone(),
        })
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        match self {
            StateBuf::F32(v) => v.len(),
            StateBuf::U8(v) => v.len(),
            StateBuf::Tensor(t) => t.elem_count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            StateBuf::F32(v) => v.len() * 4,
            StateBuf::U8(v) => v.len(),
            StateBuf::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}

/// Equal contents, wherever they are held (a buffer that cannot be read compares unequal).
impl PartialEq for StateBuf {
    fn eq(&self, other: &Self) -> bool {
        match (self.to_host(), other.to_host()) {
            (Ok(StateBuf::F32(a)), Ok(StateBuf::F32(b))) => a == b,
            (Ok(StateBuf::U8(a)), Ok(StateBuf::U8(b))) => a == b,
            _ => false,
        }
    }
}

impl std::fmt::Debug for StateBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateBuf::F32(v) => write!(f, "F32({} values)", v.len()),
            StateBuf::U8(v) => write!(f, "U8({} values)", v.len()),
            StateBuf::Tensor(t) => {
                write!(f, "Tensor({:?} × {} on {:?})", t.dtype(), t.elem_count(), t.device())
            }
        }
    }
}

/// The optimizer state of one parameter: its step count and named buffers (`exp_avg`, …).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamState {
    pub step: u64,
    pub bufs: BTreeMap<String, StateBuf>,
    /// The step size actually used at the last step (differs from the scheduler's for Adafactor).
    pub last_lr: f64,
}

/// A state buffer of the wrong size or type; `Optimizer::step_param_scaled` names the parameter.
pub(crate) fn mismatched_buffer(key: &str, reason: impl Into<String>) -> TrainError {
    TrainError::OptimizerState { param: String::new(), buffer: key.to_string(), reason: reason.into() }
}

impl ParamState {
    /// Takes an f32 buffer out (zeros of length `n` when absent) so several can be borrowed mutably.
    pub(crate) fn take_f32(&mut self, key: &str, n: usize) -> Result<Vec<f32>> {
        match self.take_host(key)? {
            None => Ok(vec![0.0; n]),
            Some(StateBuf::F32(v)) if v.len() == n => Ok(v),
            Some(_) => Err(mismatched_buffer(key, format!("not {n} f32 values"))),
        }
    }
    pub(crate) fn take_u8(&mut self, key: &str, n: usize) -> Result<Vec<u8>> {
        match self.take_host(key)? {
            None => Ok(vec![0; n]),
            Some(StateBuf::U8(v)) if v.len() == n => Ok(v),
            Some(_) => Err(mismatched_buffer(key, format!("not {n} u8 values"))),
        }
    }
    /// Takes a buffer out for the host kernels (a CPU tensor left by the tensor path is read).
    /// A host buffer is moved out, not copied: cloning it cost a serial memcpy of every state
    /// buffer per step (8.6 GB for AdamW on SD1.5).
    fn take_host(&mut self, key: &str) -> Result<Option<StateBuf>> {
        match self.bufs.remove(key) {
            Some(tensor @ StateBuf::Tensor(_)) => tensor.to_host().map(Some),
            host => Ok(host),
        }
    }
    pub(crate) fn put_f32(&mut self, key: &str, v: Vec<f32>) {
        self.bufs.insert(key.to_string(), StateBuf::F32(v));
    }
    pub(crate) fn put_u8(&mut self, key: &str, v: Vec<u8>) {
        self.bufs.insert(key.to_string(), StateBuf::U8(v));
    }
    /// Bytes held by the state buffers.
    pub fn nbytes(&self) -> usize {
        self.bufs.values().map(StateBuf::nbytes).sum()
    }
}

/// A named set of parameters sharing a learning rate (kohya: U-Net and text encoder groups).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    pub name: String,
    pub lr: f64,
    pub params: Vec<String>,
}

/// Which implementation updates a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Chosen by the parameter's device ([`Kernels::for_device`]).
    #[default]
    ByDevice,
    /// The host kernels, in place (CPU tensors only).
    Host,
    /// Candle tensor operations on the parameter's device (`device/`).
    Tensor,
}

impl Kernels {
    /// The host kernels for CPU tensors, unless `SDBOOTH_REFERENCE_OPS=1` asks for the generic
    /// path; tensor operations on every other device.
    pub fn for_device(device: &Device) -> Kernels {
        if device.is_cpu() && !sdbooth_ops::reference_ops_forced() {
            Kernels::Host
        } else {
            Kernels::Tensor
        }
    }
}

pub struct Optimizer {
    pub config: OptimizerConfig,
    pub groups: Vec<ParamGroup>,
    pub states: BTreeMap<String, ParamState>,
    /// The implementation used; `ByDevice` except in tests that compare the two.
    pub kernels: Kernels,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Self {
        Optimizer { config, groups: Vec::new(), states: BTreeMap::new(), kernels: Kernels::ByDevice }
    }

    /// Registers a parameter group; `lr` is its base learning rate (the scheduler's multiplier
    /// applies to it).
    pub fn add_group(&mut self, name: &str, lr: f64, params: Vec<String>) {
        self.groups.push(ParamGroup { name: name.to_string(), lr, params });
    }

    /// The index of the group holding `param`.
    pub fn group_of(&self, param: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.params.iter().any(|p| p == param))
    }

    /// Drops a group and the state of its parameters (`--stop_text_encoder_training`).
    /// Returns the bytes freed.
    pub fn free_group(&mut self, name: &str) -> usize {
        let mut freed = 0;
        if let Some(i) = self.groups.iter().position(|g| g.name == name) {
            let g = self.groups.remove(i);
            for p in &g.params {
                if let Some(s) = self.states.remove(p) {
                    freed += s.nbytes();
                }
            }
        }
        freed
    }

    /// Updates `param` in place from `grad` with learning rate `lr`.
    pub fn step_param(&mut self, name: &str, param: &Var, grad: &Tensor, lr: f64) -> Result<()> {
        self.step_param_scaled(name, param, grad, lr, 1.0)
    }

    /// As `step_param`, with the gradient multiplied by `grad_scale` first (gradient clipping
    /// without writing to the gradient).
    pub fn step_param_scaled(
        &mut self,
        name: &str,
        param: &Var,
        grad: &Tensor,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        let shape = param.as_tensor().dims().to_vec();
        if grad.dims() != shape.as_slice() {
            return Err(TrainError::param(name, format!("gradient shape {:?} != {:?}", grad.dims(), shape)));
        }
        let kernels = match self.kernels {
            Kernels::ByDevice => Kernels::for_device(param.device()),
            k => k,
        };
        let config = &self.config;
        let st = self.states.entry(name.to_string()).or_default();
        st.step += 1;
        let step = st.step;
        let result = if kernels == Kernels::Tensor {
            device::step(config, st, name, param, grad, lr, grad_scale)
        } else {
            // The scale is applied inside the update loops: no scaled copy of the gradient.
            with_grad(grad, |g| -> Result<()> {
                with_weights_mut(param, |w| match w {
                    WeightsMut::BF16(wb) if eight_bit_bf16(config, wb.len(), g.len()) => {
                        st.last_lr = lr;
                        let key = device::rounding_key(config.rounding_seed, name, step);
                        adamw8bit::step_bf16(config, st, wb, g, grad_scale, lr, key)
                    }
                    w => g.with_f32(|g| match w {
                        WeightsMut::F32(w) => update(config, st, w, g, grad_scale, &shape, lr),
                        WeightsMut::BF16(wb) => {
                            let mut w32: Vec<f32> = wb.par_iter().map(|x| x.to_f32()).collect();
                            update(config, st, &mut w32, g, grad_scale, &shape, lr)?;
                            let key = device::rounding_key(config.rounding_seed, name, step);
                            rounding::stochastic_round(&w32, wb, key);
                            Ok(())
                        }
                    }),
                })
            })
            .and_then(|r| r)
        };
        result.map_err(|e| match e {
            TrainError::OptimizerState { buffer, reason, .. } => {
                TrainError::OptimizerState { param: name.to_string(), buffer, reason }
            }
            e => e,
        })
    }

    /// The step size used at the last update of `param` (Adafactor computes its own).
    pub fn last_lr(&self, param: &str) -> Option<f64> {
        self.states.get(param).map(|s| s.last_lr)
    }

    /// Bytes of optimizer state held.
    pub fn state_nbytes(&self) -> usize {
        self.states.values().map(ParamState::nbytes).sum()
    }
}

/// Whether bf16 weights take AdamW8bit's own bf16 update (8-bit state, one pass, no f32 copy of
/// the tensor); other optimizers and small tensors update an f32 copy and round it back.
fn eight_bit_bf16(c: &OptimizerConfig, weights: usize, grads: usize) -> bool {
    c.kind == OptimizerKind::AdamW8bit && weights >= c.min_8bit_size && weights == grads
}

fn update(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &mut [f32],
    g: &[f32],
    gs: f32,
    shape: &[usize],
    lr: f64,
) -> Result<()> {
    if w.len() != g.len() {
        return Err(TrainError::Internal(format!("gradient has {} values, weight {}", g.len(), w.len())));
    }
    st.last_lr = lr;
    match c.kind {
        OptimizerKind::AdamW => adamw::step(c, st, w, g, gs, lr),
        OptimizerKind::AdamW8bit => adamw8bit::step(c, st, w, g, gs, lr),
        OptimizerKind::Lion => lion::step(c, st, w, g, gs, lr),
        OptimizerKind::SGDNesterov => sgd::step(c, st, w, g, gs, lr),
        OptimizerKind::Adafactor => adafactor::step(c, st, w, g, gs, shape, lr),
    }
}
