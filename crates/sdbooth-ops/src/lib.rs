//! Differentiable ops for Stable Diffusion training, on candle tensors.
//!
//! Every op here has a backward: either it is composed of candle primitives whose backward
//! candle already has, or it is a candle custom op whose backward is itself a custom op (one per
//! gradient, or one computing several in a pass). Models call only these functions (never
//! candle-nn's fused ops, which have no backward).
//!
//! Conventions: images are `[B, C, H, W]`; attention tensors are `[B, heads, tokens, head_dim]`;
//! linear weights are `[out, in]` as in PyTorch. Inputs may be f32, bf16 or f16; reductions
//! accumulate in f32 (f64 for norm statistics).
//!
//! # Layout: one folder per op, one file per backend
//!
//! Each op with kernels of its own lives in `src/<op>/`: `mod.rs` holds the contract (the public
//! function, shape and dtype validation, the candle custom ops for forward and backward, what is
//! saved between them) and `cpu.rs` the CPU kernels on f32 slices. **A backend plugs in beside
//! `cpu.rs`**: a `cuda.rs` per op holding its kernels, called from a `cuda_fwd` added to each
//! custom op in `mod.rs` next to its `cpu_fwd`, and the device accepted by
//! `backend::has_kernels` (for that op). Statistics kept from forward for backward (attention's
//! log-sum-exp, the norms' mean and 1/std) are tensors on the op's device, so a backend's forward
//! produces them and its backward reads them like any operand. Ops composed of candle primitives
//! only (`activation`, `embed`) run on every backend as they are.
//!
//! # Code paths and `SDBOOTH_REFERENCE_OPS`
//!
//! On CPU, conv2d, linear, attention, group_norm(+SiLU), layer_norm, softmax, nearest 2x
//! upsampling and the embedding table gradient run our own kernels: their gradients skip
//! untracked operands and their reductions run in fixed chunks, so results do not depend on the
//! thread count. On any device without kernels of this crate the
//! same functions run [`reference`](mod@reference), compositions of candle primitives (autograd gives their
//! backward), except where [`generic`] has a device-generic implementation of an op with a
//! backward of its own (attention by blocks of queries, recomputing instead of keeping the
//! scores; conv2d with GEMM/convolution gradients instead of candle's conv_transpose2d). Setting the environment variable `SDBOOTH_REFERENCE_OPS=1` (read once per process,
//! see [`reference_ops_forced`]) sends the CPU down that reference path too, so the code a GPU
//! runs can be tested on a machine without one.

mod activation;
mod alloc;
mod attention;
mod backend;
mod bf16_gemm;
mod cast;
mod conv;
mod copy;
mod cpu;
mod embed;
mod linear;
mod norm;
pub mod reference;
mod residual;
mod seed;
pub mod selftest;
mod softmax;
mod threads;
mod upsample;

/// The conv2d kernels on raw f32 slices, for the per-pass benches (not a stable API).
#[doc(hidden)]
pub mod kernels {
    pub use crate::conv::cpu::{forward as conv2d_forward, grad_input as conv2d_grad_input};
    pub use crate::conv::{cpu::grad_weight as conv2d_grad_weight, Geom as Conv2dGeom};
    pub use crate::cpu::{GemmElem, Mat, Precision};

    /// The f32 GEMM the CPU kernels use (the `gemm` crate), multi-threaded: `dst[m×n] (row
    /// stride dst_rs) = (accumulate ? dst : 0) + a · b`.
    #[allow(clippy::too_many_arguments)]
    pub fn f32_gemm(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        dst_rs: usize,
        accumulate: bool,
        a: Mat<'_>,
        b: Mat<'_>,
    ) {
        crate::cpu::sgemm(m, n, k, dst, dst_rs, accumulate, a, b, crate::cpu::par_threads())
    }
    pub use crate::bf16_gemm::gemm_with as bf16_gemm;
}

/// Implementations built from candle tensor ops, generic over the backend, that the public ops
/// run on devices without kernels of this crate (and on the CPU under `SDBOOTH_REFERENCE_OPS`).
pub mod generic {
    pub use crate::attention::generic::{attention, attention_in_blocks, block_rows, SCORE_BLOCK_ELEMENTS};
    pub use crate::conv::generic::{
        conv2d, grad_input as conv2d_grad_input, grad_weight as conv2d_grad_weight,
    };
}

pub use activation::{geglu, geglu_with, gelu_erf, gelu_erf_with, quick_gelu, silu};
pub use alloc::tune_allocator;
pub use attention::{attention, attention_flops, attention_with};
pub use backend::{reference_ops_forced, REFERENCE_OPS_ENV};
pub use bf16_gemm::{active_kernel as bf16_kernel, Bf16Kernel, PackedStep, PackedWeights, BF16_KERNEL_ENV};
pub use cast::{cast, mixes_bf16_operands};
pub use conv::{conv2d, conv2d_flops, conv2d_with};
pub use copy::contiguous;
pub use cpu::{f32_gemm_kernel, Precision};
pub use embed::{embedding, embedding_table_grad, timestep_embedding};
pub use linear::{linear, linear_with};
pub use norm::{group_norm, group_norm_silu, layer_norm};
pub use residual::add;
pub use seed::backward_from;
pub use softmax::softmax_last_dim;
pub use threads::{tune_thread_pools, SPIN_LIMIT, SPIN_LIMIT_ENV};
pub use upsample::upsample_nearest2x;
