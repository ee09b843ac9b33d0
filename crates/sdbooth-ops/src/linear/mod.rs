//! linear (`x @ wᵀ + b`): the contract and its candle custom ops.
//!
//! Forward is [`LinearOp`] (or [`LinearBiasOp`]); its backward applies one op per wanted
//! gradient, [`LinearGradInput`], [`LinearGradWeight`] and [`LinearGradBias`], each running the
//! kernel of its operands' device (`cpu.rs`).

pub(crate) mod cpu;

use crate::backend::{self, expect_dims, WeightGradOps};
use crate::cpu::{operand, same_dtype, storage_f32, storage_from_f32, with_operands, Precision};
use crate::reference;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `x @ w^T + b` over the last dimension of `x`.
///
/// On CPU one GEMM per product (forward, grad-input, grad-weight written in `[out, in]`), the
/// bias gradient a chunked row sum; untracked operands get no gradient and cost nothing. When an
/// operand of a product is bf16 it runs in bf16 with f32 sums (PyTorch autocast's linear); `x`
/// may stay f32 with a bf16 `w` (it is rounded to bf16 as it is packed), and the output and the
/// input gradient then are f32.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with(x, w, b, Precision::Stored)
}

/// [`linear`] with its products computed in `precision`. With [`Precision::Bf16`] and f32
/// operands on the CPU, all three products (forward, grad-input, grad-weight) run in bf16 with
/// f32 sums and every result, the weight gradient included, is f32. Devices without kernels of
/// this crate cast both operands to bf16 and the output back.
pub fn linear_with(x: &Tensor, w: &Tensor, b: Option<&Tensor>, precision: Precision) -> Result<Tensor> {
    if !backend::has_kernels(x.device()) {
        return match precision {
            Precision::Stored => reference::linear(x, w, b),
            Precision::Bf16 => {
                let (w, b) =
                    (crate::cast(w, DType::BF16)?, b.map(|b| crate::cast(b, DType::BF16)).transpose()?);
                crate::cast::in_bf16(x, |x| reference::linear(x, &w, b.as_ref()))
            }
        };
    }
    crate::tune_allocator();
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    if precision == Precision::Bf16 {
        crate::bf16_gemm::register_weight(&w);
    }
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBiasOp { precision }),
        None => x.apply_op2(&w, LinearOp { precision }),
    }
}

/// `(rows, in, out)` for `x[..., in]` and `w[out, in]`, validated.
fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
    let (Some((&k, lead)), &[out, k_w]) = (x.split_last(), w) else {
        bail!("linear: expected x[..., in] and 2-D weight, got {x:?} and {w:?}")
    };
    if k != k_w {
        bail!("linear: input has {k} features but weight expects {k_w}");
    }
    Ok((lead.iter().product(), k, out))
}

fn out_shape(x: &[usize], out: usize) -> Shape {
    let mut s = x.to_vec();
    if let Some(l) = s.last_mut() {
        *l = out;
    }
    Shape::from(s)
}

fn forward(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    b: Option<(&CpuStorage, &Layout)>,
    precision: Precision,
) -> Result<(CpuStorage, Shape)> {
    let (m, k, n) = dims(xl.dims(), wl.dims())?;
    same_dtype("linear", xs, ws)?;
    let bias = match b {
        Some((bs, bl)) => {
            if bl.dims() != [n] {
                bail!("linear: bias shape {:?}, expected [{n}]", bl.dims());
            }
            Some(storage_f32(bs, bl)?)
        }
        None => None,
    };
    let y = with_operands!((operand(xs, xl)?, operand(ws, wl)?), |x, w| cpu::forward(
        precision,
        m,
        k,
        n,
        x,
        w,
        bias.as_deref()
    ));
    Ok((storage_from_f32(y, xs.dtype())?, out_shape(xl.dims(), n)))
}

/// Forward `(x, w) -> x @ wᵀ`.
pub(crate) struct LinearOp {
    pub precision: Precision,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "sdbooth-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(s1, l1, s2, l2, None, self.precision)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = linear_grads(x, w, None, dy, self.precision)?;
        Ok((dx, dw))
    }
}

/// Forward `(x, w, b) -> x @ wᵀ + b`.
pub(crate) struct LinearBiasOp {
    pub precision: Precision,
}

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "sdbooth-linear-bias"
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
        forward(s1, l1, s2, l2, Some((s3, l3)), self.precision)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = linear_grads(x, w, Some(b), dy, self.precision)?;
        Ok((dx, dw, db))
    }
}

