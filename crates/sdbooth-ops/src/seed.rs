//! Backpropagation from a given output gradient.
//!
//! candle's `backward` starts from a scalar. The usual way to backpropagate a gradient `g` of a
//! non-scalar `y` is `(y * g).sum_all().backward()`, which costs seven passes over `y`: the
//! product, the sum, then in backward the ones tensor the sum hands back, the two products of
//! the multiplication's backward (`ones · g` for `y`, and `ones · y` for `g`, which no one reads)
//! and the zero-fill + add of both into the gradient store. [`backward_from`] instead applies a
//! custom op to `y` whose forward is a scalar zero and whose backward hands back `g` itself:
//! one pass (candle's zero-fill + add of `g` into `y`'s entry). `y`'s gradient is `0 + g` either
//! way (`ones · g` is `g` exactly), so every gradient is bit-identical to the old seeding.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The gradients of everything `y` depends on, given `dy` = dLoss/dy (same shape and dtype as
/// `y`): what `(y * dy).sum_all().backward()` computes, without the extra passes.
pub fn backward_from(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    if y.dims() != dy.dims() || y.dtype() != dy.dtype() {
        bail!(
            "backward_from: gradient {:?} {:?} does not match the output {:?} {:?}",
            dy.dims(),
            dy.dtype(),
            y.dims(),
            y.dtype()
        );
    }
    y.apply_op1(Seed { dy: dy.detach() })?.backward()
}

/// A scalar zero whose backward is the given gradient.
struct Seed {
    dy: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "sdbooth-seed-gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn bwd(&self, _y: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.dy.clone()))
    }
}
