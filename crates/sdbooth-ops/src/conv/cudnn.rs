//! conv2d forward, backward-data (input gradient) and backward-filter (weight gradient) through
//! cuDNN, with the `cudnn` feature: cudarc's safe cuDNN API on candle's CUDA storage, on candle's
//! stream.
//!
//! Per thread and GPU (cuDNN handles are neither `Send` nor `Sync`, as candle's own cuDNN
//! forward also notes) this keeps one cuDNN handle, a [`Plan`] per convolution ([`Params`]) and
//! dtype (the descriptors, and each direction's algorithm as cuDNN's heuristics pick it on first
//! use), and one workspace buffer that grows to the largest request and is then reused. When the
//! picked algorithm's workspace cannot be allocated, that direction falls back for good to an
//! algorithm that needs none. bf16/f16 operands compute with f32 accumulation (compute type f32),
//! tensor cores allowed; f32 computes with FMA kernels only, no TF32, unless `--allow_tf32`
//! (candle's reduced-precision f32 switch) is on (see [`math`]).
//!
//! Operands must be contiguous NCHW (KCRS for the filter): `conv2d` makes `x` and `w` contiguous
//! before the forward and `backend::weight_op_grads` makes `dy` contiguous before the gradients.
//!
//! Compiled only with `--features cudnn`; checked against the CPU by `sdbooth selftest --device
//! cuda` on a GPU (conv2d forward, dx, dw and the bias gradient, in f32, bf16 and f16).

use super::cudnn_params::{math, Math, Params};
use super::Geom;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, CudnnError,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// An element type cuDNN convolves, and the type it accumulates in.
trait Elem: WithDType + CudaDType + CudnnDataType + DeviceRepr {
    type Compute: CudnnDataType + 'static;
}
impl Elem for f32 {
    type Compute = f32;
}
impl Elem for f64 {
    type Compute = f64;
}
impl Elem for bf16 {
    type Compute = f32;
}
impl Elem for f16 {
    type Compute = f32;
}

/// The descriptors of one convolution and dtype, and the algorithms picked for it.
struct Plan<T: Elem> {
    conv: ConvDescriptor<T::Compute>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    forward: Option<sys::cudnnConvolutionFwdAlgo_t>,
    data: Option<sys::cudnnConvolutionBwdDataAlgo_t>,
    filter: Option<sys::cudnnConvolutionBwdFilterAlgo_t>,
}

/// What one thread keeps for one GPU.
struct DeviceState {
    cudnn: Arc<Cudnn>,
    /// Each value is a `Plan<T>` for its key's dtype's `T`.
    plans: HashMap<(Params, DType, Math), Box<dyn Any>>,
    workspace: Option<CudaSlice<u8>>,
}

thread_local! {
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

fn err(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("conv2d (cuDNN): {what}: {e}"))
}

impl<T: Elem> Plan<T> {
    fn new(cudnn: &Arc<Cudnn>, p: &Params, math: Math) -> Result<Self> {
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let mut conv = cudnn
            .create_conv2d::<T::Compute>(
                p.pad,
                p.stride,
                p.dilation,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(|e| err("convolution descriptor", e))?;
        let math_type = match math {
            Math::Fma => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            Math::TensorOp => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            Math::Default => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        };
        conv.set_math_type(math_type).map_err(|e| err("math type", e))?;
        Ok(Plan {
            conv,
            x: cudnn.create_4d_tensor::<T>(nchw, p.x).map_err(|e| err("input descriptor", e))?,
            w: cudnn.create_4d_filter::<T>(nchw, p.w).map_err(|e| err("filter descriptor", e))?,
            y: cudnn.create_4d_tensor::<T>(nchw, p.y).map_err(|e| err("output descriptor", e))?,
            forward: None,
            data: None,
            filter: None,
        })
    }
}

/// Runs `f` with this thread's state for `dev`: the plan for `g` and `T`, and the workspace slot.
fn with_plan<T: Elem, R>(
    dev: &CudaDevice,
    g: &Geom,
    f: impl FnOnce(&mut Plan<T>, &mut Option<CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    use std::collections::hash_map::Entry;
    let params = Params::new(g)?;
    let math_mode = math(T::DTYPE, candle_core::cuda_backend::gemm_reduced_precision_f32());
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let st = match state.entry(dev.id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let cudnn = Cudnn::new(dev.cuda_stream()).map_err(|e| err("handle", e))?;
                e.insert(DeviceState { cudnn, plans: HashMap::new(), workspace: None })
            }
        };
        let entry = match st.plans.entry((params, T::DTYPE, math_mode)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Box::new(Plan::<T>::new(&st.cudnn, &params, math_mode)?)),
        };
        let Some(plan) = entry.downcast_mut::<Plan<T>>() else {
            bail!("conv2d (cuDNN): plan cache holds another dtype's plan")
        };
        f(plan, &mut st.workspace)
    })
}

/// Grows the reused workspace to at least `bytes`.
fn grow(slot: &mut Option<CudaSlice<u8>>, dev: &CudaDevice, bytes: usize) -> Result<()> {
    if bytes == 0 || slot.as_ref().is_some_and(|w| w.len() >= bytes) {
        return Ok(());
    }
    // Free the smaller buffer before allocating the larger one.
    *slot = None;
    // Scratch space: its contents are never read before cuDNN writes them.
    *slot = Some(unsafe { dev.alloc::<u8>(bytes)? });
    Ok(())
}

