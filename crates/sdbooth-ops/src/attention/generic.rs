//! Memory-efficient attention from candle tensor ops, for every device without an attention
//! kernel of this crate (CUDA; the CPU under `SDBOOTH_REFERENCE_OPS`). The same code runs on
//! every backend, so the CPU tests run exactly what a GPU runs.
//!
//! The queries are processed in blocks of rows. Forward: per block, the scores `q_blk·kᵀ` (one
//! `[B·H, rows, M]` tensor), their row max and log-sum-exp, and the block's output; only the
//! output and the per-row log-sum-exp (`[B, H, N]`, f32) outlive the block. Backward
//! (FlashAttention-2's equations, by query blocks): per block the probabilities are recomputed
//! from the scores and the saved log-sum-exp, `dV += Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`,
//! `dQ_blk = dS·K·scale`, `dK += dSᵀ·Q_blk·scale`. So neither pass ever holds the score matrix of
//! more than one block of queries, and autograd keeps nothing of the forward but q, k, v, the
//! output and the log-sum-exp: the forward runs on detached tensors and is attached to the graph
//! by [`BlockAttention`], a custom op whose backward is the block loop above.
//!
//! Precision: the four matrix products run in the operands' dtype (cuBLAS accumulates bf16/f16
//! in f32); scores, probabilities, the softmax statistics and the dK/dV sums are f32 (f64 for
//! f64 operands).

use crate::backend::{self, Precomputed, Slot};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, D};

/// Largest number of score elements (`B·H·rows·M`) one block of queries may hold: 2²⁴, 64 MiB
/// in f32. At 512 px (4096 tokens, 8 heads, batch 1) a block is 512 query rows.
pub const SCORE_BLOCK_ELEMENTS: usize = 1 << 24;

/// Rows per query block for `bh` batch·heads and `m` keys: as many as fit
/// [`SCORE_BLOCK_ELEMENTS`], at least one.
pub fn block_rows(bh: usize, m: usize) -> usize {
    (SCORE_BLOCK_ELEMENTS / (bh * m).max(1)).max(1)
}

/// Attention with the default block size (see [`attention_in_blocks`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let (b, h, _, _) = q.dims4()?;
    let m = k.dim(2)?;
    attention_in_blocks(q, k, v, causal, block_rows(b * h, m))
}

/// Scaled dot-product attention (scale `1/sqrt(head_dim)`; `q` `[B, H, N, D]`, `k`/`v`
/// `[B, H, M, D]`/`[B, H, M, Dv]`; with `causal`, token i attends to tokens `<= i`) computed in
/// blocks of `rows` queries, forward and backward.
pub fn attention_in_blocks(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, rows: usize) -> Result<Tensor> {
    let dm = super::dims(q.dims(), k.dims(), v.dims())?;
    let (b, h, n, d) = q.dims4()?;
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        bail!("attention: q, k, v dtypes differ ({:?}, {:?}, {:?})", q.dtype(), k.dtype(), v.dtype());
    }
    if rows == 0 {
        bail!("attention: query block of zero rows");
    }
    let blocks = Blocks { causal, scale: 1.0 / (d as f64).sqrt(), rows };
    let flat = |t: &Tensor, tokens: usize, width: usize| t.detach().reshape((b * h, tokens, width));
    let (o, lse) = blocks.forward(&flat(q, n, d)?, &flat(k, dm.m, d)?, &flat(v, dm.m, dm.dv)?)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        // Nothing to differentiate (sampling, a frozen encoder): the output as it is.
        return o.reshape((b, h, n, dm.dv));
    }
    let op = BlockAttention { blocks, out: Precomputed::new(o.reshape((b, h, n, dm.dv))?), lse: Slot::new() };
    backend::fill(&op.lse, "attention", lse)?;
    q.apply_op3(k, v, op)
}

/// The block loop's settings.
#[derive(Clone, Copy)]
struct Blocks {
    causal: bool,
    scale: f64,
    rows: usize,
}

