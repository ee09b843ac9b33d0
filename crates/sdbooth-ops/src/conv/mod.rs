//! conv2d: the contract (geometry, shapes, dtypes) and its candle custom ops.
//!
//! Forward is [`Conv2dOp`] (or [`Conv2dBiasOp`] with the bias fused); its backward applies one
//! op per wanted gradient, [`Conv2dGradInput`], [`Conv2dGradWeight`] and [`Conv2dGradBias`], so
//! each runs the kernel of the device its operands live on (`cpu.rs`; `cudnn.rs` on CUDA with the
//! `cudnn` feature, where the bias is a broadcast add instead). Nothing is saved between forward
//! and backward but the operands themselves. Devices without either run `generic.rs`.

pub(crate) mod cpu;
#[cfg(feature = "cudnn")]
mod cudnn;
#[cfg(any(feature = "cudnn", test))]
mod cudnn_params;
pub(crate) mod generic;

use crate::backend::{self, expect_dims, WeightGradOps};
use crate::cpu::{operand, same_dtype, storage_f32, storage_from_f32, with_operands, Precision};
use crate::reference;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// 2-D convolution, PyTorch semantics (dilation 1, one group). `x` is `[B, Cin, H, W]`, `w` is
/// `[Cout, Cin, kh, kw]`, `b` is `[Cout]`. Any kernel size, stride and padding is accepted; the
/// CPU kernel is tuned for SD's 3x3 (stride 1 and 2, padding 1) and 1x1. bf16 operands compute in
/// bf16 with f32 sums (PyTorch autocast's conv2d). Devices without our kernels run
/// [`generic::conv2d`] (candle's forward, a backward of GEMMs and forward convolutions).
/// With the `cudnn` feature, CUDA runs forward and gradients through cuDNN.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_with(x, w, b, stride, padding, Precision::Stored)
}

/// [`conv2d`] with its products computed in `precision`. With [`Precision::Bf16`] and f32
/// operands on the CPU, all three products run in bf16 with f32 sums and every result, the
/// weight gradient included, is f32. Other devices cast both operands to bf16 and the output
/// back.
pub fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    precision: Precision,
) -> Result<Tensor> {
    if precision == Precision::Bf16 && !backend::has_kernels(x.device()) {
        let (w, b) = (crate::cast(w, DType::BF16)?, b.map(|b| crate::cast(b, DType::BF16)).transpose()?);
        return crate::cast::in_bf16(x, |x| conv2d(x, &w, b.as_ref(), stride, padding));
    }
    if !has_conv_kernels(x.device()) {
        return generic::conv2d(x, w, b, stride, padding);
    }
    let on_cpu = x.device().is_cpu();
    if on_cpu {
        crate::tune_allocator();
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    if on_cpu && precision == Precision::Bf16 {
        crate::bf16_gemm::register_weight(&w);
    }
    match b {
        Some(b) if on_cpu => {
            x.apply_op3(&w, &b.contiguous()?, Conv2dBiasOp { stride, pad: padding, precision })
        }
        Some(b) => {
            let y = x.apply_op2(&w, Conv2dOp { stride, pad: padding, precision })?;
            expect_dims("conv2d", "bias", b.dims(), &[y.dim(1)?])?;
            // Any bias dtype, as on the CPU (its gradient comes back in its own dtype).
            y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, b.dim(0)?, 1, 1))?)
        }
        None => x.apply_op2(&w, Conv2dOp { stride, pad: padding, precision }),
    }
}

/// Whether conv2d's custom ops have kernels on `device`: ours on the CPU, cuDNN's on CUDA with
/// the `cudnn` feature.
fn has_conv_kernels(device: &candle_core::Device) -> bool {
    backend::has_kernels(device) || (cfg!(feature = "cudnn") && device.is_cuda())
}

