//! CLIP text encoder (transformers' `CLIPTextModel`): SD1's OpenAI ViT-L/14 text tower
//! (quick_gelu) and SD2's OpenCLIP ViT-H text tower as diffusers and kohya hold it (23 layers,
//! GELU), with kohya's `clip_skip` and long-prompt (`max_token_length` 150/225) handling.
//!
//! Three ways to run it:
//! - [`ClipTextModel::forward`]: one autograd graph over tracked parameters, so
//!   `(out * g).sum_all()?.backward()` differentiates everything (tests, simple use).
//! - [`ClipTextModel::encode`]: detached parameters, no graph (frozen text encoder, sampling).
//! - [`ClipTextModel::forward_train`] + [`ClipTape::backward`]: the training path. Autograd inside
//!   a block (embeddings, each encoder layer, final layer norm + window join), chained by hand
//!   across blocks; optional gradient checkpointing (recompute each layer in backward); the
//!   upstream gradient (dLoss/d output, e.g. the U-Net's context gradient) comes in as a tensor,
//!   and each block's finished parameter gradients go to a hook as soon as they are known.

use candle_core::{DType, Tensor};
use sdbooth_ops as ops;

use crate::config::{Activation, ClipConfig};
use crate::layers::attention::{Attention, CLIP_NAMES};
use crate::layers::embeddings::TextEmbeddings;
use crate::layers::{join, linear_flops, push_linear, push_norm, ParamShapes};
use crate::params::Weights;
use crate::tape::{Blocks, Tape, TapeOptions};
use crate::{ModelError, ParamStore};

pub use crate::tape::GradHook;

/// CLIP's context length: every window of token ids is this long.
pub const MODEL_MAX_LENGTH: usize = 77;
/// Tokens per window between BOS and EOS.
pub const WINDOW_TOKENS: usize = MODEL_MAX_LENGTH - 2;

const FINAL_LN: &str = "text_model.final_layer_norm";

fn layer_prefix(i: usize) -> String {
    format!("text_model.encoder.layers.{i}")
}

/// Parameter names and shapes of the text encoder, in diffusers/transformers naming.
pub fn param_shapes(cfg: &ClipConfig) -> ParamShapes {
    let model = ClipTextModel::new(cfg);
    let mut out = model.embeddings().params();
    out.extend(model.layer_params.iter().flatten().cloned());
    out.extend(model.head_params.iter().cloned());
    out
}

/// Token ids as the model sees them: `[N, T]` rows, and how to join them back.
struct Ids {
    /// `[N, T]` u32, N = batch x windows.
    flat: Tensor,
    batch: usize,
    /// `Some(n)` for kohya's long-prompt layout `[B, n, 77]`.
    windows: Option<usize>,
}

/// The CLIP text encoder for one configuration; the weights live in a [`ParamStore`].
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    cfg: ClipConfig,
    /// Parameters of each encoder layer, in the order the training hook receives them.
    layer_params: Vec<ParamShapes>,
    head_params: ParamShapes,
}

/// Options of the training path.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClipTrainOptions {
    /// Forward keeps only each layer's input; backward recomputes the layer. Gradients are
    /// bit-identical to the non-checkpointed run.
    pub checkpointing: bool,
    /// Compute dtype (weights and activations cast per block); `None`: the parameters' dtype.
    pub compute_dtype: Option<DType>,
}

