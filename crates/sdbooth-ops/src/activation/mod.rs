//! Element-wise activations, composed of candle primitives whose backward candle has (and which
//! run on every device). They are memory-bound; a fused kernel would save one pass at most. Such
//! a kernel (e.g. GEGLU) would go in `cpu.rs`/`cuda.rs` beside this file, as for the other ops.

use candle_core::{Result, Tensor, D};

/// GELU with the exact erf formulation (PyTorch's default `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// CLIP's `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let sigmoid = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    x.mul(&sigmoid)
}

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// GEGLU: the last dimension holds `[value, gate]`; returns `value * gelu(gate)`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let full = x.dim(D::Minus1)?;
    if full % 2 != 0 {
        candle_core::bail!("geglu: last dimension {full} is odd; it must hold [value, gate] halves");
    }
    let half = full / 2;
    let value = x.narrow(D::Minus1, 0, half)?;
    let gate = x.narrow(D::Minus1, half, half)?;
    value.mul(&gelu_erf(&gate)?)
}
