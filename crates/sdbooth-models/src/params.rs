//! Named parameters of one model part (U-Net, text encoder or VAE), under diffusers' names.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use sdbooth_ops::Precision;

use crate::ModelError;

/// Parameters of one model part, keyed by diffusers' parameter name
/// (`down_blocks.0.resnets.0.conv1.weight`, `text_model.encoder.layers.0.mlp.fc1.bias`, ...).
///
/// Parameters are `Var`s so training can update them in place; inference and frozen parts use
/// them as plain tensors.
#[derive(Clone, Default)]
pub struct ParamStore {
    params: BTreeMap<String, Var>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps existing tensors (e.g. loaded from a checkpoint).
    pub fn from_tensors(tensors: BTreeMap<String, Tensor>) -> Result<Self, ModelError> {
        let mut params = BTreeMap::new();
        for (name, t) in tensors {
            params.insert(name, Var::from_tensor(&t)?);
        }
        Ok(Self { params })
    }

    pub fn insert(&mut self, name: impl Into<String>, value: Tensor) -> Result<(), ModelError> {
        self.params.insert(name.into(), Var::from_tensor(&value)?);
        Ok(())
    }

    /// Inserts an existing `Var` without copying it (`insert` copies a non-variable tensor).
    pub fn insert_var(&mut self, name: impl Into<String>, var: Var) {
        self.params.insert(name.into(), var);
    }

    /// The parameter as a tensor (tracked by autograd: ops on it record a graph).
    pub fn get(&self, name: &str) -> Result<&Tensor, ModelError> {
        self.params.get(name).map(|v| v.as_tensor()).ok_or_else(|| ModelError::MissingParam(name.to_string()))
    }

    pub fn var(&self, name: &str) -> Result<&Var, ModelError> {
        self.params.get(name).ok_or_else(|| ModelError::MissingParam(name.to_string()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.params.iter()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.params.keys()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// Detached copies of the tensors (no graph), e.g. for saving.
    pub fn to_tensors(&self) -> BTreeMap<String, Tensor> {
        self.params.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect()
    }

    /// A deep copy whose parameters are new, separate leaves: gradients taken through it never
    /// reach this store's `Var`s. Note that it copies every tensor (candle's `Var::from_tensor`
    /// copies a non-variable tensor) and that ops on the copies still record a graph. For
    /// graph-free use without a copy, call `.detach()` per tensor, as `UNet::forward_frozen`
    /// and the checkpointed forward do.
    pub fn detached(&self) -> Result<Self, ModelError> {
        Self::from_tensors(self.to_tensors())
    }

    /// Casts every parameter (e.g. to f16 for a frozen part in mixed precision).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, ModelError> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.params {
            out.insert(k.clone(), v.as_tensor().to_dtype(dtype)?);
        }
        Self::from_tensors(out)
    }

    pub fn to_device(&self, device: &Device) -> Result<Self, ModelError> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.params {
            out.insert(k.clone(), v.as_tensor().to_device(device)?);
        }
        Self::from_tensors(out)
    }

