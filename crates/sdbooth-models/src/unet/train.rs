//! Training forward/backward: autograd inside a node, hand-chained across nodes.
//!
//! Forward stores every slot value (node input) as a fresh leaf. Backward walks the nodes in
//! reverse; for each it obtains the node's output graph (kept from the forward, or recomputed
//! from the stored inputs with gradient checkpointing), seeds it with the upstream gradient as
//! `(out * g).sum_all()`, and takes the gradients of the node's input leaves and parameters from
//! that node's own GradStore. Input gradients are summed into their slots: a slot read by many
//! nodes (skip connections, the timestep embedding, the text embeddings) is complete once every
//! reader has run, which in reverse topological order is exactly when its writer runs.
//!
//! Each parameter belongs to one node, so its gradient is final when that node's backward is
//! done: the hook receives it then (fused optimizer step, gradient accumulation, ...).

use candle_core::{DType, Tensor, Var};

use super::blocks::{self, Weights};
use super::{gather, UNet, FIRST_NODE_SLOT, SLOT_CTX, SLOT_LATENTS, SLOT_TIMESTEPS};
use crate::{ModelError, ParamStore};

/// Receives one node's finished parameter gradients: `(diffusers name, gradient)`, the gradient
/// detached (no graph) and in the parameter's dtype. Called once per node that has parameters,
/// in reverse forward order (output head first, time embedding last).
pub type GradHook<'a> = dyn FnMut(&[(String, Tensor)]) -> candle_core::Result<()> + 'a;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainOptions {
    /// Forward keeps only node inputs; backward recomputes each node. Gradients are bit-identical
    /// to the non-checkpointed run.
    pub checkpointing: bool,
    /// Compute dtype (weights and activations cast per node); `None` = the parameters' dtype.
    pub compute_dtype: Option<DType>,
    /// Compute parameter gradients (false: frozen U-Net, e.g. only the text encoder trains).
    pub param_grads: bool,
    /// Return the gradient of the text embeddings (for the text encoder's backward).
    pub ctx_grad: bool,
    /// Return the gradient of the input latents (tests; textual-inversion-like uses).
    pub latents_grad: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            checkpointing: false,
            compute_dtype: None,
            param_grads: true,
            ctx_grad: false,
            latents_grad: false,
        }
    }
}

/// Gradients of the U-Net's inputs; parameter gradients go to the hook.
#[derive(Debug)]
pub struct UNetGrads {
    /// dLoss/d encoder_hidden_states, in the dtype they were given in (when `ctx_grad`).
    pub ctx: Option<Tensor>,
    /// dLoss/d latents (when `latents_grad`).
    pub latents: Option<Tensor>,
}

/// The state a training forward leaves for its backward.
pub struct UNetTape<'a> {
    unet: &'a UNet,
    params: &'a ParamStore,
    opts: TrainOptions,
    /// Node inputs: leaves (`Var`s where a gradient is wanted, plain detached tensors elsewhere).
    slots: Vec<Option<Tensor>>,
    /// Without checkpointing: each node's output, still attached to its graph.
    graphs: Vec<Option<Tensor>>,
    /// Which slots need a gradient.
    needs_grad: Vec<bool>,
    output: Tensor,
}