impl ClipTextModel {
    pub fn new(cfg: &ClipConfig) -> Self {
        let mut model = ClipTextModel { cfg: cfg.clone(), layer_params: Vec::new(), head_params: Vec::new() };
        model.layer_params = (0..cfg.num_hidden_layers).map(|i| model.encoder_layer_params(i)).collect();
        push_norm(&mut model.head_params, FINAL_LN, cfg.hidden_size);
        model
    }

    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        param_shapes(&self.cfg)
    }

    /// How many encoder layers the output depends on, as kohya's `get_hidden_states` reads
    /// them: `None`/`Some(1)`: all (last_hidden_state); `Some(n)`: `hidden_states[-n]`, i.e. the
    /// output of layer `L + 1 - n` (`hidden_states[0]` is the embeddings). For SD2 this counts
    /// from the 23 layers the model holds, as kohya does. Later layers are not run at all.
    pub fn layers_used(&self, clip_skip: Option<usize>) -> Result<usize, ModelError> {
        let l = self.cfg.num_hidden_layers;
        match clip_skip {
            None => Ok(l),
            Some(n) if n >= 1 && n <= l + 1 => Ok(l + 1 - n),
            Some(n) => Err(ModelError::BadInput(format!(
                "clip_skip {n} out of range 1..={} for this text encoder",
                l + 1
            ))),
        }
    }

    fn check_ids(&self, ids: &Tensor) -> Result<Ids, ModelError> {
        let bad = || {
            ModelError::BadInput(format!(
                "text encoder input ids must be u32 [B, T<={}] or [B, n, {MODEL_MAX_LENGTH}], got {:?} {:?}",
                self.cfg.max_position_embeddings,
                ids.dtype(),
                ids.dims()
            ))
        };
        if ids.dtype() != DType::U32 {
            return Err(bad());
        }
        match *ids.dims() {
            [b, t] if t >= 1 && t <= self.cfg.max_position_embeddings => {
                Ok(Ids { flat: ids.clone(), batch: b, windows: None })
            }
            [b, n, t] if n >= 1 && t == MODEL_MAX_LENGTH && t <= self.cfg.max_position_embeddings => {
                Ok(Ids { flat: ids.reshape((b * n, t))?, batch: b, windows: Some(n) })
            }
            _ => Err(bad()),
        }
    }

    fn embeddings(&self) -> TextEmbeddings {
        let c = &self.cfg;
        TextEmbeddings { vocab: c.vocab_size, max_positions: c.max_position_embeddings, dim: c.hidden_size }
    }

    /// transformers' CLIPAttention: biased projections, causal (token i sees tokens <= i, the
    /// `causal_attention_mask`).
    fn self_attention(&self) -> Attention {
        let d = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        Attention { dim: d, kv_dim: d, heads, qkv_bias: true, causal: true, names: CLIP_NAMES }
    }

    fn encoder_layer_params(&self, i: usize) -> ParamShapes {
        let p = layer_prefix(i);
        let (d, ff) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let mut v = self.self_attention().params(&join(&p, "self_attn"));
        push_norm(&mut v, &join(&p, "layer_norm1"), d);
        push_norm(&mut v, &join(&p, "layer_norm2"), d);
        push_linear(&mut v, &join(&p, "mlp.fc1"), ff, d, true);
        push_linear(&mut v, &join(&p, "mlp.fc2"), d, ff, true);
        v
    }

    /// One pre-norm encoder layer: x + attn(ln1(x)), then + mlp(ln2(x)). `x` is `[N, T, D]`.
    fn layer(&self, w: &Weights, i: usize, x: &Tensor) -> Result<Tensor, ModelError> {
        let p = layer_prefix(i);
        let eps = self.cfg.layer_norm_eps;
        let x = w.cast(x)?;
        let (g, b) = w.wb(&join(&p, "layer_norm1"))?;
        let h = ops::layer_norm(&x, &g, &b, eps)?;
        let x = ops::add(&x, &self.self_attention().forward(w, &join(&p, "self_attn"), &h, &h)?)?;

        let (g, b) = w.wb(&join(&p, "layer_norm2"))?;
        let h = ops::layer_norm(&x, &g, &b, eps)?;
        let (wt, bias) = w.gemm_wb(&join(&p, "mlp.fc1"))?;
        let h = wt.linear(&h, Some(&bias))?;
        let h = match self.cfg.hidden_act {
            Activation::QuickGelu => ops::quick_gelu(&h)?,
            Activation::Gelu => ops::gelu_erf_with(&h, wt.precision())?,
        };
        let (wt, bias) = w.gemm_wb(&join(&p, "mlp.fc2"))?;
        Ok(ops::add(&x, &wt.linear(&h, Some(&bias))?)?)
    }

    /// Forward FLOPs for one sequence of `tokens` through every layer (projections, attention
    /// products, MLP; the embedding lookups and norms are not counted).
    pub fn forward_flops(&self, tokens: usize) -> f64 {
        let t = tokens as f64;
        let (d, ff) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let per_layer = self.self_attention().flops(t, t) + linear_flops(ff, d, t) + linear_flops(d, ff, t);
        per_layer * self.cfg.num_hidden_layers as f64
    }

    /// Final layer norm (kohya applies it after clip_skip too), then kohya's window join.
    fn head(&self, w: &Weights, x: &Tensor, ids: &Ids) -> Result<Tensor, ModelError> {
        let (g, b) = w.wb(FINAL_LN)?;
        let y = ops::layer_norm(&w.cast(x)?, &g, &b, self.cfg.layer_norm_eps)?;
        match ids.windows {
            Some(n) => join_windows(&y, ids.batch, n),
            None => Ok(y),
        }
    }

    fn run(&self, w: &Weights, ids: &Tensor, clip_skip: Option<usize>) -> Result<Tensor, ModelError> {
        let ids = self.check_ids(ids)?;
        let n_layers = self.layers_used(clip_skip)?;
        let mut x = self.embeddings().forward(w, &ids.flat)?;
        for i in 0..n_layers {
            x = self.layer(w, i, &x)?;
        }
        self.head(w, &x, &ids)
    }

    /// Forward as kohya's `get_hidden_states`, recording one autograd graph over the tracked
    /// parameters: `(out * g).sum_all()?.backward()` gives every parameter's gradient.
    ///
    /// `ids`: u32 `[B, 77]` (or `[B, T]`, T <= 77, kohya's `no_token_padding`) → `[B, T, hidden]`;
    /// or `[B, n, 77]` windows of a long prompt (`max_token_length` = 75 n) → `[B, 75 n + 2, hidden]`.
    pub fn forward(
        &self,
        params: &ParamStore,
        ids: &Tensor,
        clip_skip: Option<usize>,
    ) -> Result<Tensor, ModelError> {
        self.run(&Weights { params, track: true, dtype: None }, ids, clip_skip)
    }

    /// As [`forward`](Self::forward) with detached parameters (no graph), computed in `dtype`
    /// when given: frozen text encoder, sampling.
    pub fn encode(
        &self,
        params: &ParamStore,
        ids: &Tensor,
        clip_skip: Option<usize>,
        dtype: Option<DType>,
    ) -> Result<Tensor, ModelError> {
        self.run(&Weights { params, track: false, dtype }, ids, clip_skip)
    }

    /// Training forward: returns the tape whose [`ClipTape::output`] is the encoder output
    /// (detached) and whose [`ClipTape::backward`] takes dLoss/d output.
    pub fn forward_train<'a>(
        &'a self,
        params: &'a ParamStore,
        ids: &Tensor,
        clip_skip: Option<usize>,
        opts: ClipTrainOptions,
    ) -> Result<ClipTape<'a>, ModelError> {
        let ids = self.check_ids(ids)?;
        let n_layers = self.layers_used(clip_skip)?;
        let run = ClipRun::new(self, ids, n_layers);
        let tape_opts = TapeOptions {
            checkpointing: opts.checkpointing,
            compute_dtype: opts.compute_dtype,
            param_grads: true,
        };
        Ok(ClipTape { tape: Tape::forward(run, params, Vec::new(), tape_opts)? })
    }
}

