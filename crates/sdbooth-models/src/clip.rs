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

use candle_core::{DType, Tensor, Var};
use sdbooth_ops as ops;

use crate::config::{Activation, ClipConfig};
use crate::params::Weights;
use crate::{ModelError, ParamStore};

/// CLIP's context length: every window of token ids is this long.
pub const MODEL_MAX_LENGTH: usize = 77;
/// Tokens per window between BOS and EOS.
pub const WINDOW_TOKENS: usize = MODEL_MAX_LENGTH - 2;

const TOKEN_EMBEDDING: &str = "text_model.embeddings.token_embedding.weight";
const POSITION_EMBEDDING: &str = "text_model.embeddings.position_embedding.weight";
const FINAL_LN: &str = "text_model.final_layer_norm";

/// Receives one block's finished parameter gradients: `(diffusers name, gradient)`, detached, in
/// the parameter's dtype. Same signature as the U-Net's hook, so one closure serves both.
pub type GradHook<'a> = dyn FnMut(&[(String, Tensor)]) -> candle_core::Result<()> + 'a;

fn layer_prefix(i: usize) -> String {
    format!("text_model.encoder.layers.{i}")
}

/// Parameter names and shapes of the text encoder, in diffusers/transformers naming.
/// (`text_model.embeddings.position_ids`, a buffer some checkpoints carry, is not a parameter.)
pub fn param_shapes(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = vec![
        (TOKEN_EMBEDDING.to_string(), vec![cfg.vocab_size, d]),
        (POSITION_EMBEDDING.to_string(), vec![cfg.max_position_embeddings, d]),
    ];
    for i in 0..cfg.num_hidden_layers {
        let p = layer_prefix(i);
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
            out.push((format!("{p}.self_attn.{proj}.bias"), vec![d]));
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            out.push((format!("{p}.{ln}.weight"), vec![d]));
            out.push((format!("{p}.{ln}.bias"), vec![d]));
        }
        out.push((format!("{p}.mlp.fc1.weight"), vec![ff, d]));
        out.push((format!("{p}.mlp.fc1.bias"), vec![ff]));
        out.push((format!("{p}.mlp.fc2.weight"), vec![d, ff]));
        out.push((format!("{p}.mlp.fc2.bias"), vec![d]));
    }
    out.push((format!("{FINAL_LN}.weight"), vec![d]));
    out.push((format!("{FINAL_LN}.bias"), vec![d]));
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
        ClipTextModel { cfg: cfg.clone() }
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

    /// Token + position embeddings of ids `[N, T]` → `[N, T, hidden]`.
    fn embeddings(&self, w: &Weights, ids: &Tensor) -> Result<Tensor, ModelError> {
        let t = ids.dim(1)?;
        let tok = ops::embedding(ids, &w.get(TOKEN_EMBEDDING)?)?;
        // position_ids are 0..T: a narrow of the table is the same lookup, cheaper.
        let pos = w.get(POSITION_EMBEDDING)?.narrow(0, 0, t)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// One pre-norm encoder layer: x + attn(ln1(x)), then + mlp(ln2(x)). `x` is `[N, T, D]`.
    fn layer(&self, w: &Weights, i: usize, x: &Tensor) -> Result<Tensor, ModelError> {
        let p = layer_prefix(i);
        let eps = self.cfg.layer_norm_eps;
        let x = w.cast(x)?;
        let (n, t, d) = x.dims3()?;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;

        let (g, b) = w.wb(&format!("{p}.layer_norm1"))?;
        let h = ops::layer_norm(&x, &g, &b, eps)?;
        let split = |name: &str| -> Result<Tensor, ModelError> {
            let (wt, bias) = w.wb(&format!("{p}.self_attn.{name}"))?;
            let y = ops::linear(&h, &wt, Some(&bias))?;
            Ok(y.reshape((n, t, heads, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (split("q_proj")?, split("k_proj")?, split("v_proj")?);
        // Causal: token i sees tokens <= i (transformers' causal_attention_mask).
        let a = ops::attention(&q, &k, &v, true)?.transpose(1, 2)?.reshape((n, t, d))?;
        let (wt, bias) = w.wb(&format!("{p}.self_attn.out_proj"))?;
        let x = (x + ops::linear(&a, &wt, Some(&bias))?)?;

        let (g, b) = w.wb(&format!("{p}.layer_norm2"))?;
        let h = ops::layer_norm(&x, &g, &b, eps)?;
        let (wt, bias) = w.wb(&format!("{p}.mlp.fc1"))?;
        let h = ops::linear(&h, &wt, Some(&bias))?;
        let h = match self.cfg.hidden_act {
            Activation::QuickGelu => ops::quick_gelu(&h)?,
            Activation::Gelu => ops::gelu_erf(&h)?,
        };
        let (wt, bias) = w.wb(&format!("{p}.mlp.fc2"))?;
        Ok((x + ops::linear(&h, &wt, Some(&bias))?)?)
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
        let mut x = self.embeddings(w, &ids.flat)?;
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
        let track = !opts.checkpointing;
        let w = Weights { params, track, dtype: opts.compute_dtype };
        // The embeddings are recomputed in backward either way: a lookup costs nothing.
        let mut x = self.embeddings(&Weights { track: false, ..w }, &ids.flat)?;
        let mut inputs = Vec::with_capacity(n_layers + 1);
        let mut graphs = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let leaf = Var::from_tensor(&x.detach())?.as_tensor().clone();
            let out = self.layer(&w, i, &leaf)?;
            x = out.detach();
            inputs.push(leaf);
            if track {
                graphs.push(out);
            }
        }
        let leaf = Var::from_tensor(&x)?.as_tensor().clone();
        let output = self.head(&Weights { track: false, ..w }, &leaf, &ids)?;
        inputs.push(leaf);
        Ok(ClipTape { model: self, params, opts, ids, inputs, graphs, output })
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
    model: &'a ClipTextModel,
    params: &'a ParamStore,
    opts: ClipTrainOptions,
    ids: Ids,
    /// Input leaf of each layer, then of the head.
    inputs: Vec<Tensor>,
    /// Without checkpointing: each layer's output, still attached to its graph.
    graphs: Vec<Tensor>,
    output: Tensor,
}

impl ClipTape<'_> {
    /// The encoder output (detached), in the compute dtype.
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Backward from `grad_output` = dLoss/d output. Each block's parameter gradients go to
    /// `hook` as soon as they are final, in reverse order: final layer norm, layer L-1, ..., 0,
    /// embeddings. Layers beyond `clip_skip` get no call (their gradient is zero).
    pub fn backward(mut self, grad_output: &Tensor, hook: &mut GradHook) -> Result<(), ModelError> {
        if grad_output.dims() != self.output.dims() {
            return Err(ModelError::BadInput(format!(
                "text encoder output gradient has shape {:?}, output {:?}",
                grad_output.dims(),
                self.output.dims()
            )));
        }
        let model = self.model;
        let w = Weights { params: self.params, track: true, dtype: self.opts.compute_dtype };

        let head_in = self.inputs.pop().ok_or_else(|| ModelError::BadInput("empty tape".into()))?;
        let out = model.head(&w, &head_in, &self.ids)?;
        let mut g = self.step(&out, grad_output, Some(&head_in), &[FINAL_LN], hook)?;

        while let Some(input) = self.inputs.pop() {
            let i = self.inputs.len();
            let out = match self.graphs.pop() {
                Some(out) => out,
                None => model.layer(&w, i, &input)?,
            };
            let prefix = layer_prefix(i);
            let groups: Vec<String> = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
                .iter()
                .chain(&["self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"])
                .map(|s| format!("{prefix}.{s}"))
                .collect();
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            g = self.step(&out, &g, Some(&input), &groups, hook)?;
        }

        let grads = embedding_grads(self.params, &self.ids.flat, &g)?;
        hook(&grads)?;
        Ok(())
    }

    /// Backward through one block: returns the gradient of its input leaf and gives the
    /// gradients of the `weight`/`bias` pairs under `groups` to the hook.
    fn step(
        &self,
        out: &Tensor,
        g: &Tensor,
        input: Option<&Tensor>,
        groups: &[&str],
        hook: &mut GradHook,
    ) -> Result<Tensor, ModelError> {
        let store = seeded_backward(out, g)?;
        let names: Vec<String> =
            groups.iter().flat_map(|p| [format!("{p}.weight"), format!("{p}.bias")]).collect();
        let grads = collect(self.params, &store, names.iter().map(String::as_str))?;
        let gin = match input.and_then(|x| store.get(x)) {
            Some(gi) => gi.detach(),
            None => return Err(ModelError::BadInput("text encoder block input got no gradient".into())),
        };
        drop(store);
        hook(&grads)?;
        Ok(gin)
    }
}

/// Gradients of the token and position tables from dLoss/d embeddings `g` `[N, T, D]`, written
/// directly rather than through autograd: candle's `index_select` backward builds the dense
/// vocab x D table gradient (152 MB for CLIP-L) several times over (zeros, index_add, and the
/// leaf's zero accumulator plus a sum); here it is one zeroed table and one `index_add`.
/// The gradients come back in each table's dtype.
fn embedding_grads(
    params: &ParamStore,
    ids: &Tensor,
    g: &Tensor,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    let (n, t, d) = g.dims3()?;
    let tok = params.get(TOKEN_EMBEDDING)?;
    let pos = params.get(POSITION_EMBEDDING)?;
    let g_tok = g.to_dtype(tok.dtype())?.reshape((n * t, d))?;
    let tok_grad = tok.zeros_like()?.index_add(&ids.flatten_all()?, &g_tok, 0)?;
    // Every sample uses positions 0..T; rows T.. of the table get nothing.
    let pos_grad = g.to_dtype(pos.dtype())?.sum(0)?.pad_with_zeros(0, 0, pos.dim(0)? - t)?;
    Ok(vec![
        (TOKEN_EMBEDDING.to_string(), tok_grad.detach()),
        (POSITION_EMBEDDING.to_string(), pos_grad.detach()),
    ])
}

/// `backward()` seeds with ones, so the upstream gradient enters as `(out * g).sum_all()`.
fn seeded_backward(out: &Tensor, g: &Tensor) -> Result<candle_core::backprop::GradStore, ModelError> {
    let g = if g.dtype() == out.dtype() { g.detach() } else { g.to_dtype(out.dtype())?.detach() };
    Ok((out * g)?.sum_all()?.backward()?)
}

fn collect<'n>(
    params: &ParamStore,
    store: &candle_core::backprop::GradStore,
    names: impl Iterator<Item = &'n str>,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    names
        .map(|name| {
            let p = params.get(name)?;
            // A parameter that did not influence the output (cannot happen here) gets zeros.
            let g = match store.get(p) {
                Some(g) => g.detach(),
                None => p.zeros_like()?,
            };
            Ok((name.to_string(), g))
        })
        .collect()
}