/// FLOPs of one conv2d forward (for benchmarks): `2·B·Cout·Cin·kh·kw·Ho·Wo`.
pub fn conv2d_flops(x_dims: &[usize], w_dims: &[usize], stride: usize, padding: usize) -> Result<f64> {
    Ok(Geom::new(x_dims, w_dims, stride, padding)?.flops())
}

/// Geometry of one convolution, validated once.
#[derive(Clone, Copy, Debug)]
pub struct Geom {
    pub b: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    pub fn new(x: &[usize], wt: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, cin, h, w], &[cout, cin_w, kh, kw]) = (x, wt) else {
            bail!("conv2d: expected 4-D input and weight, got {x:?} and {wt:?}")
        };
        if cin != cin_w {
            bail!("conv2d: input has {cin} channels but weight expects {cin_w}");
        }
        if stride == 0 {
            bail!("conv2d: stride must be positive");
        }
        if h + 2 * pad < kh || w + 2 * pad < kw || kh == 0 || kw == 0 {
            bail!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{w} (padding {pad})");
        }
        let ho = (h + 2 * pad - kh) / stride + 1;
        let wo = (w + 2 * pad - kw) / stride + 1;
        Ok(Geom { b, cin, h, w, cout, kh, kw, stride, pad, ho, wo })
    }
    pub(crate) fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    pub(crate) fn p(&self) -> usize {
        self.ho * self.wo
    }
    /// 1x1, stride 1, no padding: the input plane already is the column matrix.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// FLOPs of the forward pass (multiply-add = 2).
    pub fn flops(&self) -> f64 {
        2.0 * (self.b * self.cout * self.k() * self.p()) as f64
    }
    fn x_dims(&self) -> [usize; 4] {
        [self.b, self.cin, self.h, self.w]
    }
    fn w_dims(&self) -> [usize; 4] {
        [self.cout, self.cin, self.kh, self.kw]
    }
    fn y_dims(&self) -> [usize; 4] {
        [self.b, self.cout, self.ho, self.wo]
    }
}

