//! The U-Net's training forward/backward on the shared tape (`crate::tape`): autograd inside a
//! node, hand-chained across nodes; optional gradient checkpointing; each node's finished
//! parameter gradients go to a hook as soon as they are known.

use candle_core::{DType, Tensor};

use super::{UNet, UNetRun, SLOT_CTX, SLOT_LATENTS};
use crate::tape::{GradHook, Tape, TapeOptions};
use crate::{ModelError, ParamStore};

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
    tape: Tape<'a, UNetRun<'a>>,
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
        let run = self.prepare(latents)?;
        // In slot order: SLOT_LATENTS, SLOT_TIMESTEPS, SLOT_CTX.
        let inputs = vec![
            (latents.clone(), opts.latents_grad),
            (timesteps.clone(), false),
            (encoder_hidden_states.clone(), opts.ctx_grad),
        ];
        let tape_opts = TapeOptions {
            checkpointing: opts.checkpointing,
            compute_dtype: opts.compute_dtype,
            param_grads: opts.param_grads,
        };
        Ok(UNetTape { tape: Tape::forward(run, params, inputs, tape_opts)? })
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

impl UNetTape<'_> {
    /// The prediction `[B, out_channels, h, w]`, f32, detached.
    pub fn output(&self) -> &Tensor {
        self.tape.output()
    }

    /// Backward from dLoss/dprediction. Parameter gradients go to `hook`, node by node, in
    /// reverse forward order (output head first, time embedding last).
    pub fn backward(self, grad_output: &Tensor, hook: &mut GradHook) -> Result<UNetGrads, ModelError> {
        let mut grads = self.tape.backward(grad_output, hook)?;
        Ok(UNetGrads { ctx: grads[SLOT_CTX].take(), latents: grads[SLOT_LATENTS].take() })
    }
}