/// One direction's algorithm and the workspace to run it with (none when it needs none). The
/// first call asks cuDNN's heuristics (`pick`) and keeps the answer in `cached`. When that
/// algorithm's workspace cannot be allocated (GPU memory is short), `lean`, an algorithm that
/// needs no workspace, replaces it for this plan from then on.
fn algorithm_and_workspace<'s, A: Copy + PartialEq>(
    direction: &str,
    cached: &mut Option<A>,
    pick: impl FnOnce() -> std::result::Result<A, CudnnError>,
    workspace_size: impl Fn(A) -> std::result::Result<usize, CudnnError>,
    lean: A,
    (slot, dev): (&'s mut Option<CudaSlice<u8>>, &CudaDevice),
) -> Result<(A, Option<&'s mut CudaSlice<u8>>)> {
    let size = |algo| workspace_size(algo).map_err(|e| err(&format!("{direction} workspace size"), e));
    let mut algo = match *cached {
        Some(a) => a,
        None => *cached.insert(pick().map_err(|e| err(&format!("{direction} algorithm"), e))?),
    };
    let mut bytes = size(algo)?;
    if let Err(e) = grow(slot, dev, bytes) {
        if algo == lean {
            return Err(err(&format!("{direction} workspace of {bytes} bytes"), e));
        }
        tracing::debug!(
            "conv2d (cuDNN): {direction} workspace of {bytes} bytes: {e}; using an algorithm without"
        );
        algo = *cached.insert(lean);
        bytes = size(algo)?;
        grow(slot, dev, bytes).map_err(|e| err(&format!("{direction} workspace of {bytes} bytes"), e))?;
    }
    Ok((algo, if bytes == 0 { None } else { slot.as_mut() }))
}

fn operand<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("conv2d (cuDNN): operand is not contiguous (shape {:?})", l.shape())
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn output<T: Elem>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // beta = 0: cuDNN overwrites every element, so no zero fill is needed.
    unsafe { dev.alloc::<T>(len) }
}

/// alpha = 1, beta = 0: the result replaces the output buffer's contents.
fn scaling<T: Elem>() -> (T, T) {
    (T::from_f64(1.0), T::from_f64(0.0))
}

fn forward_t<T: Elem>(
    g: &Geom,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, wv) = (operand::<T>(x.0, x.1)?, operand::<T>(w.0, w.1)?);
    let mut y = output::<T>(dev, g.y_dims().iter().product())?;
    with_plan::<T, _>(dev, g, |plan, slot| {
        let op = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
        let (algo, ws) = algorithm_and_workspace(
            "forward",
            &mut plan.forward,
            || op.pick_algorithm(),
            |a| op.get_workspace_size(a),
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            (slot, dev),
        )?;
        unsafe { op.launch(algo, ws, scaling::<T>(), &xv, &wv, &mut y) }.map_err(|e| err("forward", e))
    })?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

fn grad_input_t<T: Elem>(
    g: &Geom,
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &w.0.device;
    let (wv, dyv) = (operand::<T>(w.0, w.1)?, operand::<T>(dy.0, dy.1)?);
    let mut dx = output::<T>(dev, g.x_dims().iter().product())?;
    with_plan::<T, _>(dev, g, |plan, slot| {
        let op = ConvBackwardData { conv: &plan.conv, dx: &plan.x, w: &plan.w, dy: &plan.y };
        let (algo, ws) = algorithm_and_workspace(
            "backward-data",
            &mut plan.data,
            || op.pick_algorithm(),
            |a| op.get_workspace_size(a),
            sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
            (slot, dev),
        )?;
        unsafe { op.launch(algo, ws, scaling::<T>(), &mut dx, &wv, &dyv) }
            .map_err(|e| err("backward-data", e))
    })?;
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

fn grad_weight_t<T: Elem>(
    g: &Geom,
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.0.device;
    let (xv, dyv) = (operand::<T>(x.0, x.1)?, operand::<T>(dy.0, dy.1)?);
    let mut dw = output::<T>(dev, g.w_dims().iter().product())?;
    with_plan::<T, _>(dev, g, |plan, slot| {
        let op = ConvBackwardFilter { conv: &plan.conv, x: &plan.x, dw: &plan.w, dy: &plan.y };
        let (algo, ws) = algorithm_and_workspace(
            "backward-filter",
            &mut plan.filter,
            || op.pick_algorithm(),
            |a| op.get_workspace_size(a),
            sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            (slot, dev),
        )?;
        unsafe { op.launch(algo, ws, scaling::<T>(), &xv, &mut dw, &dyv) }
            .map_err(|e| err("backward-filter", e))
    })?;
    Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
}

/// Dispatches on the operands' dtype (they share one, checked by the caller's geometry/dtype
/// validation).
macro_rules! by_dtype {
    ($f:ident, $dtype:expr, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            other => bail!("conv2d (cuDNN): unsupported dtype {other:?}"),
        }
    };
}

fn same_dtype(a: &CudaStorage, b: &CudaStorage) -> Result<DType> {
    use candle_core::backend::BackendStorage;
    if a.dtype() != b.dtype() {
        bail!("conv2d (cuDNN): operand dtypes differ ({:?}, {:?})", a.dtype(), b.dtype());
    }
    Ok(a.dtype())
}

/// `y = conv2d(x, w)` (no bias).
pub(crate) fn forward(
    g: &Geom,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    by_dtype!(forward_t, same_dtype(x.0, w.0)?, g, x, w)
}

/// The input gradient from the weight and the output gradient.
pub(crate) fn grad_input(
    g: &Geom,
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    by_dtype!(grad_input_t, same_dtype(w.0, dy.0)?, g, w, dy)
}

/// The weight gradient (summed over the batch) from the input and the output gradient.
pub(crate) fn grad_weight(
    g: &Geom,
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    by_dtype!(grad_weight_t, same_dtype(x.0, dy.0)?, g, x, dy)
}