/// Forward `(x, w) -> y`.
pub(crate) struct Conv2dOp {
    pub stride: usize,
    pub pad: usize,
    pub precision: Precision,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        same_dtype("conv2d", s1, s2)?;
        let y = with_operands!((operand(s1, l1)?, operand(s2, l2)?), |x, w| cpu::forward(
            &g,
            self.precision,
            x,
            w
        ));
        Ok((storage_from_f32(y, s1.dtype())?, Shape::from(&g.y_dims())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        Ok((cudnn::forward(&g, (s1, l1), (s2, l2))?, Shape::from(&g.y_dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = conv2d_grads(x, w, None, dy, (self.stride, self.pad), self.precision)?;
        Ok((dx, dw))
    }
}

/// Forward `(x, w, b) -> y` with the bias fused: the GEMM starts from the bias planes.
pub(crate) struct Conv2dBiasOp {
    pub stride: usize,
    pub pad: usize,
    pub precision: Precision,
}

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d-bias"
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
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        same_dtype("conv2d", s1, s2)?;
        expect_dims("conv2d", "bias", l3.dims(), &[g.cout])?;
        let b = storage_f32(s3, l3)?;
        let y = with_operands!((operand(s1, l1)?, operand(s2, l2)?), |x, w| cpu::forward_bias(
            &g,
            self.precision,
            x,
            w,
            Some(&b)
        ));
        Ok((storage_from_f32(y, s1.dtype())?, Shape::from(&g.y_dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = conv2d_grads(x, w, Some(b), dy, (self.stride, self.pad), self.precision)?;
        Ok((dx, dw, db))
    }
}

/// The gradients of conv2d's tracked operands, one backward op each; an untracked operand
/// (frozen weight, frozen upstream) gets none and costs nothing.
fn conv2d_grads(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    dy: &Tensor,
    (stride, pad): (usize, usize),
    precision: Precision,
) -> Result<[Option<Tensor>; 3]> {
    let geom = Geom::new(x.dims(), w.dims(), stride, pad)?;
    let bias_dtype = b.map_or(x.dtype(), |b| b.dtype());
    let ops = WeightGradOps {
        input: &|dy| w.apply_op2_no_bwd(dy, &Conv2dGradInput { geom, precision }),
        weight: &|dy| x.apply_op2_no_bwd(dy, &Conv2dGradWeight { geom, dtype: w.dtype(), precision }),
        bias: &|dy| dy.apply_op1_no_bwd(&Conv2dGradBias { geom, dtype: bias_dtype }),
    };
    let kernels = has_conv_kernels(dy.device());
    backend::weight_op_grads((x, w, b), dy, kernels, |x, w, b| reference::conv2d(x, w, b, stride, pad), ops)
}

/// Backward `(w, dy) -> dx`.
pub(crate) struct Conv2dGradInput {
    pub geom: Geom,
    /// What the product runs in (that of the forward).
    pub precision: Precision,
}

impl Conv2dGradInput {
    /// The geometry, after checking the operands `(w, dy)` have its shapes.
    fn checked(&self, w: &Layout, dy: &Layout) -> Result<&Geom> {
        let g = &self.geom;
        expect_dims(self.name(), "weight", w.dims(), &g.w_dims())?;
        expect_dims(self.name(), "output gradient", dy.dims(), &g.y_dims())?;
        Ok(g)
    }
}

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.checked(l1, l2)?;
        let dx = with_operands!((operand(s1, l1)?, operand(s2, l2)?), |w, dy| cpu::grad_input(
            g,
            self.precision,
            w,
            dy
        ));
        // dx takes the dtype of dy, which is that of the output and so of x.
        Ok((storage_from_f32(dx, s2.dtype())?, Shape::from(&g.x_dims())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.checked(l1, l2)?;
        Ok((cudnn::grad_input(g, (s1, l1), (s2, l2))?, Shape::from(&g.x_dims())))
    }
}

/// Backward `(x, dy) -> dw`, summed over the batch.
pub(crate) struct Conv2dGradWeight {
    pub geom: Geom,
    /// The weight's dtype, which may differ from the activations' (bf16 weights, f32 activations).
    pub dtype: DType,
    /// What the product runs in (that of the forward).
    pub precision: Precision,
}

impl Conv2dGradWeight {
    /// The geometry, after checking the operands `(x, dy)` have its shapes.
    fn checked(&self, x: &Layout, dy: &Layout) -> Result<&Geom> {
        let g = &self.geom;
        expect_dims(self.name(), "input", x.dims(), &g.x_dims())?;
        expect_dims(self.name(), "output gradient", dy.dims(), &g.y_dims())?;
        Ok(g)
    }
}

impl CustomOp2 for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.checked(l1, l2)?;
        let dw = with_operands!((operand(s1, l1)?, operand(s2, l2)?), |x, dy| cpu::grad_weight(
            g,
            self.precision,
            x,
            dy
        ));
        Ok((storage_from_f32(dw, self.dtype)?, Shape::from(&g.w_dims())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.checked(l1, l2)?;
        Ok((cudnn::grad_weight(g, (s1, l1), (s2, l2))?, Shape::from(&g.w_dims())))
    }
}

/// Backward `dy -> db`: per output channel, the sum of dy over batch and plane.
pub(crate) struct Conv2dGradBias {
    pub geom: Geom,
    /// The bias's dtype, which may differ from the activations'.
    pub dtype: DType,
}

impl CustomOp1 for Conv2dGradBias {
    fn name(&self) -> &'static str {
        "sdbooth-conv2d-grad-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        expect_dims(self.name(), "output gradient", l.dims(), &g.y_dims())?;
        let db = cpu::grad_bias(g, &storage_f32(s, l)?);
        Ok((storage_from_f32(db, self.dtype)?, Shape::from(g.cout)))
    }
}