    /// Checks that every expected name is present with the expected shape; lists all problems.
    pub fn check_shapes(&self, expected: &[(String, Vec<usize>)]) -> Result<(), ModelError> {
        let mut problems = Vec::new();
        for (name, shape) in expected {
            match self.params.get(name) {
                None => problems.push(format!("missing {name}")),
                Some(v) if v.dims() != shape.as_slice() => {
                    problems.push(format!("{name}: shape {:?}, expected {:?}", v.dims(), shape))
                }
                _ => {}
            }
        }
        let expected_names: std::collections::BTreeSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        for name in self.params.keys() {
            if !expected_names.contains(name.as_str()) {
                problems.push(format!("unexpected {name}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::ShapeMismatch(problems))
        }
    }
}

/// Parameter access for one run: tracked or detached, optionally cast to a compute dtype. The
/// U-Net, the text encoder and the VAE all read their weights through it.
///
/// Two dtypes matter: the compute dtype of the matrix products (the weights of linear and conv
/// layers, read with [`gemm_wb`](Self::gemm_wb)) and that of the activations (everything else).
/// They are the same except for bf16 compute where sdbooth-ops takes f32 activations with bf16
/// weights ([`sdbooth_ops::mixes_bf16_operands`], the CPU): there activations, norms and biases
/// stay f32 and only the products run in bf16 (f32 sums), as PyTorch's autocast does for its
/// bf16 ops. Element-wise ops then run on f32 and no activation is cast, and neither is any
/// weight: the layers pass the weights as stored (f32 masters, or bf16 with `--full_bf16`) with
/// [`Precision::Bf16`], the GEMMs round them as they pack them, and the weight gradients come
/// back in the weights' dtype without a bf16 tensor in between.
pub(crate) struct Weights<'a> {
    pub params: &'a ParamStore,
    /// false: detached views (share storage, record no graph).
    pub track: bool,
    /// Compute dtype of the products. Where the weights are not passed as stored (see
    /// [`Weights`]) they are cast per use (the cast is differentiable, so gradients of f32
    /// master weights come back in f32).
    pub dtype: Option<DType>,
}

impl Weights<'_> {
    /// The parameter `name`, tracked or detached as the run asks.
    fn param(&self, name: &str) -> Result<Tensor, ModelError> {
        let t = self.params.get(name)?;
        Ok(if self.track { t.clone() } else { t.detach() })
    }

    /// The parameter `name` in the activation dtype (norm scales, biases, embedding tables).
    pub(crate) fn get(&self, name: &str) -> Result<Tensor, ModelError> {
        self.cast(&self.param(name)?)
    }

    /// `{prefix}.weight` and `{prefix}.bias`, in the activation dtype (a norm's scale and shift).
    pub(crate) fn wb(&self, prefix: &str) -> Result<(Tensor, Tensor), ModelError> {
        Ok((self.get(&format!("{prefix}.weight"))?, self.get(&format!("{prefix}.bias"))?))
    }

    /// The weight of a linear or conv layer, with the precision of its products.
    pub(crate) fn gemm_weight(&self, name: &str) -> Result<GemmWeight, ModelError> {
        let t = self.param(name)?;
        let (tensor, precision) = match self.dtype {
            Some(DType::BF16) if sdbooth_ops::mixes_bf16_operands(t.device()) => (t, Precision::Bf16),
            Some(dt) if dt != t.dtype() => (sdbooth_ops::cast(&t, dt)?, Precision::Stored),
            _ => (t, Precision::Stored),
        };
        Ok(GemmWeight { tensor, precision })
    }

    /// A linear or conv layer's `{prefix}.weight` (see [`gemm_weight`](Self::gemm_weight)) and
    /// `{prefix}.bias` (activation dtype).
    pub(crate) fn gemm_wb(&self, prefix: &str) -> Result<(GemmWeight, Tensor), ModelError> {
        Ok((self.gemm_weight(&format!("{prefix}.weight"))?, self.get(&format!("{prefix}.bias"))?))
    }

    /// The dtype activations on `device` are kept in (see [`Weights`]); `None` = as they come.
    fn activation_dtype(&self, device: &Device) -> Option<DType> {
        match self.dtype {
            Some(DType::BF16) if sdbooth_ops::mixes_bf16_operands(device) => Some(DType::F32),
            dt => dt,
        }
    }

    /// `x` in the activation dtype (a multi-threaded cast on the CPU).
    pub(crate) fn cast(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self.activation_dtype(x.device()) {
            Some(dt) if dt != x.dtype() => Ok(sdbooth_ops::cast(x, dt)?),
            _ => Ok(x.clone()),
        }
    }

    /// The network input in the activation dtype: the given one, else that of the weights (a
    /// model loaded in f16 takes f32 inputs without the caller casting them).
    pub(crate) fn input(&self, x: &Tensor, first_weight: &str) -> Result<Tensor, ModelError> {
        let dt = match self.activation_dtype(x.device()) {
            Some(dt) => dt,
            None => self.params.get(first_weight)?.dtype(),
        };
        Ok(if x.dtype() == dt { x.clone() } else { x.to_dtype(dt)? })
    }
}

/// The weight of a linear or conv layer and the precision its products run in.
pub(crate) struct GemmWeight {
    tensor: Tensor,
    precision: Precision,
}

impl GemmWeight {
    /// What this layer's products run in.
    pub(crate) fn precision(&self) -> Precision {
        self.precision
    }

    /// `x @ wᵀ + b` ([`sdbooth_ops::linear_with`]).
    pub(crate) fn linear(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor, ModelError> {
        Ok(sdbooth_ops::linear_with(x, &self.tensor, b, self.precision)?)
    }

    /// The 2-D convolution of `x` ([`sdbooth_ops::conv2d_with`]).
    pub(crate) fn conv2d(
        &self,
        x: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor, ModelError> {
        Ok(sdbooth_ops::conv2d_with(x, &self.tensor, b, stride, padding, self.precision)?)
    }
}
