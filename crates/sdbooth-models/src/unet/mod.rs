//! UNet2DConditionModel (Stable Diffusion 1.x and 2.x) with diffusers' parameter names.
//!
//! The network is held as a flat list of *nodes* in topological order (time embedding, conv_in,
//! every ResNet block, every Transformer2D block, down/upsamplers, the output head). Each node
//! reads numbered *slots* and writes exactly one new slot, so skip connections, the timestep
//! embedding and the text embeddings are plain slots read by many nodes. The same list drives the
//! plain forward (`UNet::forward`), the parameter list (`param_shapes`) and the hand-chained
//! training backward (`train.rs`), so the three can never disagree about names or structure.

mod blocks;
mod train;

use candle_core::{DType, Tensor};

pub use train::{GradHook, TrainOptions, UNetGrads, UNetTape};

use crate::config::{BlockKind, UNetConfig};
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
    /// `time_proj` (sinusoids, no parameters) + `time_embedding.linear_1/2`.
    TimeEmbed,
    ConvIn,
    /// ResnetBlock2D; with `skip` the input is `cat([h, skip], channels)` (up path).
    Resnet {
        cin: usize,
        cout: usize,
        skip: bool,
    },
    /// Transformer2DModel with one BasicTransformerBlock.
    Transformer {
        channels: usize,
        heads: usize,
    },
    Downsample {
        channels: usize,
    },
    Upsample {
        channels: usize,
    },
    /// conv_norm_out + SiLU + conv_out.
    Out,
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub kind: NodeKind,
    /// Parameter name prefix (`down_blocks.0.resnets.0`); empty for top-level nodes.
    pub prefix: String,
    /// Slots read, in the order the node's compute expects them.
    pub inputs: Vec<usize>,
    /// Names and shapes of the parameters this node (and only this node) uses.
    pub params: Vec<(String, Vec<usize>)>,
}

/// The U-Net of one configuration. Holds no weights: they live in a `ParamStore` so the same
/// model runs with trained, frozen (detached) or cast weights.
#[derive(Clone, Debug)]
pub struct UNet {
    cfg: UNetConfig,
    nodes: Vec<Node>,
}

/// Every parameter of the U-Net under diffusers' names, with its shape, in forward order.
pub fn param_shapes(cfg: &UNetConfig) -> Vec<(String, Vec<usize>)> {
    build_nodes(cfg).into_iter().flat_map(|n| n.params).collect()
}

fn norm(p: &str, name: &str, c: usize, out: &mut Vec<(String, Vec<usize>)>) {
    out.push((format!("{p}{name}.weight"), vec![c]));
    out.push((format!("{p}{name}.bias"), vec![c]));
}

fn conv(p: &str, name: &str, cout: usize, cin: usize, k: usize, out: &mut Vec<(String, Vec<usize>)>) {
    out.push((format!("{p}{name}.weight"), vec![cout, cin, k, k]));
    out.push((format!("{p}{name}.bias"), vec![cout]));
}

fn linear(p: &str, name: &str, cout: usize, cin: usize, bias: bool, out: &mut Vec<(String, Vec<usize>)>) {
    out.push((format!("{p}{name}.weight"), vec![cout, cin]));
    if bias {
        out.push((format!("{p}{name}.bias"), vec![cout]));
    }
}

/// `prefix.` or the empty string, so parameter names join without a leading dot.
fn dotted(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}.")
    }
}

