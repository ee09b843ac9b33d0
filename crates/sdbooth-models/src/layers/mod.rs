//! The layers the models are built from, one file each, with each layer's parameter list (names
//! and shapes) beside its forward and its FLOP count, so the three can never disagree:
//!
//! - `resnet`: ResnetBlock2D (U-Net, with a time embedding; VAE, without).
//! - `attention`: multi-head attention with q/k/v/out projections (U-Net transformer blocks,
//!   CLIP's encoder layers) and the VAE's group-normed pixel self-attention.
//! - `transformer`: Transformer2DModel with one BasicTransformerBlock (U-Net).
//! - `embeddings`: the U-Net's timestep embedding and CLIP's token + position embeddings.
//! - `resample`: Downsample2D and Upsample2D (U-Net and VAE).
//!
//! A layer is a small value describing its sizes; `params(prefix)` lists its parameters under
//! diffusers' names below `prefix`, `forward(w, prefix, ...)` reads exactly those parameters
//! through [`Weights`](crate::params::Weights), `flops(...)` counts its forward multiply-adds x 2.

pub(crate) mod attention;
pub(crate) mod embeddings;
pub(crate) mod resample;
pub(crate) mod resnet;
pub(crate) mod transformer;

/// Parameter names (diffusers') and shapes.
pub type ParamShapes = Vec<(String, Vec<usize>)>;

/// `prefix.name`, or `name` for an empty prefix (top-level parameters).
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A GroupNorm or LayerNorm: `weight` and `bias` of `c`.
pub(crate) fn push_norm(out: &mut ParamShapes, name: &str, c: usize) {
    out.push((format!("{name}.weight"), vec![c]));
    out.push((format!("{name}.bias"), vec![c]));
}

/// A `k x k` convolution with bias.
pub(crate) fn push_conv(out: &mut ParamShapes, name: &str, cout: usize, cin: usize, k: usize) {
    out.push((format!("{name}.weight"), vec![cout, cin, k, k]));
    out.push((format!("{name}.bias"), vec![cout]));
}

/// A linear layer `cin -> cout`.
pub(crate) fn push_linear(out: &mut ParamShapes, name: &str, cout: usize, cin: usize, bias: bool) {
    out.push((format!("{name}.weight"), vec![cout, cin]));
    if bias {
        out.push((format!("{name}.bias"), vec![cout]));
    }
}

/// FLOPs of a `k x k` convolution `cin -> cout` producing `pixels` output pixels.
pub(crate) fn conv_flops(cout: usize, cin: usize, k: usize, pixels: f64) -> f64 {
    2.0 * (cout * cin * k * k) as f64 * pixels
}

/// FLOPs of a linear layer `cin -> cout` applied to `tokens` rows.
pub(crate) fn linear_flops(cout: usize, cin: usize, tokens: f64) -> f64 {
    2.0 * (cout * cin) as f64 * tokens
}
