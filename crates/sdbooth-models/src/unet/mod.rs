//! UNet2DConditionModel (Stable Diffusion 1.x and 2.x) with diffusers' parameter names.
//!
//! The network is held as a flat list of *nodes* in topological order (time embedding, conv_in,
//! every ResNet block, every Transformer2D block, down/upsamplers, the output head), each a layer
//! of `crate::layers` under a parameter prefix. Each node reads numbered *slots* and writes
//! exactly one new slot, so skip connections, the timestep embedding and the text embeddings are
//! plain slots read by many nodes. The same list drives the plain forward (`UNet::forward`), the
//! parameter list (`param_shapes`), the FLOP count (`forward_flops`) and the training tape
//! (`train.rs`), so they can never disagree about names or structure.
//!
//! Any latent size works, as in diffusers: each downsampler gives `ceil(h / 2)`, and each
//! upsampler returns to the size of the skip connection it is concatenated with (diffusers'
//! `upsample_size`, forwarded when the size is not a multiple of 2^(number of upsamplers)).

mod train;

use candle_core::{DType, Tensor};
use sdbooth_ops as ops;

pub use crate::tape::GradHook;
pub use train::{TrainOptions, UNetGrads, UNetTape};

use crate::config::{BlockKind, UNetConfig};
use crate::layers::embeddings::TimestepEmbedding;
use crate::layers::resample::{Downsample, DownsamplePadding, Upsample};
use crate::layers::resnet::Resnet;
use crate::layers::transformer::Transformer2D;
use crate::layers::{conv_flops, push_conv, push_norm, ParamShapes};
use crate::params::Weights;
use crate::tape::{gather, Blocks};
use crate::{ModelError, ParamStore};