/// The text encoder on one batch of ids, as the tape runs it: block 0 the embeddings, blocks
/// 1..=L the encoder layers used, block L+1 the final layer norm and window join. Block `i`
/// writes slot `i` and reads slot `i - 1`.
struct ClipRun<'a> {
    model: &'a ClipTextModel,
    ids: Ids,
    n_layers: usize,
    inputs: Vec<Vec<usize>>,
}

impl<'a> ClipRun<'a> {
    fn new(model: &'a ClipTextModel, ids: Ids, n_layers: usize) -> Self {
        let inputs = (0..n_layers + 2).map(|i| if i == 0 { Vec::new() } else { vec![i - 1] }).collect();
        ClipRun { model, ids, n_layers, inputs }
    }
}

impl Blocks for ClipRun<'_> {
    const NAME: &'static str = "text encoder";

    fn num_blocks(&self) -> usize {
        self.n_layers + 2
    }

    fn block_inputs(&self, i: usize) -> &[usize] {
        &self.inputs[i]
    }

    fn block_params(&self, i: usize) -> &[(String, Vec<usize>)] {
        match i {
            // The embeddings' gradients come from `direct_grads`, not from this list.
            0 => &[],
            i if i <= self.n_layers => &self.model.layer_params[i - 1],
            _ => &self.model.head_params,
        }
    }

    fn block_name(&self, i: usize) -> String {
        match i {
            0 => "embeddings".into(),
            i if i <= self.n_layers => layer_prefix(i - 1),
            _ => FINAL_LN.into(),
        }
    }

    fn run_block(&self, w: &Weights, i: usize, inputs: &[Tensor]) -> Result<Tensor, ModelError> {
        match i {
            0 => self.model.embeddings().forward(w, &self.ids.flat),
            i if i <= self.n_layers => self.model.layer(w, i - 1, &inputs[0]),
            _ => self.model.head(w, &inputs[0], &self.ids),
        }
    }

    /// The embedding tables' gradients are written directly (see `TextEmbeddings::grads`), so
    /// the lookup runs without a graph.
    fn has_direct_grads(&self, i: usize) -> bool {
        i == 0
    }

    fn direct_grads(&self, w: &Weights, _i: usize, g: &Tensor) -> Result<Vec<(String, Tensor)>, ModelError> {
        self.model.embeddings().grads(w, &self.ids.flat, g)
    }
}