impl UNet {
    /// Training forward. Returns the tape; `tape.output()` is the prediction (f32, detached).
    pub fn forward_train<'a>(
        &'a self,
        params: &'a ParamStore,
        latents: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        opts: TrainOptions,
    ) -> Result<UNetTape<'a>, ModelError> {
        self.check_input(latents)?;
        let n_slots = self.num_slots();
        let mut needs_grad = vec![false; n_slots];
        needs_grad[SLOT_LATENTS] = opts.latents_grad;
        needs_grad[SLOT_CTX] = opts.ctx_grad;
        for (i, node) in self.nodes().iter().enumerate() {
            let from_params = opts.param_grads && !node.params.is_empty();
            needs_grad[FIRST_NODE_SLOT + i] = from_params || node.inputs.iter().any(|&s| needs_grad[s]);
        }
        let mut slots: Vec<Option<Tensor>> = vec![None; n_slots];
        slots[SLOT_LATENTS] = Some(leaf(latents, needs_grad[SLOT_LATENTS])?);
        slots[SLOT_TIMESTEPS] = Some(timesteps.detach());
        slots[SLOT_CTX] = Some(leaf(encoder_hidden_states, needs_grad[SLOT_CTX])?);
        let mut graphs: Vec<Option<Tensor>> = vec![None; self.nodes().len()];
        // Checkpointed forward records no graph at all: detached weights, detached inputs.
        let track = opts.param_grads && !opts.checkpointing;
        let w = Weights { params, track, dtype: opts.compute_dtype };
        let n_nodes = self.nodes().len();
        let mut output = None;
        for (i, node) in self.nodes().iter().enumerate() {
            let inputs = gather(&slots, &node.inputs)?;
            let inputs: Vec<Tensor> =
                if opts.checkpointing { inputs.iter().map(|t| t.detach()).collect() } else { inputs };
            let out = blocks::run_node(self.config(), node, &w, &inputs)?;
            let slot = FIRST_NODE_SLOT + i;
            if i + 1 == n_nodes {
                output = Some(out.detach());
            } else {
                slots[slot] = Some(leaf(&out, needs_grad[slot])?);
            }
            if !opts.checkpointing && needs_grad[slot] {
                graphs[i] = Some(out);
            }
        }
        let output = output.ok_or_else(|| ModelError::BadInput("U-Net has no nodes".into()))?;
        Ok(UNetTape { unet: self, params, opts, slots, graphs, needs_grad, output })
    }

    /// Forward, loss gradient, backward in one call. `grad_fn` maps the prediction to
    /// dLoss/dprediction (same shape); the hook receives each node's parameter gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        params: &ParamStore,
        latents: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        opts: TrainOptions,
        grad_fn: impl FnOnce(&Tensor) -> Result<Tensor, ModelError>,
        hook: &mut GradHook,
    ) -> Result<(Tensor, UNetGrads), ModelError> {
        let tape = self.forward_train(params, latents, timesteps, encoder_hidden_states, opts)?;
        let output = tape.output().clone();
        let g = grad_fn(&output)?;
        let grads = tape.backward(&g, hook)?;
        Ok((output, grads))
    }
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
        Some(prev) => (prev + g)?,
        None => g,
    });
    Ok(())
}

impl UNetTape<'_> {
    /// The prediction `[B, out_channels, h, w]`, f32, detached.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Backward from dLoss/dprediction. Parameter gradients go to `hook`, node by node.
    pub fn backward(mut self, grad_output: &Tensor, hook: &mut GradHook) -> Result<UNetGrads, ModelError> {
        if grad_output.dims() != self.output.dims() {
            return Err(ModelError::BadInput(format!(
                "U-Net output gradient has shape {:?}, output {:?}",
                grad_output.dims(),
                self.output.dims()
            )));
        }
        let unet = self.unet;
        let nodes = unet.nodes();
        let mut grads: Vec<Option<Tensor>> = vec![None; unet.num_slots()];
        grads[FIRST_NODE_SLOT + nodes.len() - 1] = Some(grad_output.detach());
        let w = Weights { params: self.params, track: self.opts.param_grads, dtype: self.opts.compute_dtype };
        for (i, node) in nodes.iter().enumerate().rev() {
            let slot = FIRST_NODE_SLOT + i;
            if !self.needs_grad[slot] {
                continue;
            }
            let Some(g) = grads[slot].take() else {
                return Err(ModelError::BadInput(format!("U-Net node {} got no gradient", node.prefix)));
            };
            let out = match self.graphs[i].take() {
                Some(out) => out,
                None => {
                    let inputs = gather(&self.slots, &node.inputs)?;
                    blocks::run_node(unet.config(), node, &w, &inputs)?
                }
            };
            let g = if g.dtype() == out.dtype() { g } else { g.to_dtype(out.dtype())? };
            let store = (out * g)?.sum_all()?.backward()?;
            for &s in &node.inputs {
                if !self.needs_grad[s] {
                    continue;
                }
                let input =
                    self.slots[s].as_ref().ok_or_else(|| ModelError::BadInput(format!("slot {s}")))?;
                // An input that did not influence the output (cannot happen in this network, but
                // candle leaves it out) contributes nothing.
                if let Some(gi) = store.get(input) {
                    accumulate(&mut grads[s], gi.detach())?;
                }
            }
            if self.opts.param_grads && !node.params.is_empty() {
                let mut pg = Vec::with_capacity(node.params.len());
                for (name, _) in &node.params {
                    let p = self.params.get(name)?;
                    let g = match store.get(p) {
                        Some(g) => g.detach(),
                        None => p.zeros_like()?,
                    };
                    pg.push((name.clone(), g));
                }
                drop(store);
                hook(&pg).map_err(ModelError::Candle)?;
            }
            // Every reader of this node's inputs that comes later has run; this node's own
            // output leaf is no longer needed.
            if slot < self.slots.len() {
                self.slots[slot] = None;
            }
        }
        Ok(UNetGrads { ctx: grads[SLOT_CTX].take(), latents: grads[SLOT_LATENTS].take() })
    }
}
