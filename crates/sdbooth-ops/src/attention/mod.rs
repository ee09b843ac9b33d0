//! Scaled dot-product attention: the contract and its candle custom ops.
//!
//! Forward ([`AttentionOp`]) returns the output and keeps the per-row log-sum-exp of the scores
//! as an f32 tensor `[B, H, N]` in the op object; backward ([`AttentionBackward`]) recomputes the
//! scores from q, k and that log-sum-exp, so no N×M matrix is kept between the passes.

pub(crate) mod cpu;
pub(crate) mod generic;
#[cfg(test)]
mod packing_tests;

use crate::backend::{self, filled, grad_if, Slot};
use crate::cpu::{cpu_tensor, storage_f32, storage_from_f32, with_f32, Precision};
use crate::reference;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use cpu::Packing;

/// Scaled dot-product attention, scale `1/sqrt(head_dim)`. `q` is `[B, H, N, D]`, `k`/`v` are
/// `[B, H, M, D]`. With `causal`, token i attends to tokens `<= i` (CLIP's mask).
///
/// Memory-efficient on every device: on the CPU our kernel (tiled online softmax,
/// FlashAttention-2 backward) allocates no N×M score matrix; elsewhere [`generic::attention`]
/// holds the scores of one block of queries at a time, forward and backward.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    attention_with(q, k, v, causal, Precision::Stored)
}

/// [`attention`] with its products computed in `precision`. With [`Precision::Bf16`] on the CPU
/// the four products of the forward and backward (`Q·Kᵀ`, `P·V`; `dO·Vᵀ`, `Pᵀ·dO`, `dS·K`,
/// `dSᵀ·Q`) run in bf16 with f32 sums, their operands rounded to bf16 as they are packed, while
/// the softmax, its statistics and its gradient stay in f32 and every result is in the inputs'
/// dtype: PyTorch autocast's bf16 attention (`--mixed_precision bf16`). Devices without kernels
/// of this crate cast q, k and v to bf16 and the output back.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    precision: Precision,
) -> Result<Tensor> {
    if backend::has_kernels(q.device()) {
        let op = AttentionOp { causal, scale: scale(q.dim(D::Minus1)?), lse: Slot::new(), precision };
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    match precision {
        Precision::Stored => generic::attention(q, k, v, causal),
        Precision::Bf16 => {
            let (k, v) = (crate::cast(k, DType::BF16)?, crate::cast(v, DType::BF16)?);
            crate::cast::in_bf16(q, |q| generic::attention(q, &k, &v, causal))
        }
    }
}

/// FLOPs of one attention forward (for benchmarks): `2·B·H·N·M·(D + Dv)` (causal counted full).
pub fn attention_flops(b: usize, h: usize, n: usize, m: usize, d: usize) -> f64 {
    4.0 * (b * h * n * m * d) as f64
}

fn scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub bh: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub dv: usize,
}

fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    let (&[b, h, n, d], &[bk, hk, m, dk], &[bv, hv, mv, dv]) = (q, k, v) else {
        bail!("attention: expected 4-D q, k, v ([B, H, tokens, head_dim]), got {q:?}, {k:?}, {v:?}")
    };
    if (b, h) != (bk, hk) || (b, h) != (bv, hv) || m != mv || d != dk {
        bail!("attention: incompatible shapes q {q:?}, k {k:?}, v {v:?}");
    }
    if m == 0 || d == 0 || dv == 0 {
        bail!("attention: empty key set or head dimension (k {k:?}, v {v:?})");
    }
    Ok(Dims { bh: b * h, n, m, d, dv })
}

fn same_dtypes(s1: &CpuStorage, s2: &CpuStorage, s3: &CpuStorage) -> Result<()> {
    if s1.dtype() != s2.dtype() || s1.dtype() != s3.dtype() {
        bail!("attention: q, k, v dtypes differ");
    }
    Ok(())
}

/// Which gradients backward must produce.
#[derive(Clone, Copy)]
pub(crate) struct Want {
    pub dq: bool,
    pub dk: bool,
    pub dv: bool,
}

