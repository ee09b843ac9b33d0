//! Which code path an op takes on a device, and the plumbing every op's backward shares.
//!
//! An op runs its own kernels (its `cpu.rs`, later `cuda.rs`) only where [`has_kernels`] says the
//! device has them; everywhere else it runs the composition of candle primitives in
//! [`crate::reference`](mod@crate::reference), whose backward candle's autograd gives.

use candle_core::{CpuStorage, Device, Result, Shape, Storage, Tensor, Var};
use std::sync::{Mutex, OnceLock};

/// The environment variable that sends the CPU down the reference path (see [`reference_ops_forced`]).
pub const REFERENCE_OPS_ENV: &str = "SDBOOTH_REFERENCE_OPS";

/// Whether `SDBOOTH_REFERENCE_OPS` is set (to anything but empty or `0`): then the CPU takes the
/// same path a device without kernels of this crate takes, the compositions of candle primitives
/// in [`crate::reference`](mod@crate::reference), so the generic (GPU) path can be tested on a machine without a GPU.
/// Read once per process, on the first call.
pub fn reference_ops_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os(REFERENCE_OPS_ENV).is_some_and(|v| !v.is_empty() && v != "0"))
}

/// Whether this crate's own kernels run on `device`: today the CPU, unless the reference path is
/// forced. A backend that gains kernels (e.g. `cuda.rs` beside an op's `cpu.rs`) is added here,
/// or in that op's dispatch if only some ops have kernels for it.
pub(crate) fn has_kernels(device: &Device) -> bool {
    device.is_cpu() && !reference_ops_forced()
}

/// Refuses an operand whose shape is not the one the op's geometry implies (an error inside the
/// crate: the public functions validate shapes before any kernel runs).
pub(crate) fn expect_dims(op: &str, operand: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        candle_core::bail!("{op}: {operand} has shape {got:?}, expected {want:?}");
    }
    Ok(())
}

/// `Some(f())` when the operand's gradient is wanted; an untracked operand costs nothing.
pub(crate) fn grad_if(wanted: bool, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if wanted {
        f().map(Some)
    } else {
        Ok(None)
    }
}

/// A result of a custom op beyond the one it returns to candle (candle's custom ops have one
/// output): a forward's saved statistics, or the further gradients of a backward that computes
/// several in one pass. The op's kernel fills it with a tensor on the op's device.
pub(crate) type Slot = OnceLock<Tensor>;

/// Fills a slot; each op object runs its kernel once, so a second fill is a crate bug.
pub(crate) fn fill(slot: &Slot, op: &str, value: Tensor) -> Result<()> {
    if slot.set(value).is_err() {
        candle_core::bail!("{op}: kernel ran twice on one op object");
    }
    Ok(())
}

/// The value a kernel left in a slot, or an error if it did not run (a crate bug).
pub(crate) fn filled(slot: &Slot, op: &str, what: &str) -> Result<Tensor> {
    match slot.get() {
        Some(t) => Ok(t.clone()),
        None => candle_core::bail!("{op}: {what} missing (its kernel did not run)"),
    }
}

/// The output of a device-generic op, computed with tensor ops before its custom op is applied
/// (a custom op's forward sees storages, not tensors): the custom op's forward hands it over, so
/// the op attaches an already computed result to the graph and its `bwd` supplies the gradients.
/// Handing over copies the output once (candle gives no way to move a tensor's storage).
pub(crate) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub fn new(output: Tensor) -> Self {
        Precomputed(Mutex::new(Some(output)))
    }

    fn take(&self, op: &str) -> Result<(Storage, Shape)> {
        let output = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(_) => candle_core::bail!("{op}: output lock poisoned"),
        };
        let Some(output) = output else { candle_core::bail!("{op}: forward applied twice") };
        let output = output.contiguous()?;
        let (storage, layout) = output.storage_and_layout();
        Ok((storage.try_clone(layout)?, output.shape().clone()))
    }

    /// The output as the CPU storage a `cpu_fwd` returns.
    pub fn cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        match self.take(op)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{op}: output is not on the CPU like its operands"),
        }
    }

    /// The output as the CUDA storage a `cuda_fwd` returns.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self, op: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.take(op)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("{op}: output is not on the GPU like its operands"),
        }
    }
}