/// Slot of the noisy latents `[B, in_channels, h, w]`.
pub(crate) const SLOT_LATENTS: usize = 0;
/// Slot of the timesteps `[B]` (f32).
pub(crate) const SLOT_TIMESTEPS: usize = 1;
/// Slot of the text embeddings `[B, tokens, cross_attention_dim]`.
pub(crate) const SLOT_CTX: usize = 2;
/// Node `i` writes slot `FIRST_NODE_SLOT + i`.
pub(crate) const FIRST_NODE_SLOT: usize = 3;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum NodeKind {
    TimeEmbed(TimestepEmbedding),
    ConvIn {
        cin: usize,
        cout: usize,
    },
    /// With `skip` the input is `cat([h, skip], channels)` (up path).
    Resnet {
        layer: Resnet,
        skip: bool,
    },
    Transformer(Transformer2D),
    Downsample(Downsample),
    Upsample(Upsample),
    /// conv_norm_out + SiLU + conv_out.
    Out {
        cin: usize,
        cout: usize,
        groups: usize,
        eps: f64,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub kind: NodeKind,
    /// Parameter name prefix (`down_blocks.0.resnets.0`); empty for top-level nodes.
    pub prefix: String,
    /// Slots read, in the order the node's compute expects them.
    pub inputs: Vec<usize>,
    /// Names and shapes of the parameters this node (and only this node) uses.
    pub params: ParamShapes,
    /// Resolution level of the node's output: the latent size halved `level` times (rounded up).
    pub level: usize,
}

impl NodeKind {
    fn params(&self, p: &str) -> ParamShapes {
        let mut v = Vec::new();
        match self {
            NodeKind::TimeEmbed(layer) => return layer.params(p),
            NodeKind::ConvIn { cin, cout } => push_conv(&mut v, "conv_in", *cout, *cin, 3),
            NodeKind::Resnet { layer, .. } => return layer.params(p),
            NodeKind::Transformer(layer) => return layer.params(p),
            NodeKind::Downsample(layer) => return layer.params(p),
            NodeKind::Upsample(layer) => return layer.params(p),
            NodeKind::Out { cin, cout, .. } => {
                push_norm(&mut v, "conv_norm_out", *cin);
                push_conv(&mut v, "conv_out", *cout, *cin, 3);
            }
        }
        v
    }

    /// Forward FLOPs per sample at `pixels` output pixels with `ctx` text tokens.
    fn flops(&self, pixels: f64, ctx: f64) -> f64 {
        match self {
            NodeKind::TimeEmbed(layer) => layer.flops(),
            NodeKind::ConvIn { cin, cout } | NodeKind::Out { cin, cout, .. } => {
                conv_flops(*cout, *cin, 3, pixels)
            }
            NodeKind::Resnet { layer, .. } => layer.flops(pixels),
            NodeKind::Transformer(layer) => layer.flops(pixels, ctx),
            NodeKind::Downsample(layer) => layer.flops(pixels),
            NodeKind::Upsample(layer) => layer.flops(pixels),
        }
    }
}

/// The U-Net of one configuration. Holds no weights: they live in a `ParamStore` so the same
/// model runs with trained, frozen (detached) or cast weights.
#[derive(Clone, Debug)]
pub struct UNet {
    cfg: UNetConfig,
    nodes: Vec<Node>,
}

/// Every parameter of the U-Net under diffusers' names, with its shape, in forward order.
pub fn param_shapes(cfg: &UNetConfig) -> ParamShapes {
    build_nodes(cfg).into_iter().flat_map(|n| n.params).collect()
}

/// Lays the network out as diffusers' UNet2DConditionModel.__init__ does.
fn build_nodes(cfg: &UNetConfig) -> Vec<Node> {
    let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
    let c0 = cfg.block_out_channels[0];
    let temb = 4 * c0;
    let resnet = |cin, cout| Resnet { cin, cout, temb: Some(temb), groups, eps };
    let transformer = |channels, heads| {
        NodeKind::Transformer(Transformer2D {
            channels,
            heads,
            ctx_dim: cfg.cross_attention_dim,
            linear_projection: cfg.use_linear_projection,
            groups,
        })
    };
    let mut nodes: Vec<Node> = Vec::new();
    let mut push = |kind: NodeKind, prefix: String, inputs: Vec<usize>, level: usize| -> usize {
        let params = kind.params(&prefix);
        nodes.push(Node { kind, prefix, inputs, params, level });
        FIRST_NODE_SLOT + nodes.len() - 1
    };
    let time = TimestepEmbedding {
        channels: c0,
        dim: temb,
        flip_sin_to_cos: cfg.flip_sin_to_cos,
        freq_shift: cfg.freq_shift,
    };
    let emb = push(NodeKind::TimeEmbed(time), String::new(), vec![SLOT_TIMESTEPS], 0);
    let conv_in = NodeKind::ConvIn { cin: cfg.in_channels, cout: c0 };
    let mut h = push(conv_in, String::new(), vec![SLOT_LATENTS], 0);
    // Outputs the up path concatenates back, in push order (diffusers' down_block_res_samples).
    let mut skips = vec![(h, c0)];
    let n_blocks = cfg.block_out_channels.len();
    let mut cout = c0;
    for (i, kind) in cfg.down_blocks.iter().enumerate() {
        let cin_block = cout;
        cout = cfg.block_out_channels[i];
        for j in 0..cfg.layers_per_block {
            let cin = if j == 0 { cin_block } else { cout };
            let p = format!("down_blocks.{i}");
            let r = NodeKind::Resnet { layer: resnet(cin, cout), skip: false };
            h = push(r, format!("{p}.resnets.{j}"), vec![h, emb], i);
            if *kind == BlockKind::CrossAttn {
                let t = transformer(cout, cfg.num_heads[i]);
                h = push(t, format!("{p}.attentions.{j}"), vec![h, SLOT_CTX], i);
            }
            skips.push((h, cout));
        }
        if i + 1 < n_blocks {
            let p = format!("down_blocks.{i}.downsamplers.0");
            let d = Downsample { channels: cout, padding: DownsamplePadding::Symmetric };
            h = push(NodeKind::Downsample(d), p, vec![h], i + 1);
            skips.push((h, cout));
        }
    }
    let c_mid = cfg.block_out_channels[n_blocks - 1];
    let deepest = n_blocks - 1;
    let mid = || NodeKind::Resnet { layer: resnet(c_mid, c_mid), skip: false };
    h = push(mid(), "mid_block.resnets.0".into(), vec![h, emb], deepest);
    let t = transformer(c_mid, cfg.num_heads[n_blocks - 1]);
    h = push(t, "mid_block.attentions.0".into(), vec![h, SLOT_CTX], deepest);
    h = push(mid(), "mid_block.resnets.1".into(), vec![h, emb], deepest);

    let rev_ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let mut out_ch = rev_ch[0];
    for (i, kind) in cfg.down_blocks.iter().rev().enumerate() {
        let prev_out = out_ch;
        out_ch = rev_ch[i];
        let level = deepest - i;
        let p = format!("up_blocks.{i}");
        for j in 0..=cfg.layers_per_block {
            let (skip, skip_ch) = skips.pop().expect("down path pushes layers_per_block + 1 per level");
            let cin = if j == 0 { prev_out } else { out_ch };
            let r = NodeKind::Resnet { layer: resnet(cin + skip_ch, out_ch), skip: true };
            h = push(r, format!("{p}.resnets.{j}"), vec![h, skip, emb], level);
            if *kind == BlockKind::CrossAttn {
                let t = transformer(out_ch, cfg.num_heads[n_blocks - 1 - i]);
                h = push(t, format!("{p}.attentions.{j}"), vec![h, SLOT_CTX], level);
            }
        }
        if i + 1 < n_blocks {
            let u = NodeKind::Upsample(Upsample { channels: out_ch });
            h = push(u, format!("{p}.upsamplers.0"), vec![h], level - 1);
        }
    }
    let out = NodeKind::Out { cin: c0, cout: cfg.out_channels, groups, eps };
    push(out, String::new(), vec![h], 0);
    nodes
}

impl UNet {
    pub fn new(cfg: &UNetConfig) -> Self {
        UNet { cfg: cfg.clone(), nodes: build_nodes(cfg) }
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    pub fn param_shapes(&self) -> ParamShapes {
        self.nodes.iter().flat_map(|n| n.params.iter().cloned()).collect()
    }

    /// Forward FLOPs for one sample at latent size `h x w` with `ctx` text tokens: every
    /// convolution and linear layer at the resolution its node runs at, plus the attention
    /// products (multiply-adds x 2; norms and activations are not counted).
    pub fn forward_flops(&self, h: usize, w: usize, ctx: usize) -> f64 {
        let sizes = self.level_sizes(h, w);
        self.nodes
            .iter()
            .map(|n| {
                let (lh, lw) = sizes[n.level];
                n.kind.flops((lh * lw) as f64, ctx as f64)
            })
            .sum()
    }

    /// Feature-map size at each resolution level for latents of `h x w` (each downsampler
    /// halves, rounding up).
    fn level_sizes(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        let mut sizes = vec![(h, w)];
        for _ in 1..self.cfg.block_out_channels.len() {
            let (lh, lw) = sizes[sizes.len() - 1];
            sizes.push(Downsample::output_size(lh, lw));
        }
        sizes
    }

    /// Checks the latents and prepares a run at their size. Every positive size works (see the
    /// module docs); images are refused earlier by [`crate::vae::check_image_size`].
    fn prepare(&self, latents: &Tensor) -> Result<UNetRun<'_>, ModelError> {
        let (_, c, h, w) = latents.dims4()?;
        if c != self.cfg.in_channels || h == 0 || w == 0 {
            return Err(ModelError::BadInput(format!(
                "U-Net latents must be [B, {}, h, w] with h, w >= 1, got {:?}",
                self.cfg.in_channels,
                latents.dims()
            )));
        }
        Ok(UNetRun { unet: self, sizes: self.level_sizes(h, w) })
    }

    /// Plain forward as one autograd graph: ops on tracked parameters (and on tracked inputs)
    /// record a graph, so `(out * g).sum_all()?.backward()` differentiates the whole network.
    /// Runs in the parameters' dtype. Returns the prediction `[B, out_channels, h, w]`.
    pub fn forward(
        &self,
        params: &ParamStore,
        latents: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let w = Weights { params, track: true, dtype: None };
        self.run_all(&w, latents, timesteps, encoder_hidden_states)
    }

    /// Forward with detached parameters (no graph is recorded for them), in `dtype` when given
    /// (weights cast per use): inference, sampling, frozen U-Net.
    pub fn forward_frozen(
        &self,
        params: &ParamStore,
        latents: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        dtype: Option<DType>,
    ) -> Result<Tensor, ModelError> {
        let w = Weights { params, track: false, dtype };
        self.run_all(&w, latents, timesteps, encoder_hidden_states)
    }

    fn run_all(
        &self,
        w: &Weights,
        latents: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let run = self.prepare(latents)?;
        let mut slots: Vec<Option<Tensor>> = vec![None; FIRST_NODE_SLOT + self.nodes.len()];
        slots[SLOT_LATENTS] = Some(latents.clone());
        slots[SLOT_TIMESTEPS] = Some(timesteps.clone());
        slots[SLOT_CTX] = Some(ctx.clone());
        for (i, node) in self.nodes.iter().enumerate() {
            let out = run.run_block(w, i, &gather(&slots, &node.inputs)?)?;
            slots[FIRST_NODE_SLOT + i] = Some(out);
            // Drop slots no later node reads, so the plain forward does not hold every activation
            // beyond what the graph itself keeps.
            for &s in &node.inputs {
                if s >= FIRST_NODE_SLOT && self.last_reader(s) == i {
                    slots[s] = None;
                }
            }
        }
        slots.pop().flatten().ok_or_else(|| ModelError::BadInput("U-Net has no nodes".into()))
    }

    /// Index of the last node that reads `slot`.
    fn last_reader(&self, slot: usize) -> usize {
        self.nodes.iter().rposition(|n| n.inputs.contains(&slot)).unwrap_or(0)
    }
}

/// The U-Net at one latent size: what the tape and the plain forward run.
pub(crate) struct UNetRun<'a> {
    unet: &'a UNet,
    /// Feature-map size per resolution level.
    sizes: Vec<(usize, usize)>,
}

