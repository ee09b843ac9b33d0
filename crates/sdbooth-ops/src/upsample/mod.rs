//! Nearest-neighbour 2x upsampling of `[B, C, H, W]` with a backward of its own on the CPU.
//!
//! candle's backward of `upsample_nearest2d` is a grouped conv2d with a 2x2 kernel of ones:
//! candle runs a grouped conv as one conv per channel (1280 of them for SD's deepest
//! upsampler), each with its own im2col and GEMM call on the main thread. The kernels here
//! ([`cpu`]) copy forward and sum 2x2 blocks backward, one parallel pass each, with candle's
//! values bit for bit. Devices without kernels of this crate keep candle's op.

pub(crate) mod cpu;

use crate::backend;
use crate::cpu::storage_f32;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]`.
///
/// Other dtypes go through f32 (exact for the copy; the gradient's four-term sums are then done
/// in f32): candle's CPU backend cannot run its conv-based backward in bf16/f16.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if backend::has_kernels(x.device()) {
        let x32 = if x.dtype() == DType::F32 { x.contiguous()? } else { x.to_dtype(DType::F32)? };
        let y = x32.apply_op1(Upsample2x)?;
        return if x.dtype() == DType::F32 { Ok(y) } else { y.to_dtype(x.dtype()) };
    }
    if x.dtype() == DType::F32 {
        return x.upsample_nearest2d(h * 2, w * 2);
    }
    x.to_dtype(DType::F32)?.upsample_nearest2d(h * 2, w * 2)?.to_dtype(x.dtype())
}

/// The plane size `(h, w)` of a `[B, C, h, w]` f32 CPU operand, checked.
fn planes<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<(std::borrow::Cow<'a, [f32]>, usize, usize)> {
    if !matches!(s, CpuStorage::F32(_)) {
        bail!("{op}: the CPU kernel takes f32, got {:?}", s.dtype());
    }
    let &[_, _, h, w] = l.dims() else { bail!("{op}: expected [B, C, H, W], got {:?}", l.dims()) };
    Ok((storage_f32(s, l)?, h, w))
}

/// Forward `x [B, C, H, W] -> y [B, C, 2H, 2W]`.
struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "sdbooth-upsample-nearest2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, h, w) = planes(self.name(), s, l)?;
        let (b, c) = (l.dims()[0], l.dims()[1]);
        Ok((CpuStorage::F32(cpu::forward(&x, h, w)), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        dy.contiguous()?.apply_op1_no_bwd(&Upsample2xBackward).map(Some)
    }
}

/// Backward `dy [B, C, 2H, 2W] -> dx [B, C, H, W]`: each 2x2 block summed.
struct Upsample2xBackward;

impl CustomOp1 for Upsample2xBackward {
    fn name(&self) -> &'static str {
        "sdbooth-upsample-nearest2x-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dy, h2, w2) = planes(self.name(), s, l)?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            bail!("{}: gradient planes {h2}x{w2} are not twice an input size", self.name());
        }
        let (b, c) = (l.dims()[0], l.dims()[1]);
        let (h, w) = (h2 / 2, w2 / 2);
        Ok((CpuStorage::F32(cpu::backward(&dy, h, w)), Shape::from((b, c, h, w))))
    }
}
