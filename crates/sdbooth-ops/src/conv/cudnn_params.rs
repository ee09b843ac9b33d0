//! What conv2d tells cuDNN, as plain values: the descriptors' dimensions and convolution
//! parameters and the math mode (together with the dtype, the plan-cache key). Kept apart from
//! `cudnn.rs`, which needs the `cudnn` feature and a GPU, so that the CPU tests check it.

use super::Geom;
use candle_core::{bail, DType, Result};

/// Everything cuDNN's descriptors of one convolution are built from, as cuDNN's `int`s. Two
/// convolutions with equal `Params` (and dtype) share descriptors and algorithms, so this is the
/// plan-cache key by construction: no parameter can be left out of one and not the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Params {
    /// NCHW input, fully packed.
    pub x: [i32; 4],
    /// KCRS filter (`[Cout, Cin, kh, kw]`), fully packed.
    pub w: [i32; 4],
    /// NCHW output, fully packed.
    pub y: [i32; 4],
    pub pad: [i32; 2],
    pub stride: [i32; 2],
    /// Always 1: conv2d's contract has no dilation (nor groups: cuDNN's default count of 1 stays).
    pub dilation: [i32; 2],
}

impl Params {
    pub fn new(g: &Geom) -> Result<Self> {
        let int = |what: &str, v: usize| -> Result<i32> {
            match i32::try_from(v) {
                Ok(v) => Ok(v),
                Err(_) => bail!("conv2d (cuDNN): {what} {v} exceeds cuDNN's 32-bit dimensions"),
            }
        };
        let dims = |what: &str, d: [usize; 4]| -> Result<[i32; 4]> {
            Ok([int(what, d[0])?, int(what, d[1])?, int(what, d[2])?, int(what, d[3])?])
        };
        let (pad, stride) = (int("padding", g.pad)?, int("stride", g.stride)?);
        Ok(Params {
            x: dims("input dimension", g.x_dims())?,
            w: dims("weight dimension", g.w_dims())?,
            y: dims("output dimension", g.y_dims())?,
            pad: [pad, pad],
            stride: [stride, stride],
            dilation: [1, 1],
        })
    }
}

/// The math mode of a convolution descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Math {
    /// FMA kernels only: f32 without `--allow_tf32`. cuDNN's default math lets Ampere and newer
    /// GPUs round f32 operands to TF32 (~1e-3 relative error), and such a run asks for f32.
    Fma,
    /// Tensor cores allowed; the compute type (f32) keeps the accumulation in f32.
    TensorOp,
    /// cuDNN's default: f32 with `--allow_tf32` (TF32 allowed on Ampere and newer), f64.
    Default,
}

/// The math mode for operands of `dtype`; `allow_tf32` is `--allow_tf32` (candle's switch for
/// reduced-precision f32 GEMMs, which the trainer sets from it).
pub(crate) fn math(dtype: DType, allow_tf32: bool) -> Math {
    match dtype {
        DType::F32 if allow_tf32 => Math::Default,
        DType::F32 => Math::Fma,
        DType::BF16 | DType::F16 => Math::TensorOp,
        _ => Math::Default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Params {
        Params::new(&Geom::new(x, w, stride, pad).unwrap()).unwrap()
    }

    /// SD's U-Net convolutions: the descriptors get NCHW / KCRS dims, padding and stride on both
    /// axes, dilation 1.
    #[test]
    fn sd_convolutions_map_to_descriptor_parameters() {
        let p = params(&[2, 320, 64, 64], &[320, 320, 3, 3], 1, 1);
        assert_eq!(p.x, [2, 320, 64, 64]);
        assert_eq!(p.w, [320, 320, 3, 3]);
        assert_eq!(p.y, [2, 320, 64, 64]);
        assert_eq!((p.pad, p.stride, p.dilation), ([1, 1], [1, 1], [1, 1]));

        let p = params(&[1, 640, 32, 48], &[640, 640, 3, 3], 2, 1);
        assert_eq!(p.y, [1, 640, 16, 24]);
        assert_eq!((p.pad, p.stride), ([1, 1], [2, 2]));

        let p = params(&[1, 4, 64, 64], &[320, 4, 1, 1], 1, 0);
        assert_eq!((p.w, p.y, p.pad), ([320, 4, 1, 1], [1, 320, 64, 64], [0, 0]));
    }

    /// The output descriptor must have the dims cuDNN derives itself
    /// (cudnnGetConvolution2dForwardOutputDim: `1 + (in + 2·pad − ((k − 1)·dilation + 1)) / stride`),
    /// or every call fails with CUDNN_STATUS_BAD_PARAM; checked over odd sizes, strides and pads.
    #[test]
    fn output_descriptor_has_cudnns_output_dims() {
        let cudnn_out = |i: i32, k: i32, p: &Params, axis: usize| {
            1 + (i + 2 * p.pad[axis] - ((k - 1) * p.dilation[axis] + 1)) / p.stride[axis]
        };
        for (h, w) in [(5, 7), (12, 10), (13, 12), (64, 96)] {
            for (kh, kw) in [(1, 1), (3, 3), (1, 3), (5, 3)] {
                for stride in 1..=3 {
                    for pad in 0..=2 {
                        let Ok(g) = Geom::new(&[2, 3, h, w], &[4, 3, kh, kw], stride, pad) else {
                            continue;
                        };
                        let p = Params::new(&g).unwrap();
                        assert_eq!(p.y[0..2], [2, 4]);
                        assert_eq!(
                            p.y[2],
                            cudnn_out(p.x[2], p.w[2], &p, 0),
                            "{h}x{w} k{kh}x{kw} s{stride} p{pad}"
                        );
                        assert_eq!(
                            p.y[3],
                            cudnn_out(p.x[3], p.w[3], &p, 1),
                            "{h}x{w} k{kh}x{kw} s{stride} p{pad}"
                        );
                    }
                }
            }
        }
    }

    /// Two convolutions with the same tensor shapes but another stride and padding
    /// (5x5, 3x3 kernel: stride 1 pad 0 and stride 2 pad 1 both give 3x3) must not share a plan.
    #[test]
    fn cache_key_separates_equal_shapes_with_other_parameters() {
        let a = params(&[1, 8, 5, 5], &[8, 8, 3, 3], 1, 0);
        let b = params(&[1, 8, 5, 5], &[8, 8, 3, 3], 2, 1);
        assert_eq!((a.x, a.w, a.y), (b.x, b.w, b.y));
        assert_ne!(a, b);
        assert_eq!(a, params(&[1, 8, 5, 5], &[8, 8, 3, 3], 1, 0));
    }

    /// A dimension beyond cuDNN's `int` is an error naming it, not a wrapped value.
    #[test]
    fn dimensions_beyond_i32_are_refused() {
        let big = i32::MAX as usize + 1;
        let g = Geom::new(&[1, 1, big, 1], &[1, 1, 1, 1], 1, 0).unwrap();
        let e = Params::new(&g).unwrap_err().to_string();
        assert!(e.contains("input dimension 2147483648"), "{e}");
    }

    /// f32 stays f32 (no TF32) unless `--allow_tf32`; half types may use tensor cores.
    #[test]
    fn math_mode_per_dtype() {
        assert_eq!(math(DType::F32, false), Math::Fma);
        assert_eq!(math(DType::F32, true), Math::Default);
        for allow_tf32 in [false, true] {
            assert_eq!(math(DType::BF16, allow_tf32), Math::TensorOp);
            assert_eq!(math(DType::F16, allow_tf32), Math::TensorOp);
            assert_eq!(math(DType::F64, allow_tf32), Math::Default);
        }
    }
}
