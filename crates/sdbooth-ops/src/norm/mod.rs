//! group_norm (optionally fused with SiLU) and layer_norm: the contract and their candle custom
//! ops, one pair for both ([`Norm`] says which).
//!
//! Forward ([`NormOp`]) keeps each group's/row's mean and 1/std as an f32 tensor
//! `[groups or rows, 2]` in the op object; backward ([`NormBackward`]) reads it and computes the
//! wanted gradients in one pass: dx is its output, dγ and dβ are left in its slots (see
//! [`backend::Slot`]).

pub(crate) mod cpu;

use crate::backend::{self, expect_dims, filled, Slot};
use crate::cpu::{cpu_tensor, storage_f32, storage_from_f32, with_f32};
use crate::reference;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Group normalisation over `[B, C, ...]` with per-channel affine parameters.
pub fn group_norm(x: &Tensor, num_groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    normalize(Norm::Group { groups: num_groups, silu: false }, x, gamma, beta, eps)
}

/// Group normalisation followed by SiLU (the pair every ResNet block uses), fused on CPU.
pub fn group_norm_silu(
    x: &Tensor,
    num_groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    normalize(Norm::Group { groups: num_groups, silu: true }, x, gamma, beta, eps)
}

/// Layer normalisation over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    normalize(Norm::Layer, x, gamma, beta, eps)
}

fn normalize(norm: Norm, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if backend::has_kernels(x.device()) {
        let op = NormOp { norm, eps, stats: Slot::new() };
        x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
    } else {
        norm.reference(x, gamma, beta, eps)
    }
}

/// Which normalisation an op computes.
#[derive(Clone, Copy)]
pub(crate) enum Norm {
    /// Over `[B, C, ...]` in `groups` channel groups, SiLU after the affine when `silu`.
    Group { groups: usize, silu: bool },
    /// Over the last dimension.
    Layer,
}

impl Norm {
    fn reference(self, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            Norm::Group { groups, silu: false } => reference::group_norm(x, groups, gamma, beta, eps),
            Norm::Group { groups, silu: true } => reference::group_norm_silu(x, groups, gamma, beta, eps),
            Norm::Layer => reference::layer_norm(x, gamma, beta, eps),
        }
    }
}

/// `[B, C, ...]` geometry of a group norm.
#[derive(Clone, Copy)]
pub(crate) struct GnDims {
    pub c: usize,
    pub groups: usize,
    /// Elements per channel (H·W).
    pub s: usize,
}