/// Forward `(q, k, v) -> o`.
pub(crate) struct AttentionOp {
    pub causal: bool,
    pub scale: f32,
    /// The per-row log-sum-exp of the scores, `[B, H, N]` f32, set by the forward.
    pub lse: Slot,
    /// What the products run in (forward and backward).
    pub precision: Precision,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sdbooth-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims(l1.dims(), l2.dims(), l3.dims())?;
        same_dtypes(s1, s2, s3)?;
        let (q, k, v) = (storage_f32(s1, l1)?, storage_f32(s2, l2)?, storage_f32(s3, l3)?);
        let (o, lse) = cpu::forward(
            &q,
            &k,
            &v,
            &dm,
            self.scale,
            self.causal,
            self.precision,
            Packing::for_precision(self.precision),
        );
        let sh = l1.dims();
        backend::fill(&self.lse, self.name(), cpu_tensor(lse, (sh[0], sh[1], dm.n), DType::F32)?)?;
        Ok((storage_from_f32(o, s1.dtype())?, Shape::from((sh[0], sh[1], dm.n, dm.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = Want { dq: q.track_op(), dk: k.track_op(), dv: v.track_op() };
        if !(want.dq || want.dk || want.dv) {
            return Ok((None, None, None));
        }
        if !backend::has_kernels(go.device()) {
            let causal = self.causal;
            let operands = [(q, want.dq), (k, want.dk), (v, want.dv)];
            let [dq, dk, dv] =
                backend::reference_vjp(&operands, go, |t| reference::attention(&t[0], &t[1], &t[2], causal))?;
            return Ok((dq, dk, dv));
        }
        let op = AttentionBackward {
            causal: self.causal,
            scale: self.scale,
            precision: self.precision,
            want,
            out: o.clone(),
            grad_out: go.contiguous()?,
            lse: filled(&self.lse, self.name(), "log-sum-exp")?,
            dk: Slot::new(),
            dv: Slot::new(),
        };
        let dq = q.apply_op3_no_bwd(k, v, &op)?;
        Ok((
            want.dq.then_some(dq),
            grad_if(want.dk, || filled(&op.dk, op.name(), "dk"))?,
            grad_if(want.dv, || filled(&op.dv, op.name(), "dv"))?,
        ))
    }
}

/// Backward `(q, k, v) -> dq`, dk and dv to its slots (the wanted ones), from the forward's
/// output, its gradient and the log-sum-exp (candle's custom ops take at most three operands
/// and return one result, so the rest travel in the op object).
pub(crate) struct AttentionBackward {
    pub causal: bool,
    pub scale: f32,
    /// What the products run in (that of the forward).
    pub precision: Precision,
    pub want: Want,
    /// The forward's output `o` and its gradient, `[B, H, N, Dv]`.
    pub out: Tensor,
    pub grad_out: Tensor,
    /// The forward's per-row log-sum-exp, `[B, H, N]` f32.
    pub lse: Tensor,
    pub dk: Slot,
    pub dv: Slot,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "sdbooth-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims(l1.dims(), l2.dims(), l3.dims())?;
        same_dtypes(s1, s2, s3)?;
        let (b, h) = (l1.dims()[0], l1.dims()[1]);
        backend::expect_dims(self.name(), "output", self.out.dims(), &[b, h, dm.n, dm.dv])?;
        backend::expect_dims(self.name(), "output gradient", self.grad_out.dims(), &[b, h, dm.n, dm.dv])?;
        backend::expect_dims(self.name(), "log-sum-exp", self.lse.dims(), &[b, h, dm.n])?;
        let (q, k, v) = (storage_f32(s1, l1)?, storage_f32(s2, l2)?, storage_f32(s3, l3)?);
        let (dq, dk, dv) = with_f32(&self.out, |o| {
            with_f32(&self.grad_out, |go| {
                with_f32(&self.lse, |lse| {
                    let inputs = cpu::BackwardInputs { q: &q, k: &k, v: &v, o, go, lse };
                    Ok(cpu::backward(
                        &inputs,
                        &dm,
                        self.scale,
                        self.causal,
                        self.want,
                        self.precision,
                        Packing::for_precision(self.precision),
                    ))
                })
            })
        })?;
        let dtype = s1.dtype();
        if self.want.dk {
            backend::fill(&self.dk, self.name(), cpu_tensor(dk, l2.shape().clone(), dtype)?)?;
        }
        if self.want.dv {
            backend::fill(&self.dv, self.name(), cpu_tensor(dv, l3.shape().clone(), dtype)?)?;
        }
        Ok((storage_from_f32(dq, dtype)?, l1.shape().clone()))
    }
}