fn node_params(cfg: &UNetConfig, kind: &NodeKind, prefix: &str) -> Vec<(String, Vec<usize>)> {
    let p = dotted(prefix);
    let c0 = cfg.block_out_channels[0];
    let temb = c0 * 4;
    let mut v = Vec::new();
    match *kind {
        NodeKind::TimeEmbed => {
            linear(&p, "time_embedding.linear_1", temb, c0, true, &mut v);
            linear(&p, "time_embedding.linear_2", temb, temb, true, &mut v);
        }
        NodeKind::ConvIn => conv(&p, "conv_in", c0, cfg.in_channels, 3, &mut v),
        NodeKind::Resnet { cin, cout, .. } => {
            norm(&p, "norm1", cin, &mut v);
            conv(&p, "conv1", cout, cin, 3, &mut v);
            linear(&p, "time_emb_proj", cout, temb, true, &mut v);
            norm(&p, "norm2", cout, &mut v);
            conv(&p, "conv2", cout, cout, 3, &mut v);
            if cin != cout {
                conv(&p, "conv_shortcut", cout, cin, 1, &mut v);
            }
        }
        NodeKind::Transformer { channels: c, .. } => {
            let ctx = cfg.cross_attention_dim;
            norm(&p, "norm", c, &mut v);
            if cfg.use_linear_projection {
                linear(&p, "proj_in", c, c, true, &mut v);
            } else {
                conv(&p, "proj_in", c, c, 1, &mut v);
            }
            let b = format!("{p}transformer_blocks.0.");
            norm(&b, "norm1", c, &mut v);
            for (attn, kv_dim) in [("attn1", c), ("attn2", ctx)] {
                linear(&b, &format!("{attn}.to_q"), c, c, false, &mut v);
                linear(&b, &format!("{attn}.to_k"), c, kv_dim, false, &mut v);
                linear(&b, &format!("{attn}.to_v"), c, kv_dim, false, &mut v);
                linear(&b, &format!("{attn}.to_out.0"), c, c, true, &mut v);
                if attn == "attn1" {
                    norm(&b, "norm2", c, &mut v);
                }
            }
            norm(&b, "norm3", c, &mut v);
            // GEGLU: one projection to [value, gate], inner width 4c.
            linear(&b, "ff.net.0.proj", 8 * c, c, true, &mut v);
            linear(&b, "ff.net.2", c, 4 * c, true, &mut v);
            if cfg.use_linear_projection {
                linear(&p, "proj_out", c, c, true, &mut v);
            } else {
                conv(&p, "proj_out", c, c, 1, &mut v);
            }
        }
        NodeKind::Downsample { channels } | NodeKind::Upsample { channels } => {
            conv(&p, "conv", channels, channels, 3, &mut v)
        }
        NodeKind::Out => {
            norm(&p, "conv_norm_out", c0, &mut v);
            conv(&p, "conv_out", cfg.out_channels, c0, 3, &mut v);
        }
    }
    v
}

/// Lays the network out as diffusers' UNet2DConditionModel.__init__ does.
fn build_nodes(cfg: &UNetConfig) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut push = |kind: NodeKind, prefix: String, inputs: Vec<usize>| -> usize {
        let params = node_params(cfg, &kind, &prefix);
        nodes.push(Node { kind, prefix, inputs, params });
        FIRST_NODE_SLOT + nodes.len() - 1
    };
    let emb = push(NodeKind::TimeEmbed, String::new(), vec![SLOT_TIMESTEPS]);
    let mut h = push(NodeKind::ConvIn, String::new(), vec![SLOT_LATENTS]);
    // Outputs the up path concatenates back, in push order (diffusers' down_block_res_samples).
    let mut skips = vec![(h, cfg.block_out_channels[0])];
    let n_blocks = cfg.block_out_channels.len();
    let mut cout = cfg.block_out_channels[0];
    for (i, kind) in cfg.down_blocks.iter().enumerate() {
        let cin_block = cout;
        cout = cfg.block_out_channels[i];
        for j in 0..cfg.layers_per_block {
            let cin = if j == 0 { cin_block } else { cout };
            let p = format!("down_blocks.{i}");
            h = push(NodeKind::Resnet { cin, cout, skip: false }, format!("{p}.resnets.{j}"), vec![h, emb]);
            if *kind == BlockKind::CrossAttn {
                let heads = cfg.num_heads[i];
                h = push(
                    NodeKind::Transformer { channels: cout, heads },
                    format!("{p}.attentions.{j}"),
                    vec![h, SLOT_CTX],
                );
            }
            skips.push((h, cout));
        }
        if i + 1 < n_blocks {
            let p = format!("down_blocks.{i}.downsamplers.0");
            h = push(NodeKind::Downsample { channels: cout }, p, vec![h]);
            skips.push((h, cout));
        }
    }
    let c_mid = cfg.block_out_channels[n_blocks - 1];
    let mid = NodeKind::Resnet { cin: c_mid, cout: c_mid, skip: false };
    h = push(mid.clone(), "mid_block.resnets.0".into(), vec![h, emb]);
    let heads = cfg.num_heads[n_blocks - 1];
    h = push(
        NodeKind::Transformer { channels: c_mid, heads },
        "mid_block.attentions.0".into(),
        vec![h, SLOT_CTX],
    );
    h = push(mid, "mid_block.resnets.1".into(), vec![h, emb]);

    let rev_ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let mut out_ch = rev_ch[0];
    for (i, kind) in cfg.down_blocks.iter().rev().enumerate() {
        let prev_out = out_ch;
        out_ch = rev_ch[i];
        let p = format!("up_blocks.{i}");
        for j in 0..=cfg.layers_per_block {
            let (skip, skip_ch) = skips.pop().expect("down path pushes layers_per_block + 1 per level");
            let cin = if j == 0 { prev_out } else { out_ch };
            let kind_r = NodeKind::Resnet { cin: cin + skip_ch, cout: out_ch, skip: true };
            h = push(kind_r, format!("{p}.resnets.{j}"), vec![h, skip, emb]);
            if *kind == BlockKind::CrossAttn {
                let heads = cfg.num_heads[n_blocks - 1 - i];
                let kind_t = NodeKind::Transformer { channels: out_ch, heads };
                h = push(kind_t, format!("{p}.attentions.{j}"), vec![h, SLOT_CTX]);
            }
        }
        if i + 1 < n_blocks {
            h = push(NodeKind::Upsample { channels: out_ch }, format!("{p}.upsamplers.0"), vec![h]);
        }
    }
    push(NodeKind::Out, String::new(), vec![h]);
    nodes
}

