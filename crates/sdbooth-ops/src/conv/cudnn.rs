//! conv2d forward, backward-data (input gradient) and backward-filter (weight gradient) through
//! cuDNN, with the `cudnn` feature: cudarc's safe cuDNN API on candle's CUDA storage, on candle's
//! stream.
//!
//! Per thread and GPU (cuDNN handles are neither `Send` nor `Sync`, as candle's own cuDNN
//! forward also notes) this keeps one cuDNN handle, a [`Plan`] per convolution shape and dtype
//! (the descriptors, and each direction's algorithm as cuDNN's heuristics pick it on first use),
//! and one workspace buffer that grows to the largest request and is then reused.
//! bf16/f16 operands compute with f32 accumulation (compute type f32), tensor-op math allowed;
//! f32 uses f32 compute without TF32 conversion (cuDNN's default math for f32 descriptors).
//!
//! Compiled only with `--features cudnn`; checked against the CPU by `sdbooth selftest --device
//! cuda` on a GPU.

use super::Geom;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
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

/// The descriptors of one convolution shape and dtype, and the algorithms picked for it.
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
    /// Keyed by geometry and dtype; each value is a `Plan<T>` for that dtype's `T`.
    plans: HashMap<(GeomKey, DType), Box<dyn Any>>,
    workspace: Option<CudaSlice<u8>>,
}

type GeomKey = [usize; 9];

fn key(g: &Geom) -> GeomKey {
    [g.b, g.cin, g.h, g.w, g.cout, g.kh, g.kw, g.stride, g.pad]
}

thread_local! {
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

fn err(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("conv2d (cuDNN): {what}: {e}"))
}

fn dims_i32(d: [usize; 4]) -> [i32; 4] {
    d.map(|v| v as i32)
}

impl<T: Elem> Plan<T> {
    fn new(cudnn: &Arc<Cudnn>, g: &Geom) -> Result<Self> {
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let (p, s) = (g.pad as i32, g.stride as i32);
        let mut conv = cudnn
            .create_conv2d::<T::Compute>(
                [p, p],
                [s, s],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(|e| err("convolution descriptor", e))?;
        if matches!(T::DTYPE, DType::BF16 | DType::F16) {
            conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
                .map_err(|e| err("math type", e))?;
        }
        Ok(Plan {
            conv,
            x: cudnn
                .create_4d_tensor::<T>(nchw, dims_i32(g.x_dims()))
                .map_err(|e| err("input descriptor", e))?,
            w: cudnn
                .create_4d_filter::<T>(nchw, dims_i32(g.w_dims()))
                .map_err(|e| err("filter descriptor", e))?,
            y: cudnn
                .create_4d_tensor::<T>(nchw, dims_i32(g.y_dims()))
                .map_err(|e| err("output descriptor", e))?,
            forward: None,
            data: None,
            filter: None,
        })
    }
}

/// Runs `f` with this thread's state for `dev`: the plan for `g` and `T`, and the workspace slot
/// (see [`workspace`]).
fn with_plan<T: Elem, R>(
    dev: &CudaDevice,
    g: &Geom,
    f: impl FnOnce(&mut Plan<T>, &mut Option<CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    use std::collections::hash_map::Entry;
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let st = match state.entry(dev.id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let cudnn = Cudnn::new(dev.cuda_stream()).map_err(|e| err("handle", e))?;
                e.insert(DeviceState { cudnn, plans: HashMap::new(), workspace: None })
            }
        };
        let entry = match st.plans.entry((key(g), T::DTYPE)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Box::new(Plan::<T>::new(&st.cudnn, g)?)),
        };
        let Some(plan) = entry.downcast_mut::<Plan<T>>() else {
            bail!("conv2d (cuDNN): plan cache holds another dtype's plan")
        };
        f(plan, &mut st.workspace)
    })
}

/// The reused workspace, grown to at least `bytes` (none when cuDNN needs none).
fn workspace<'a>(
    slot: &'a mut Option<CudaSlice<u8>>,
    dev: &CudaDevice,
    bytes: usize,
) -> Result<Option<&'a mut CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    let big_enough = match slot {
        Some(w) => w.len() >= bytes,
        None => false,
    };
    if !big_enough {
        *slot = None; // free the smaller buffer before allocating the larger one
                      // Scratch space: its contents are never read before cuDNN writes them.
        *slot = Some(unsafe { dev.alloc::<u8>(bytes)? });
    }
    Ok(slot.as_mut())
}

fn operand<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("conv2d (cuDNN): operand is not contiguous (shape {:?})", l.shape())
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn output<T: Elem>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // beta = 0: cuDNN overwrites every element, so no zero fill is needed.
    unsafe { dev.alloc::<T>(len) }
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
        let algo = match plan.forward {
            Some(a) => a,
            None => *plan.forward.insert(op.pick_algorithm().map_err(|e| err("forward algorithm", e))?),
        };
        let ws = workspace(slot, dev, op.get_workspace_size(algo).map_err(|e| err("forward workspace", e))?)?;
        unsafe { op.launch(algo, ws, (T::from_f64(1.0), T::from_f64(0.0)), &xv, &wv, &mut y) }
            .map_err(|e| err("forward", e))
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
        let algo = match plan.data {
            Some(a) => a,
            None => *plan.data.insert(op.pick_algorithm().map_err(|e| err("backward-data algorithm", e))?),
        };
        let ws = workspace(
            slot,
            dev,
            op.get_workspace_size(algo).map_err(|e| err("backward-data workspace", e))?,
        )?;
        unsafe { op.launch(algo, ws, (T::from_f64(1.0), T::from_f64(0.0)), &mut dx, &wv, &dyv) }
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
        let algo = match plan.filter {
            Some(a) => a,
            None => {
                *plan.filter.insert(op.pick_algorithm().map_err(|e| err("backward-filter algorithm", e))?)
            }
        };
        let ws = workspace(
            slot,
            dev,
            op.get_workspace_size(algo).map_err(|e| err("backward-filter workspace", e))?,
        )?;
        unsafe { op.launch(algo, ws, (T::from_f64(1.0), T::from_f64(0.0)), &xv, &mut dw, &dyv) }
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