/// The gradients of linear's tracked operands, one backward op each.
fn linear_grads(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    dy: &Tensor,
    precision: Precision,
) -> Result<[Option<Tensor>; 3]> {
    let (rows, inp, out) = dims(x.dims(), w.dims())?;
    let geom = Geom { rows, inp, out, precision };
    let bias_dtype = b.map_or(x.dtype(), |b| b.dtype());
    let ops = WeightGradOps {
        input: &|dy| dy.apply_op2_no_bwd(w, &LinearGradInput { geom, x_shape: x.shape().clone() }),
        weight: &|dy| x.apply_op2_no_bwd(dy, &LinearGradWeight { geom, dtype: w.dtype() }),
        bias: &|dy| dy.apply_op1_no_bwd(&LinearGradBias { geom, dtype: bias_dtype }),
    };
    backend::weight_op_grads((x, w, b), dy, backend::has_kernels(dy.device()), reference::linear, ops)
}

/// `x` flattened to `[rows, inp]`, `w` is `[out, inp]`.
#[derive(Clone, Copy)]
pub(crate) struct Geom {
    rows: usize,
    inp: usize,
    out: usize,
    /// What the products run in (that of the forward).
    precision: Precision,
}

impl Geom {
    fn dy_dims(&self) -> [usize; 2] {
        [self.rows, self.out]
    }
}

/// The row count of an operand whose last dimension is `width` (the flattened `[rows, width]`).
fn flat_dims(dims: &[usize], width: usize) -> [usize; 2] {
    [dims.iter().product::<usize>() / width.max(1), dims.last().copied().unwrap_or(0)]
}

/// Backward `(dy, w) -> dx = dy · w`, in `x`'s shape.
pub(crate) struct LinearGradInput {
    pub geom: Geom,
    pub x_shape: Shape,
}

impl CustomOp2 for LinearGradInput {
    fn name(&self) -> &'static str {
        "sdbooth-linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Geom { rows, inp, out, precision } = self.geom;
        expect_dims(self.name(), "output gradient", &flat_dims(l1.dims(), out), &self.geom.dy_dims())?;
        expect_dims(self.name(), "weight", l2.dims(), &[out, inp])?;
        let dx = with_operands!((operand(s2, l2)?, operand(s1, l1)?), |w, dy| cpu::grad_input(
            precision, rows, inp, out, w, dy
        ));
        // dx takes the dtype of dy, which is that of the output and so of x.
        Ok((storage_from_f32(dx, s1.dtype())?, self.x_shape.clone()))
    }
}

/// Backward `(x, dy) -> dw = dyᵀ · x`, written in `[out, in]`.
pub(crate) struct LinearGradWeight {
    pub geom: Geom,
    /// The weight's dtype, which may differ from the activations' (bf16 weights, f32 activations).
    pub dtype: DType,
}

impl CustomOp2 for LinearGradWeight {
    fn name(&self) -> &'static str {
        "sdbooth-linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Geom { rows, inp, out, precision } = self.geom;
        expect_dims(self.name(), "input", &flat_dims(l1.dims(), inp), &[rows, inp])?;
        expect_dims(self.name(), "output gradient", &flat_dims(l2.dims(), out), &self.geom.dy_dims())?;
        let dw = with_operands!((operand(s1, l1)?, operand(s2, l2)?), |x, dy| cpu::grad_weight(
            precision, rows, inp, out, x, dy
        ));
        Ok((storage_from_f32(dw, self.dtype)?, Shape::from((out, inp))))
    }
}

/// Backward `dy -> db = Σ_rows dy`.
pub(crate) struct LinearGradBias {
    pub geom: Geom,
    /// The bias's dtype, which may differ from the activations'.
    pub dtype: DType,
}

impl CustomOp1 for LinearGradBias {
    fn name(&self) -> &'static str {
        "sdbooth-linear-grad-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.geom.out;
        expect_dims(self.name(), "output gradient", &flat_dims(l.dims(), out), &self.geom.dy_dims())?;
        let db = cpu::grad_bias(out, &storage_f32(s, l)?);
        Ok((storage_from_f32(db, self.dtype)?, Shape::from(out)))
    }
}