/// The dtype scores and softmax statistics are computed in.
fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl Blocks {
    /// The query blocks of `n` rows: `(first row, row count)`.
    fn ranges(&self, n: usize) -> impl Iterator<Item = (usize, usize)> {
        let rows = self.rows;
        (0..n).step_by(rows).map(move |r0| (r0, rows.min(n - r0)))
    }

    /// Scaled scores of one query block `[BH, rows, M]` in the statistics dtype, causal mask
    /// applied (`-inf` where key j > query row `r0 + i`).
    fn scores(&self, q_blk: &Tensor, k_t: &Tensor, r0: usize) -> Result<Tensor> {
        let s = (q_blk.matmul(k_t)?.to_dtype(stats_dtype(q_blk.dtype()))? * self.scale)?;
        if !self.causal {
            return Ok(s);
        }
        let (_, rows, m) = s.dims3()?;
        let dev = s.device();
        let query = Tensor::arange(r0 as u32, (r0 + rows) as u32, dev)?.reshape((rows, 1))?;
        let key = Tensor::arange(0u32, m as u32, dev)?.reshape((1, m))?;
        let masked = key.broadcast_gt(&query)?.broadcast_as(s.shape())?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, dev)?.to_dtype(s.dtype())?.broadcast_as(s.shape())?;
        masked.where_cond(&neg_inf, &s)
    }

    /// Output `[BH, N, Dv]` (operands' dtype) and per-row log-sum-exp `[BH, N]` (f32, or f64 for
    /// f64 operands) of detached `[BH, tokens, width]` operands.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (bh, n, _) = q.dims3()?;
        let dtype = q.dtype();
        let k_t = k.t()?.contiguous()?;
        let v = v.contiguous()?;
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for (r0, rows) in self.ranges(n) {
            let s = self.scores(&q.narrow(1, r0, rows)?.contiguous()?, &k_t, r0)?;
            let max = s.max_keepdim(D::Minus1)?;
            let p = s.broadcast_sub(&max)?.exp()?;
            drop(s);
            let sum = p.sum_keepdim(D::Minus1)?;
            let o = p.to_dtype(dtype)?.matmul(&v)?;
            drop(p);
            outs.push(o.to_dtype(sum.dtype())?.broadcast_div(&sum)?.to_dtype(dtype)?);
            lses.push((max + sum.log()?)?.reshape((bh, rows))?);
        }
        Ok((Tensor::cat(&outs, 1)?, Tensor::cat(&lses, 1)?))
    }

    /// Gradients of `Σ o·go` for `[BH, tokens, width]` operands, from the forward's output and
    /// log-sum-exp: `(dq, dk, dv)` in the operands' dtype.
    fn backward(&self, t: &BackwardInputs) -> Result<(Tensor, Tensor, Tensor)> {
        let (bh, n, _) = t.q.dims3()?;
        let dtype = t.q.dtype();
        let stats = stats_dtype(dtype);
        let (k, v) = (t.k.contiguous()?, t.v.contiguous()?);
        let (k_t, v_t) = (k.t()?.contiguous()?, v.t()?.contiguous()?);
        let go = t.go.contiguous()?;
        // rowsum(dO ∘ O), the softmax backward's per-row term: [BH, N, 1].
        let delta = (go.to_dtype(stats)? * t.o.to_dtype(stats)?)?.sum_keepdim(D::Minus1)?;
        let lse = t.lse.to_dtype(stats)?.reshape((bh, n, 1))?;
        let (mut dq_blocks, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        let accumulate = |sum: &mut Option<Tensor>, part: Tensor| -> Result<()> {
            *sum = Some(match sum.take() {
                Some(s) => (s + part)?,
                None => part,
            });
            Ok(())
        };
        for (r0, rows) in self.ranges(n) {
            let q_blk = t.q.narrow(1, r0, rows)?.contiguous()?;
            let go_blk = go.narrow(1, r0, rows)?.contiguous()?;
            let s = self.scores(&q_blk, &k_t, r0)?;
            let p = s.broadcast_sub(&lse.narrow(1, r0, rows)?)?.exp()?;
            drop(s);
            accumulate(&mut dv, p.to_dtype(dtype)?.t()?.matmul(&go_blk)?.to_dtype(stats)?)?;
            let dp = go_blk.matmul(&v_t)?.to_dtype(stats)?;
            let ds = ((p * dp.broadcast_sub(&delta.narrow(1, r0, rows)?)?)? * self.scale)?.to_dtype(dtype)?;
            drop(dp);
            dq_blocks.push(ds.matmul(&k)?);
            accumulate(&mut dk, ds.t()?.matmul(&q_blk)?.to_dtype(stats)?)?;
        }
        let finish = |sum: Option<Tensor>| match sum {
            Some(s) => s.to_dtype(dtype),
            None => bail!("attention: no query rows"),
        };
        Ok((Tensor::cat(&dq_blocks, 1)?, finish(dk)?, finish(dv)?))
    }
}

/// What the block backward reads, all `[BH, tokens, width]` (lse `[BH, N]`) and detached.
struct BackwardInputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    go: Tensor,
    lse: Tensor,
}

/// Attaches the block forward's output to the graph as a function of `(q, k, v)`; its backward
/// is the block loop.
struct BlockAttention {
    blocks: Blocks,
    /// The output, `[B, H, N, Dv]`, handed over by the forward.
    out: Precomputed,
    /// The per-row log-sum-exp `[BH, N]`, kept for the backward.
    lse: Slot,
}

impl candle_core::CustomOp3 for BlockAttention {
    fn name(&self) -> &'static str {
        "sdbooth-attention-blocks"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda(self.name())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_q, want_k, want_v) = (q.track_op(), k.track_op(), v.track_op());
        if !(want_q || want_k || want_v) {
            return Ok((None, None, None));
        }
        let (b, h, n, d) = q.dims4()?;
        let (m, dv) = (k.dim(2)?, v.dim(3)?);
        let flat = |t: &Tensor, tokens: usize, width: usize| t.detach().reshape((b * h, tokens, width));
        let inputs = BackwardInputs {
            q: flat(q, n, d)?,
            k: flat(k, m, d)?,
            v: flat(v, m, dv)?,
            o: flat(o, n, dv)?,
            go: flat(go, n, dv)?,
            lse: backend::filled(&self.lse, self.name(), "log-sum-exp")?,
        };
        let (gq, gk, gv) = self.blocks.backward(&inputs)?;
        Ok((
            want_q.then(|| gq.reshape((b, h, n, d))).transpose()?,
            want_k.then(|| gk.reshape((b, h, m, d))).transpose()?,
            want_v.then(|| gv.reshape((b, h, m, dv))).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_row_once() {
        let blocks = Blocks { causal: false, scale: 1.0, rows: 4 };
        assert_eq!(blocks.ranges(10).collect::<Vec<_>>(), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(blocks.ranges(4).collect::<Vec<_>>(), vec![(0, 4)]);
    }

    #[test]
    fn block_rows_fit_the_budget() {
        assert_eq!(block_rows(8, 4096), 512);
        assert_eq!(block_rows(16, 4096), 256);
        assert_eq!(block_rows(1 << 20, 1 << 10), 1);
        assert!(block_rows(8, 77) * 8 * 77 <= SCORE_BLOCK_ELEMENTS);
    }
}