impl UNet {
    pub fn new(cfg: &UNetConfig) -> Self {
        UNet { cfg: cfg.clone(), nodes: build_nodes(cfg) }
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.nodes.iter().flat_map(|n| n.params.iter().cloned()).collect()
    }

    pub(crate) fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub(crate) fn num_slots(&self) -> usize {
        FIRST_NODE_SLOT + self.nodes.len()
    }

    /// Checks the latent size: three 2x downsamples need h and w divisible by 2^(levels-1).
    fn check_input(&self, latents: &Tensor) -> Result<(), ModelError> {
        let (_, c, h, w) = latents.dims4()?;
        let factor = 1usize << (self.cfg.block_out_channels.len() - 1);
        if c != self.cfg.in_channels || h % factor != 0 || w % factor != 0 {
            return Err(ModelError::BadInput(format!(
                "U-Net latents must be [B, {}, h, w] with h and w multiples of {factor}, got {:?}",
                self.cfg.in_channels,
                latents.dims()
            )));
        }
        Ok(())
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
        let w = blocks::Weights { params, track: true, dtype: None };
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
        let w = blocks::Weights { params, track: false, dtype };
        self.run_all(&w, latents, timesteps, encoder_hidden_states)
    }

    fn run_all(
        &self,
        w: &blocks::Weights,
        latents: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.check_input(latents)?;
        let mut slots: Vec<Option<Tensor>> = vec![None; self.num_slots()];
        slots[SLOT_LATENTS] = Some(latents.clone());
        slots[SLOT_TIMESTEPS] = Some(timesteps.clone());
        slots[SLOT_CTX] = Some(ctx.clone());
        for (i, node) in self.nodes.iter().enumerate() {
            let out = {
                let inputs = gather(&slots, &node.inputs)?;
                blocks::run_node(&self.cfg, node, w, &inputs)?
            };
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
    pub(crate) fn last_reader(&self, slot: usize) -> usize {
        self.nodes.iter().rposition(|n| n.inputs.contains(&slot)).unwrap_or(0)
    }
}

pub(crate) fn gather(slots: &[Option<Tensor>], idx: &[usize]) -> Result<Vec<Tensor>, ModelError> {
    idx.iter()
        .map(|&s| slots[s].clone().ok_or_else(|| ModelError::BadInput(format!("U-Net slot {s} is empty"))))
        .collect()
}
