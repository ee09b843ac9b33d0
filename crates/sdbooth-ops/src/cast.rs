//! dtype conversion between f32 and bf16 with a multi-threaded CPU kernel.
//!
//! candle's CPU `to_dtype` converts on one thread; this op converts in fixed chunks on rayon's
//! threads, vectorised (per element, so the result is candle's exactly: round to nearest even).
//! `--mixed_precision bf16` on the CPU no longer casts weights per use (the linear/conv GEMMs
//! take the f32 master weights with [`crate::Precision::Bf16`] and round them as they pack
//! them, with the same [`bf16_bits`]); casts remain for the other parameters (norms, biases,
//! embeddings) when stored in another dtype than the activations (`--full_bf16`), and for the
//! compute dtype on other devices.

use crate::backend;
use crate::cpu::{storage_bf16, storage_f32, CAST_CHUNK};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// `x` in `dtype`, differentiable (the gradient is cast back to `x`'s dtype). Conversions other
/// than f32 ↔ bf16, and devices without kernels of this crate, use candle's `to_dtype`.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let supported = matches!((x.dtype(), dtype), (DType::F32, DType::BF16) | (DType::BF16, DType::F32));
    if !supported || !backend::has_kernels(x.device()) {
        return x.to_dtype(dtype);
    }
    x.contiguous()?.apply_op1(Cast { to: dtype })
}

/// `f` applied to `x` cast to bf16, its result cast back to `x`'s dtype: [`crate::Precision::Bf16`]
/// on devices without kernels of this crate, whose ops need both operands in one dtype.
pub(crate) fn in_bf16(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    cast(&f(&cast(x, DType::BF16)?)?, x.dtype())
}

/// Whether linear and conv2d on `device` take f32 activations with bf16 weights (the products in
/// bf16 with f32 sums, the f32 operand rounded as it is packed): where this crate's kernels run
/// (the CPU). Models then keep activations in f32 under bf16 compute, so element-wise ops run on
/// f32 and nothing but the weights is cast; elsewhere both operands must share a dtype.
pub fn mixes_bf16_operands(device: &Device) -> bool {
    backend::has_kernels(device)
}

struct Cast {
    to: DType,
}

impl CustomOp1 for Cast {
    fn name(&self) -> &'static str {
        "sdbooth-cast"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (storage_bf16(s, l)?, self.to) {
            (Some(v), DType::F32) => CpuStorage::F32(widen(v)),
            (None, DType::BF16) => CpuStorage::BF16(narrow(&storage_f32(s, l)?)),
            (_, to) => bail!("sdbooth-cast: no CPU kernel to {to:?} for this operand"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        if grad.dtype() == arg.dtype() {
            return Ok(Some(grad));
        }
        Ok(Some(grad.apply_op1_no_bwd(&Cast { to: arg.dtype() })?))
    }
}

/// f32 → bf16 bits, rounding to nearest even and quieting NaNs: exactly `half::bf16::from_f32`
/// (tested on edge values), written without branches so loops over it vectorise.
#[inline(always)]
pub(crate) fn bf16_bits(f: f32) -> u16 {
    let x = f.to_bits();
    // Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
    // half is above 0x8000, or equal to it with the kept half odd (ties to even).
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    let quiet_nan = (x >> 16) | 0x0040;
    (if x & 0x7FFF_FFFF > 0x7F80_0000 { quiet_nan } else { rounded }) as u16
}

/// bf16 → f32 (exact: the bf16 bits are the f32's high half).
#[inline(always)]
fn f32_of(b: bf16) -> f32 {
    f32::from_bits(u32::from(b.to_bits()) << 16)
}

/// f32 → bf16 (round to nearest even) in parallel fixed chunks, each vectorised (AVX-512 where
/// the CPU has it, picked at run time; the same per-element result either way).
pub(crate) fn narrow(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    out.par_chunks_mut(CAST_CHUNK)
        .zip(v.par_chunks(CAST_CHUNK))
        .for_each(|(o, i)| convert(i, o, |x| bf16::from_bits(bf16_bits(x))));
    out
}

/// bf16 → f32 in parallel fixed chunks (exact).
pub(crate) fn widen(v: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    out.par_chunks_mut(CAST_CHUNK).zip(v.par_chunks(CAST_CHUNK)).for_each(|(o, i)| convert(i, o, f32_of));
    out
}

/// `dst[i] = f(src[i])`, compiled a second time for AVX-512 and picked at run time.
#[inline(always)]
fn convert<S: Copy, D>(src: &[S], dst: &mut [D], f: impl Fn(S) -> D) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the features this function is compiled for were just detected.
            return unsafe { convert_avx512(src, dst, f) };
        }
    }
    convert_generic(src, dst, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn convert_avx512<S: Copy, D>(src: &[S], dst: &mut [D], f: impl Fn(S) -> D) {
    convert_generic(src, dst, f)
}

#[inline(always)]
fn convert_generic<S: Copy, D>(src: &[S], dst: &mut [D], f: impl Fn(S) -> D) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*s);
    }
}