impl Blocks for UNetRun<'_> {
    const NAME: &'static str = "U-Net";

    fn num_blocks(&self) -> usize {
        self.unet.nodes.len()
    }

    fn block_inputs(&self, i: usize) -> &[usize] {
        &self.unet.nodes[i].inputs
    }

    fn block_params(&self, i: usize) -> &[(String, Vec<usize>)] {
        &self.unet.nodes[i].params
    }

    fn block_name(&self, i: usize) -> String {
        self.unet.nodes[i].prefix.clone()
    }

    /// Runs one node on its input slot values.
    fn run_block(&self, w: &Weights, i: usize, inputs: &[Tensor]) -> Result<Tensor, ModelError> {
        let node = &self.unet.nodes[i];
        let p = node.prefix.as_str();
        match &node.kind {
            NodeKind::TimeEmbed(layer) => layer.forward(w, p, &inputs[0]),
            NodeKind::ConvIn { .. } => {
                let (wt, b) = w.gemm_wb("conv_in")?;
                Ok(wt.conv2d(&w.cast(&inputs[0])?, Some(&b), 1, 1)?)
            }
            NodeKind::Resnet { layer, skip } => {
                let x = if *skip { Tensor::cat(&[&inputs[0], &inputs[1]], 1)? } else { inputs[0].clone() };
                layer.forward(w, p, &x, Some(&inputs[inputs.len() - 1]))
            }
            NodeKind::Transformer(layer) => layer.forward(w, p, &inputs[0], &w.cast(&inputs[1])?),
            NodeKind::Downsample(layer) => layer.forward(w, p, &inputs[0]),
            NodeKind::Upsample(layer) => layer.forward(w, p, &inputs[0], Some(self.sizes[node.level])),
            NodeKind::Out { groups, eps, .. } => {
                let (g, b) = w.wb("conv_norm_out")?;
                let h = ops::group_norm_silu(&inputs[0], *groups, &g, &b, *eps)?;
                let (wt, b) = w.gemm_wb("conv_out")?;
                // The loss is taken in f32 whatever the compute dtype (kohya: `noise_pred.float()`).
                Ok(wt.conv2d(&h, Some(&b), 1, 1)?.to_dtype(DType::F32)?)
            }
        }
    }
}