/// kohya's join of long-prompt windows (train_util.get_hidden_states): `hidden` is `[B n, 77, D]`
/// (window-major per sample); the result keeps the first window's BOS state, tokens 1..=75 of
/// every window, and the last window's final state: `[B, 75 n + 2, D]`. kohya's SD2 branch has
/// an extra loop meant to patch empty windows, but it compares a tensor with the *string*
/// `tokenizer.eos_token`, which is never equal, so SD1 and SD2 join identically (checked by the
/// golden fixture, which runs kohya's code path).
pub fn join_windows(hidden: &Tensor, batch: usize, windows: usize) -> Result<Tensor, ModelError> {
    let (_, t, d) = hidden.dims3()?;
    if t != MODEL_MAX_LENGTH || hidden.dim(0)? != batch * windows {
        return Err(ModelError::BadInput(format!(
            "join_windows: hidden states {:?} are not [{batch}*{windows}, {MODEL_MAX_LENGTH}, D]",
            hidden.dims()
        )));
    }
    let h = hidden.reshape((batch, windows * t, d))?;
    let mut parts = Vec::with_capacity(windows + 2);
    parts.push(h.narrow(1, 0, 1)?);
    for i in 0..windows {
        parts.push(h.narrow(1, i * t + 1, WINDOW_TOKENS)?);
    }
    parts.push(h.narrow(1, windows * t - 1, 1)?);
    Ok(Tensor::cat(&parts, 1)?)
}

/// kohya's `--weighted_captions` (strategy_sd.encode_tokens_with_weights): scales each token's
/// hidden state by its prompt weight. `hidden` is the encoder output `[B, T, D]`, `weights` the
/// tokenizer's per-token weights `[B, n, 77]`. With one window all 77 states are scaled; with n
/// windows (`hidden` `[B, 75 n + 2, D]`) tokens 1..=75 of each window are, and the joined BOS and
/// final state are not. Differentiable in `hidden` (a product with a constant).
pub fn apply_token_weights(hidden: &Tensor, weights: &Tensor) -> Result<Tensor, ModelError> {
    let (b, t, _) = hidden.dims3()?;
    let (wb, n, wt) = weights.dims3()?;
    let expected_t = if n == 1 { MODEL_MAX_LENGTH } else { WINDOW_TOKENS * n + 2 };
    if wb != b || wt != MODEL_MAX_LENGTH || t != expected_t {
        return Err(ModelError::BadInput(format!(
            "token weights {:?} do not fit hidden states {:?}",
            weights.dims(),
            hidden.dims()
        )));
    }
    let weights = weights.detach().to_dtype(hidden.dtype())?;
    let full = if n == 1 {
        weights.squeeze(1)?
    } else {
        let one = Tensor::ones((b, 1), hidden.dtype(), hidden.device())?;
        let mut parts = vec![one.clone()];
        for i in 0..n {
            parts.push(weights.narrow(1, i, 1)?.squeeze(1)?.narrow(1, 1, WINDOW_TOKENS)?);
        }
        parts.push(one);
        Tensor::cat(&parts, 1)?
    };
    Ok(hidden.broadcast_mul(&full.unsqueeze(2)?)?)
}

/// The state a training forward leaves for its backward.
pub struct ClipTape<'a> {
    tape: Tape<'a, ClipRun<'a>>,
}

impl ClipTape<'_> {
    /// The encoder output (detached), in the compute dtype.
    pub fn output(&self) -> &Tensor {
        self.tape.output()
    }

    /// Backward from `grad_output` = dLoss/d output. Each block's parameter gradients go to
    /// `hook` as soon as they are final, in reverse order: final layer norm, layer L-1, ..., 0,
    /// embeddings. Layers beyond `clip_skip` get no call (their gradient is zero).
    pub fn backward(self, grad_output: &Tensor, hook: &mut GradHook) -> Result<(), ModelError> {
        self.tape.backward(grad_output, hook)?;
        Ok(())
    }
}
