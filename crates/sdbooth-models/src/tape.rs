//! The training tape of the U-Net and the text encoder: autograd inside a block, chained by
//! hand across blocks.
//!
//! A network is a list of blocks in topological order. Input slots `0..n_inputs` hold the
//! network's inputs; block `i` reads numbered slots and writes slot `n_inputs + i`. Forward
//! stores every slot value (block input) as a fresh leaf. Backward walks the blocks in reverse;
//! for each it obtains the block's output graph (kept from the forward, or recomputed from the
//! stored inputs with gradient checkpointing), backpropagates the upstream gradient through it
//! ([`sdbooth_ops::backward_from`]: no extra passes over the output), and takes the gradients
//! of the block's input leaves and parameters from
//! that block's own GradStore. Input gradients are summed into their slots: a slot read by many
//! blocks (the U-Net's skip connections, timestep embedding and text embeddings) is complete once
//! every reader has run, which in reverse topological order is exactly when its writer runs.
//!
//! Each parameter belongs to one block, so its gradient is final when that block's backward is
//! done: the hook receives it then (fused optimizer step, gradient accumulation, ...).

use candle_core::{DType, Tensor, Var};

use crate::params::Weights;
use crate::{ModelError, ParamStore};

/// Receives one block's finished parameter gradients: `(diffusers name, gradient)`, the gradient
/// detached (no graph) and in the parameter's dtype. Called once per block that has parameters,
/// in reverse forward order. The U-Net and the text encoder share it, so one closure serves both.
pub type GradHook<'a> = dyn FnMut(&[(String, Tensor)]) -> candle_core::Result<()> + 'a;

