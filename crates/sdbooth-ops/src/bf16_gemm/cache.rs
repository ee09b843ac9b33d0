//! Packed bf16 panels of weights, kept for the rest of a training step.
//!
//! With gradient checkpointing every linear and conv weight is packed (rounded to bf16 and laid
//! out in pairs along k) three times per step: forward, recompute, and backward's input gradient.
//! The first two use the same layout (k contiguous in the weight: `x · wᵀ` for linear, `W · col`
//! for conv2d), so the recompute can take the forward's panels. A training loop that owns a
//! [`PackedWeights`] opens a [`PackedWeights::step`] around each forward and backward; inside it
//! the weights the ops [`register`] have their k-contiguous packings kept (about half the f32
//! weights' size in memory), and reused until the step ends. The buffers stay allocated for the
//! next step (repacked on first use there, without fresh pages) until the owner is dropped.
//!
//! Safety of the reuse: a registered weight's tensor is held by the cache, so its storage
//! cannot be freed and its address reused by another tensor while an entry names it; the
//! packings are only used inside the step they were made in, and nothing may change a weight
//! in place while a step is open (the owner opens none around an update, e.g. with a fused
//! backward pass, where weights change during the backward). The state is per thread: the ops
//! run their GEMMs on the thread that applies them, and another training loop in the same
//! process (tests) has its own.

use super::GemmElem;
use candle_core::{CpuStorage, Storage, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::rc::Rc;

/// Where a packing of a weight is laid out: panel width and the source's geometry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct PanelShape {
    pub width: usize,
    pub outer: usize,
    pub k: usize,
    pub so: usize,
}

struct Packing {
    shape: PanelShape,
    /// The step it was packed in.
    step: u64,
    panels: Rc<Vec<u32>>,
}

/// A registered weight: its tensor (kept alive), extent and packings.
struct Weight {
    _tensor: Tensor,
    bytes: usize,
    last_step: u64,
    packings: Vec<Packing>,
}

#[derive(Default)]
struct State {
    /// Whether a step is open (packings are made and reused).
    open: bool,
    step: u64,
    /// By the address of the weight's first value.
    weights: HashMap<usize, Weight>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Keeps bf16 packings of the weights between the GEMMs of a training step on this thread (see
/// the module docs); dropping it frees them. At most one per thread.
pub struct PackedWeights {
    /// Not `Send`: the cache is this thread's.
    _thread: PhantomData<Rc<()>>,
}

impl PackedWeights {
    /// Starts keeping packings on this thread (none are made until a [`step`](Self::step)).
    pub fn new() -> Self {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.weights.clear();
        });
        PackedWeights { _thread: PhantomData }
    }

    /// Opens a step: until the returned guard is dropped, no weight may change. Weights not
    /// used in the previous step are forgotten (another model, a frozen part).
    pub fn step(&self) -> PackedStep<'_> {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.step += 1;
            s.open = true;
            let previous = s.step - 1;
            s.weights.retain(|_, w| w.last_step >= previous);
        });
        PackedStep { _owner: self }
    }
}

impl PackedWeights {
    /// Bytes of packed panels held now (this step's and last step's buffers).
    pub fn kept_bytes(&self) -> usize {
        STATE.with(|s| {
            let s = s.borrow();
            s.weights.values().flat_map(|w| &w.packings).map(|p| p.panels.len() * 4).sum()
        })
    }
}

impl Default for PackedWeights {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PackedWeights {
    fn drop(&mut self) {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.weights.clear();
            s.open = false;
        });
    }
}

/// An open step of [`PackedWeights`]; packings made inside it are not used after it.
pub struct PackedStep<'a> {
    _owner: &'a PackedWeights,
}

impl Drop for PackedStep<'_> {
    fn drop(&mut self) {
        STATE.with(|s| s.borrow_mut().open = false);
    }
}

/// Marks `w` (a linear or conv weight whose products run in bf16) as a weight whose packings
/// may be kept for the open step; nothing without an open step on this thread.
pub(crate) fn register(w: &Tensor) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if !s.open {
            return;
        }
        let Some((addr, bytes)) = cpu_extent(w) else { return };
        let step = s.step;
        let entry = s.weights.entry(addr).or_insert_with(|| Weight {
            _tensor: w.clone(),
            bytes,
            last_step: step,
            packings: Vec::new(),
        });
        if entry.bytes == bytes {
            entry.last_step = step;
        }
    })
}

/// Address and size in bytes of a contiguous f32 or bf16 CPU tensor's values.
fn cpu_extent(w: &Tensor) -> Option<(usize, usize)> {
    let (storage, layout) = w.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some((v[start..end].as_ptr() as usize, (end - start) * 4)),
        Storage::Cpu(CpuStorage::BF16(v)) => Some((v[start..end].as_ptr() as usize, (end - start) * 2)),
        _ => None,
    }
}

/// The panels of `data` packed as `shape` by `pack`: this step's kept packing when `data` is a
/// registered weight (packed now if it has none yet), else `None` (the caller packs it itself).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn packed<E: GemmElem>(
    data: &[E],
    shape: PanelShape,
    pack: impl FnOnce(&mut Vec<u32>),
) -> Option<Rc<Vec<u32>>> {
    let (addr, bytes) = (data.as_ptr() as usize, std::mem::size_of_val(data));
    let mut reuse = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let step = s.step;
        if !s.open {
            return Err(());
        }
        let w = s.weights.get_mut(&addr).filter(|w| w.bytes == bytes).ok_or(())?;
        w.last_step = step;
        match w.packings.iter().position(|p| p.shape == shape) {
            Some(i) if w.packings[i].step == step => Ok(Ok(w.packings[i].panels.clone())),
            // Last step's buffer, repacked (its pages are already mapped).
            Some(i) => Ok(Err(Rc::try_unwrap(w.packings.swap_remove(i).panels).unwrap_or_default())),
            None => Ok(Err(Vec::new())),
        }
    });
    let buffer = match reuse.as_mut() {
        Err(()) => return None,
        Ok(Ok(panels)) => return Some(panels.clone()),
        Ok(Err(buffer)) => buffer,
    };
    pack(buffer);
    let panels = Rc::new(std::mem::take(buffer));
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let step = s.step;
        if let Some(w) = s.weights.get_mut(&addr) {
            w.packings.push(Packing { shape, step, panels: panels.clone() });
        }
    });
    Some(panels)
}
