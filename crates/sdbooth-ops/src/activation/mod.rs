//! Element-wise activations. GELU (erf), GEGLU and QuickGELU have CPU kernels of their own for
//! f32 (one pass forward, one pass backward, multi-threaded: [`cpu`]); SiLU, other dtypes and
//! devices without kernels of this crate use compositions of candle primitives, whose backward
//! candle has ([`crate::reference`]).
//!
//! GEGLU composed of candle primitives costs about twenty passes over its tensor in backward
//! (the product's two gradients, the GELU derivative built from ten primitives, the narrow
//! gradients padded with zeros and concatenated, each added into a zero-filled gradient entry),
//! several of them single-threaded in candle 0.11. The kernels compute the same values: see
//! [`cpu`] for why they are bit-identical to candle's.

pub(crate) mod cpu;
mod fast;

use crate::backend;
use crate::cpu::{storage_f32, Precision};
use crate::reference;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// GELU with the exact erf formulation (PyTorch's default `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    gelu_erf_with(x, Precision::Stored)
}

/// [`gelu_erf`] for a layer whose products run in `precision`: with [`Precision::Bf16`] the CPU
/// kernel computes erf with a vectorised approximation (relative error about 1e-6, far below
/// bf16's 4e-3) instead of candle's scalar libm arithmetic; f32 values in and out either way.
pub fn gelu_erf_with(x: &Tensor, precision: Precision) -> Result<Tensor> {
    if has_f32_kernels(x) {
        x.contiguous()?.apply_op1(Activation { kind: Kind::Gelu, precision })
    } else {
        reference::gelu_erf(x)
    }
}

/// CLIP's `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if has_f32_kernels(x) {
        x.contiguous()?.apply_op1(Activation { kind: Kind::QuickGelu, precision: Precision::Stored })
    } else {
        reference::quick_gelu(x)
    }
}

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    reference::silu(x)
}

/// GEGLU: the last dimension holds `[value, gate]`; returns `value * gelu(gate)`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    geglu_with(x, Precision::Stored)
}

/// [`geglu`] for a layer whose products run in `precision` (see [`gelu_erf_with`]).
pub fn geglu_with(x: &Tensor, precision: Precision) -> Result<Tensor> {
    let full = x.dim(D::Minus1)?;
    if full % 2 != 0 {
        candle_core::bail!("geglu: last dimension {full} is odd; it must hold [value, gate] halves");
    }
    if has_f32_kernels(x) {
        x.contiguous()?.apply_op1(Activation { kind: Kind::Geglu, precision })
    } else {
        reference::geglu(x)
    }
}

/// The kernels compute f32 on the CPU; half-precision inputs keep candle's own arithmetic.
fn has_f32_kernels(x: &Tensor) -> bool {
    backend::has_kernels(x.device()) && x.dtype() == DType::F32
}

/// Which activation an op computes.
#[derive(Clone, Copy)]
enum Kind {
    Gelu,
    Geglu,
    /// Always candle's arithmetic (no erf to approximate).
    QuickGelu,
}

/// An activation op: the function, and the precision of the layer's products (bf16: the
/// vectorised GELU arithmetic, [`fast::Fast`]; else candle's, [`cpu::Exact`]).
#[derive(Clone, Copy)]
struct Activation {
    kind: Kind,
    precision: Precision,
}

impl Activation {
    fn reference(self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            Kind::Gelu => reference::gelu_erf(x),
            Kind::Geglu => reference::geglu(x),
            Kind::QuickGelu => reference::quick_gelu(x),
        }
    }

    fn forward<M: cpu::GeluMath>(self, x: &[f32], l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(match self.kind {
            Kind::Gelu => (CpuStorage::F32(cpu::gelu_forward::<M>(x)), l.shape().clone()),
            Kind::QuickGelu => (CpuStorage::F32(cpu::quick_gelu_forward(x)), l.shape().clone()),
            Kind::Geglu => {
                let mut dims = l.dims().to_vec();
                let Some(last) = dims.last_mut() else { bail!("geglu: scalar input") };
                *last /= 2;
                let half = *last;
                (CpuStorage::F32(cpu::geglu_forward::<M>(half, x)), Shape::from(dims))
            }
        })
    }

    fn backward<M: cpu::GeluMath>(
        self,
        name: &str,
        x: &[f32],
        l1: &Layout,
        dy: &[f32],
        l2: &Layout,
    ) -> Result<Vec<f32>> {
        Ok(match self.kind {
            Kind::Gelu => {
                backend::expect_dims(name, "output gradient", l2.dims(), l1.dims())?;
                cpu::gelu_backward::<M>(x, dy)
            }
            Kind::QuickGelu => {
                backend::expect_dims(name, "output gradient", l2.dims(), l1.dims())?;
                cpu::quick_gelu_backward(x, dy)
            }
            Kind::Geglu => {
                let half = l1.dims().last().copied().unwrap_or(0) / 2;
                let mut want = l1.dims().to_vec();
                if let Some(last) = want.last_mut() {
                    *last = half;
                }
                backend::expect_dims(name, "output gradient", l2.dims(), &want)?;
                cpu::geglu_backward::<M>(half, x, dy)
            }
        })
    }
}

fn f32_storage<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    if !matches!(s, CpuStorage::F32(_)) {
        bail!("{op}: the CPU kernel takes f32, got {:?}", s.dtype());
    }
    storage_f32(s, l)
}

/// Forward `x -> y`.
impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Gelu => "sdbooth-gelu",
            Kind::Geglu => "sdbooth-geglu",
            Kind::QuickGelu => "sdbooth-quick-gelu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_storage(self.name(), s, l)?;
        match self.precision {
            Precision::Stored => self.forward::<cpu::Exact>(&x, l),
            Precision::Bf16 => self.forward::<fast::Fast>(&x, l),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        if !backend::has_kernels(dy.device()) {
            let act = *self;
            let [dx, _, _] = backend::reference_vjp(&[(x, true)], dy, |t| act.reference(&t[0]))?;
            return Ok(dx);
        }
        x.apply_op2_no_bwd(&dy.contiguous()?, &ActivationBackward(*self)).map(Some)
    }
}

/// Backward `(x, dy) -> dx`.
struct ActivationBackward(Activation);

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        match self.0.kind {
            Kind::Gelu => "sdbooth-gelu-backward",
            Kind::Geglu => "sdbooth-geglu-backward",
            Kind::QuickGelu => "sdbooth-quick-gelu-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32_storage(self.name(), s1, l1)?, f32_storage(self.name(), s2, l2)?);
        let dx = match self.0.precision {
            Precision::Stored => self.0.backward::<cpu::Exact>(self.name(), &x, l1, &dy, l2)?,
            Precision::Bf16 => self.0.backward::<fast::Fast>(self.name(), &x, l1, &dy, l2)?,
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