/// A network as the tape runs it.
pub(crate) trait Blocks {
    /// Names the network in error messages ("U-Net", "text encoder").
    const NAME: &'static str;
    fn num_blocks(&self) -> usize;
    /// Slots block `i` reads, in the order `run_block` expects them.
    fn block_inputs(&self, i: usize) -> &[usize];
    /// Parameters block `i` (and only block `i`) uses, in the order the hook receives them.
    fn block_params(&self, i: usize) -> &[(String, Vec<usize>)];
    /// Parameter prefix or other short name of block `i`, for error messages.
    fn block_name(&self, i: usize) -> String;
    fn run_block(&self, w: &Weights, i: usize, inputs: &[Tensor]) -> Result<Tensor, ModelError>;
    /// Blocks whose parameter gradients are computed directly from the output gradient rather
    /// than through autograd (CLIP's embedding tables). They run without a graph and their
    /// inputs get no gradient.
    fn has_direct_grads(&self, _i: usize) -> bool {
        false
    }
    fn direct_grads(
        &self,
        _w: &Weights,
        _i: usize,
        _g: &Tensor,
    ) -> Result<Vec<(String, Tensor)>, ModelError> {
        Err(ModelError::BadInput(format!("{} has no directly differentiated block", Self::NAME)))
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct TapeOptions {
    /// Forward keeps only block inputs; backward recomputes each block (bit-identical gradients).
    pub checkpointing: bool,
    /// Compute dtype (weights and activations cast per block); `None` = the parameters' dtype.
    pub compute_dtype: Option<DType>,
    /// Compute parameter gradients (false: a frozen network whose input gradients are wanted).
    pub param_grads: bool,
}

/// The state a training forward leaves for its backward.
pub(crate) struct Tape<'a, B: Blocks> {
    blocks: B,
    params: &'a ParamStore,
    opts: TapeOptions,
    n_inputs: usize,
    /// Block inputs: leaves (`Var`s where a gradient is wanted, plain detached tensors elsewhere).
    slots: Vec<Option<Tensor>>,
    /// Without checkpointing: each block's output, still attached to its graph.
    graphs: Vec<Option<Tensor>>,
    /// Which slots need a gradient.
    needs_grad: Vec<bool>,
    output: Tensor,
}

/// A detached copy of `t` that is a gradient leaf when `grad` (a `Var` copies its storage,
/// which is the price of a fresh leaf in candle), or a detached view otherwise.
fn leaf(t: &Tensor, grad: bool) -> Result<Tensor, ModelError> {
    if grad {
        Ok(Var::from_tensor(&t.detach())?.as_tensor().clone())
    } else {
        Ok(t.detach())
    }
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<(), ModelError> {
    *slot = Some(match slot.take() {
        Some(prev) => sdbooth_ops::add(&prev, &g)?,
        None => g,
    });
    Ok(())
}

/// The values of `idx` from `slots`.
pub(crate) fn gather(slots: &[Option<Tensor>], idx: &[usize]) -> Result<Vec<Tensor>, ModelError> {
    idx.iter()
        .map(|&s| slots[s].clone().ok_or_else(|| ModelError::BadInput(format!("network slot {s} is empty"))))
        .collect()
}

impl<'a, B: Blocks> Tape<'a, B> {
    /// Training forward. `inputs` are the input slots with whether each needs a gradient.
    pub fn forward(
        blocks: B,
        params: &'a ParamStore,
        inputs: Vec<(Tensor, bool)>,
        opts: TapeOptions,
    ) -> Result<Self, ModelError> {
        let n_inputs = inputs.len();
        let n_blocks = blocks.num_blocks();
        let n_slots = n_inputs + n_blocks;
        let mut needs_grad = vec![false; n_slots];
        let mut slots: Vec<Option<Tensor>> = vec![None; n_slots];
        for (s, (t, grad)) in inputs.into_iter().enumerate() {
            needs_grad[s] = grad;
            slots[s] = Some(leaf(&t, grad)?);
        }
        for i in 0..n_blocks {
            let has_params = !blocks.block_params(i).is_empty() || blocks.has_direct_grads(i);
            let from_params = opts.param_grads && has_params;
            needs_grad[n_inputs + i] = from_params || blocks.block_inputs(i).iter().any(|&s| needs_grad[s]);
        }
        let mut graphs: Vec<Option<Tensor>> = vec![None; n_blocks];
        // Checkpointed forward records no graph at all: detached weights, detached inputs.
        let track = opts.param_grads && !opts.checkpointing;
        let w = Weights { params, track, dtype: opts.compute_dtype };
        let untracked = Weights { track: false, ..w };
        let mut output = None;
        for (i, graph) in graphs.iter_mut().enumerate() {
            let inputs = gather(&slots, blocks.block_inputs(i))?;
            let inputs: Vec<Tensor> =
                if opts.checkpointing { inputs.iter().map(|t| t.detach()).collect() } else { inputs };
            let direct = blocks.has_direct_grads(i);
            let out = blocks.run_block(if direct { &untracked } else { &w }, i, &inputs)?;
            let slot = n_inputs + i;
            if i + 1 == n_blocks {
                output = Some(out.detach());
            } else {
                slots[slot] = Some(leaf(&out, needs_grad[slot])?);
            }
            if !opts.checkpointing && !direct && needs_grad[slot] {
                *graph = Some(out);
            }
        }
        let output = output.ok_or_else(|| ModelError::BadInput(format!("{} has no blocks", B::NAME)))?;
        Ok(Tape { blocks, params, opts, n_inputs, slots, graphs, needs_grad, output })
    }

    /// The network output, detached.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Backward from dLoss/d output. Parameter gradients go to `hook`, block by block. Returns
    /// the gradients of the input slots that asked for one.
    pub fn backward(
        mut self,
        grad_output: &Tensor,
        hook: &mut GradHook,
    ) -> Result<Vec<Option<Tensor>>, ModelError> {
        if grad_output.dims() != self.output.dims() {
            return Err(ModelError::BadInput(format!(
                "{} output gradient has shape {:?}, output {:?}",
                B::NAME,
                grad_output.dims(),
                self.output.dims()
            )));
        }
        let blocks = &self.blocks;
        let n_in = self.n_inputs;
        let n_blocks = blocks.num_blocks();
        let mut grads: Vec<Option<Tensor>> = vec![None; n_in + n_blocks];
        grads[n_in + n_blocks - 1] = Some(grad_output.detach());
        let w = Weights { params: self.params, track: self.opts.param_grads, dtype: self.opts.compute_dtype };
        for i in (0..n_blocks).rev() {
            let slot = n_in + i;
            if !self.needs_grad[slot] {
                continue;
            }
            let Some(g) = grads[slot].take() else {
                return Err(ModelError::BadInput(format!(
                    "{} block {} got no gradient",
                    B::NAME,
                    blocks.block_name(i)
                )));
            };
            if blocks.has_direct_grads(i) {
                if self.opts.param_grads {
                    hook(&blocks.direct_grads(&w, i, &g)?)?;
                }
                continue;
            }
            let out = match self.graphs[i].take() {
                Some(out) => out,
                None => blocks.run_block(&w, i, &gather(&self.slots, blocks.block_inputs(i))?)?,
            };
            let g = if g.dtype() == out.dtype() { g } else { g.to_dtype(out.dtype())? };
            let store = sdbooth_ops::backward_from(&out, &g)?;
            for &s in blocks.block_inputs(i) {
                if !self.needs_grad[s] {
                    continue;
                }
                let input =
                    self.slots[s].as_ref().ok_or_else(|| ModelError::BadInput(format!("slot {s}")))?;
                // An input that did not influence the output (cannot happen in these networks,
                // but candle leaves it out) contributes nothing.
                if let Some(gi) = store.get(input) {
                    accumulate(&mut grads[s], gi.detach())?;
                }
            }
            let names = blocks.block_params(i);
            if self.opts.param_grads && !names.is_empty() {
                let mut pg = Vec::with_capacity(names.len());
                for (name, _) in names {
                    let p = self.params.get(name)?;
                    // A parameter that did not influence the output (cannot happen here) gets zeros.
                    let g = match store.get(p) {
                        Some(g) => g.detach(),
                        None => p.zeros_like()?,
                    };
                    pg.push((name.clone(), g));
                }
                drop(store);
                hook(&pg)?;
            }
            // Every later reader of this block's output has run: its leaf is no longer needed.
            self.slots[slot] = None;
        }
        grads.truncate(n_in);
        Ok(grads)
    }
}