/// Gradients of `Σ f(operands) · dy` for the wanted operands (at most three; the missing ones
/// get `None`) through candle's autograd of a reference composition: the backward of a custom op
/// on a device for which it has no backward kernel (its forward kernel ran there, its gradients
/// still must).
pub(crate) fn reference_vjp(
    operands: &[(&Tensor, bool)],
    dy: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<[Option<Tensor>; 3]> {
    if operands.len() > 3 {
        candle_core::bail!("sdbooth-ops: reference_vjp takes at most three operands");
    }
    let mut vars = Vec::with_capacity(operands.len());
    let mut inputs = Vec::with_capacity(operands.len());
    for &(operand, wanted) in operands {
        let var = if wanted { Some(Var::from_tensor(&operand.detach())?) } else { None };
        inputs.push(var.as_ref().map_or_else(|| operand.detach(), |v| v.as_tensor().clone()));
        vars.push(var);
    }
    let y = f(&inputs)?;
    let grads = crate::backward_from(&y, &dy.detach())?;
    let grad =
        |i: usize| vars.get(i).and_then(|v| v.as_ref()).and_then(|v| grads.get(v.as_tensor()).cloned());
    Ok([grad(0), grad(1), grad(2)])
}

/// One backward op per gradient of an op `(x, w[, b])` (conv2d, linear), each applied to the
/// (contiguous) output gradient.
pub(crate) struct WeightGradOps<'a> {
    pub input: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    pub weight: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    pub bias: &'a dyn Fn(&Tensor) -> Result<Tensor>,
}

/// The gradients of an op `(x, w[, b])`: the wanted ones (tracked operands) from its backward
/// ops where the device has kernels for them (`kernels`), else from the autograd of its reference
/// composition.
pub(crate) fn weight_op_grads(
    (x, w, b): (&Tensor, &Tensor, Option<&Tensor>),
    dy: &Tensor,
    kernels: bool,
    reference: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
    ops: WeightGradOps<'_>,
) -> Result<[Option<Tensor>; 3]> {
    let (want_x, want_w, want_b) = (x.track_op(), w.track_op(), b.is_some_and(|b| b.track_op()));
    if !kernels {
        let mut operands = vec![(x, want_x), (w, want_w)];
        operands.extend(b.map(|b| (b, want_b)));
        return reference_vjp(&operands, dy, |t| reference(&t[0], &t[1], t.get(2)));
    }
    let dy = dy.contiguous()?;
    Ok([
        grad_if(want_x, || (ops.input)(&dy))?,
        grad_if(want_w, || (ops.weight)(&dy))?,
        grad_if(want_b, || (ops.bias)(&dy))?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Deterministic values in [-1, 1) as a CPU tensor.
    fn values(seed: u64, shape: &[usize]) -> Tensor {
        let mut s = seed;
        let v = (0..shape.iter().product::<usize>())
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect();
        crate::cpu::cpu_tensor(v, shape, DType::F32).unwrap()
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (d / n).sqrt()
    }

    /// The fallback backward (autograd of the reference composition) gives the gradients the
    /// public op's backward gives, for the wanted operands only.
    #[test]
    fn reference_vjp_matches_the_ops_backward() {
        let (x, w, b) = (values(1, &[2, 3, 6, 5]), values(2, &[4, 3, 3, 3]), values(3, &[4]));
        let dy = values(4, &[2, 4, 3, 3]);
        let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let y = crate::conv2d(&x, wv.as_tensor(), Some(bv.as_tensor()), 2, 1).unwrap();
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let g = reference_vjp(&[(&x, false), (&w, true), (&b, true)], &dy, |t| {
            crate::reference::conv2d(&t[0], &t[1], t.get(2), 2, 1)
        })
        .unwrap();
        assert!(g[0].is_none());
        assert!(rel(g[1].as_ref().unwrap(), grads.get(wv.as_tensor()).unwrap()) < 1e-5);
        assert!(rel(g[2].as_ref().unwrap(), grads.get(bv.as_tensor()).unwrap()) < 1e-5);
    }
}