fn gn_dims(x: &[usize], groups: usize, gamma: &[usize], beta: &[usize]) -> Result<GnDims> {
    if x.len() < 2 {
        bail!("group_norm: input must be [B, C, ...], got {x:?}");
    }
    let c = x[1];
    // `% != 0` rather than `is_multiple_of`: the workspace's rust-version is 1.80.
    #[allow(clippy::manual_is_multiple_of)]
    let uneven = groups == 0 || c % groups != 0;
    if uneven {
        bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    if gamma.iter().product::<usize>() != c || beta.iter().product::<usize>() != c {
        bail!("group_norm: gamma {gamma:?} / beta {beta:?} must hold {c} values");
    }
    Ok(GnDims { c, groups, s: x[2..].iter().product() })
}

fn ln_dims(x: &[usize], gamma: &[usize], beta: &[usize]) -> Result<usize> {
    let Some(&d) = x.last() else { bail!("layer_norm: scalar input") };
    if gamma.iter().product::<usize>() != d || beta.iter().product::<usize>() != d || d == 0 {
        bail!("layer_norm: gamma {gamma:?} / beta {beta:?} must hold the last dim {d} of {x:?}");
    }
    Ok(d)
}

/// Which gradients a norm backward computes (an untracked operand's are skipped).
#[derive(Clone, Copy)]
pub(crate) struct Want {
    pub x: bool,
    pub gamma: bool,
    pub beta: bool,
}

impl Want {
    fn of(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Self {
        Want { x: x.track_op(), gamma: gamma.track_op(), beta: beta.track_op() }
    }
    fn any(&self) -> bool {
        self.x || self.gamma || self.beta
    }
}

type NormGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// What a norm backward computes and where it leaves the parameter gradients: dx is the op's
/// output (an empty tensor when x is untracked), dγ and dβ go to slots.
pub(crate) struct NormGradOutputs {
    want: Want,
    x_dtype: DType,
    /// γ's and β's shapes and dtypes (their gradients take them).
    params: [(Shape, DType); 2],
    /// dγ and dβ, filled by the kernel when wanted.
    slots: [Slot; 2],
}

impl NormGradOutputs {
    fn new(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Self {
        NormGradOutputs {
            want: Want::of(x, gamma, beta),
            x_dtype: x.dtype(),
            params: [(gamma.shape().clone(), gamma.dtype()), (beta.shape().clone(), beta.dtype())],
            slots: [Slot::new(), Slot::new()],
        }
    }

    /// The kernel's f32 gradients as the op's output and slot values, in the operands' dtypes.
    fn deliver(&self, op: &str, grads: cpu::Grads, x_shape: &Shape) -> Result<(CpuStorage, Shape)> {
        for ((grad, (shape, dtype)), slot) in
            [grads.gamma, grads.beta].into_iter().zip(&self.params).zip(&self.slots)
        {
            if let Some(g) = grad {
                backend::fill(slot, op, cpu_tensor(g, shape.clone(), *dtype)?)?;
            }
        }
        let shape = if self.want.x { x_shape.clone() } else { Shape::from(0) };
        Ok((storage_from_f32(grads.x, self.x_dtype)?, shape))
    }

    /// The gradients after the op ran: `dx` is its output.
    fn collect(&self, op: &str, dx: Tensor) -> Result<NormGrads> {
        let param =
            |i: usize, wanted: bool, what: &str| wanted.then(|| filled(&self.slots[i], op, what)).transpose();
        Ok((
            self.want.x.then_some(dx),
            param(0, self.want.gamma, "dgamma")?,
            param(1, self.want.beta, "dbeta")?,
        ))
    }
}

/// Forward `(x, γ, β) -> y`.
pub(crate) struct NormOp {
    pub norm: Norm,
    pub eps: f64,
    /// `(mean, rstd)` per (batch, group) or row, set by the forward.
    pub stats: Slot,
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Group { silu: false, .. } => "sdbooth-group-norm",
            Norm::Group { silu: true, .. } => "sdbooth-group-norm-silu",
            Norm::Layer => "sdbooth-layer-norm",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (storage_f32(s1, l1)?, storage_f32(s2, l2)?, storage_f32(s3, l3)?);
        let (y, stats) = match self.norm {
            Norm::Group { groups, silu } => {
                let gd = gn_dims(l1.dims(), groups, l2.dims(), l3.dims())?;
                cpu::group_norm_forward(&gd, self.eps, silu, &x, &gamma, &beta)
            }
            Norm::Layer => {
                let d = ln_dims(l1.dims(), l2.dims(), l3.dims())?;
                cpu::layer_norm_forward(d, self.eps, &x, &gamma, &beta)
            }
        };
        let rows = stats.len() / 2;
        backend::fill(&self.stats, self.name(), cpu_tensor(stats, (rows, 2), DType::F32)?)?;
        Ok((storage_from_f32(y, s1.dtype())?, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, beta: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<NormGrads> {
        let outputs = NormGradOutputs::new(x, gamma, beta);
        let want = outputs.want;
        if !want.any() {
            return Ok((None, None, None));
        }
        if !backend::has_kernels(dy.device()) {
            let (norm, eps) = (self.norm, self.eps);
            let operands = [(x, want.x), (gamma, want.gamma), (beta, want.beta)];
            let [dx, dg, db] =
                backend::reference_vjp(&operands, dy, |t| norm.reference(&t[0], &t[1], &t[2], eps))?;
            return Ok((dx, dg, db));
        }
        let op = NormBackward {
            norm: self.norm,
            stats: filled(&self.stats, self.name(), "statistics")?,
            beta: beta.clone(),
            outputs,
        };
        let dx = x.apply_op3_no_bwd(&dy.contiguous()?, gamma, &op)?;
        op.outputs.collect(op.name(), dx)
    }
}

/// A norm's validated geometry: group norm's (and whether SiLU follows), layer norm's width.
#[derive(Clone, Copy)]
enum Geometry {
    Group(GnDims, bool),
    Layer(usize),
}

/// Backward `(x, dy, γ) -> dx`, with dγ and dβ left in its slots (the wanted ones), from the
/// forward's statistics: GroupNormBackward or LayerNormBackward as `norm` says.
pub(crate) struct NormBackward {
    pub norm: Norm,
    /// `(mean, rstd)` per (batch, group) or row, from the forward.
    pub stats: Tensor,
    /// β, read by the SiLU-fused group norm to recompute the pre-activation.
    pub beta: Tensor,
    pub outputs: NormGradOutputs,
}

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Group { .. } => "sdbooth-group-norm-backward",
            Norm::Layer => "sdbooth-layer-norm-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        expect_dims(self.name(), "output gradient", l2.dims(), l1.dims())?;
        let (x, dy, gamma) = (storage_f32(s1, l1)?, storage_f32(s2, l2)?, storage_f32(s3, l3)?);
        let want = self.outputs.want;
        let geometry = match self.norm {
            Norm::Group { groups, silu } => {
                Geometry::Group(gn_dims(l1.dims(), groups, l3.dims(), self.beta.dims())?, silu)
            }
            Norm::Layer => Geometry::Layer(ln_dims(l1.dims(), l3.dims(), self.beta.dims())?),
        };
        // One (mean, rstd) pair per normalised group or row.
        let rows = match geometry {
            Geometry::Group(gd, _) => x.len().checked_div(gd.c * gd.s / gd.groups).unwrap_or(0),
            Geometry::Layer(d) => x.len() / d,
        };
        expect_dims(self.name(), "statistics", self.stats.dims(), &[rows, 2])?;
        let grads = with_f32(&self.stats, |stats| {
            with_f32(&self.beta, |beta| {
                let inputs = cpu::NormInputs { x: &x, dy: &dy, gamma: &gamma, beta, stats };
                Ok(match geometry {
                    Geometry::Group(gd, silu) => cpu::group_norm_backward(&gd, silu, &inputs, want),
                    Geometry::Layer(d) => cpu::layer_norm_backward(d, &inputs, want),
                })
            })
        })?;
        self.outputs.deliver(self.name(), grads, l1.shape())
    }
}
