//! AdamW8bit as bitsandbytes' `kOptimizerStatic8bit2StateBlockwise` CUDA kernel computes it (the
//! implementation kohya users train with): both moments stored as 8-bit indices into bitsandbytes'
//! dynamic quantisation maps (signed for m, unsigned for v), one f32 absmax per block of 256
//! values. Each step dequantises a block, updates it in f32, takes the new block absmax and
//! re-quantises to the nearest map entry, keeping m's sign. Weight decay is applied after the Adam
//! step (multiplicative, as the kernel does). Gradient entries that are NaN/Inf leave the weight
//! unchanged and zero both moments. Tensors with fewer than `min_8bit_size` (4096) elements keep
//! 32-bit moments with the kernel's 32-bit formula, as bitsandbytes does.
//!
//! bitsandbytes' CPU backend differs in two details (weight decay before the step, and a 65536-bin
//! lookup table instead of exact nearest rounding); the golden test states the resulting bound.
//!
//! Speed: the update is one fused pass per block (dequantise → update → absmax → quantise, the
//! block's f32 moments on the stack), parallel over groups of blocks, with an AVX-512 kernel
//! (table lookups as scalar loads: faster than gathers on Zen 4) chosen at run time and a
//! portable one otherwise; both give results identical to each other and to the earlier scalar
//! implementation (checked bit for bit when this kernel replaced it). Measured on the shared 2-core Zen 4, one thread, CPU time per
//! value over 32 M values: 7.2 → 3.9 ns. The rounding table then shrank from 2 × 320 KB (L2) to
//! 2 × ~24 KB (L1), one table read per quantised value instead of two (`examples/optim_bench`, CPU
//! time of the update over 133 M values on the loaded machine: 0.43 → 0.37 s). Scalar loads
//! instead of the four 16-lane gathers per 16 values: 2.50 → 2.08 ns per value on one thread
//! over 32 K values (cached), same bits. With AVX512_VBMI both lookups are byte permutes instead
//! (`vbmi.rs`; one thread, thread CPU time, `adamw8bit::bench`: 2.2 → 1.7–1.9 ns per value cached,
//! 3.0 → 2.0 streamed; the update's CPU time in the fused SD1.5 256 px step 2.5 → 1.8 s, perf).
//! Then (`vbmi.rs`, `avx512::update_blocks_vbmi`) the VBMI rounding compares the bucket
//! thresholds in bytes instead of transposing the tables' bytes into 32-bit lanes, and a task's
//! whole blocks are software-pipelined (block `k`'s update, bound by the FP divider, interleaved
//! with block `k − 1`'s quantisation, bound by the shuffles), without software prefetches (on
//! this machine they made the pipelined kernel slower, streamed too): `adamw8bit::bench`, one
//! thread, 1.67 → 1.33 ns per value cached, 2.04–2.14 → 1.73–1.75 streamed; the update's CPU
//! time in the fused step (perf, two A/B rounds on the loaded machine) 1.84 / 1.69 → 1.48 / 1.51 s.

use std::sync::OnceLock;

use rayon::prelude::*;

use half::bf16;

use super::{rounding, GradRef, OptimizerConfig, ParamState};
use crate::error::{Result, TrainError};

pub const BLOCK: usize = 256;

/// torch.linspace(0.1, 1, steps) in f32: an f32 step, each value computed from the nearer end with
/// one rounding (torch's kernel fuses the multiply-add); checked bit-exact against torch.
fn linspace(steps: usize) -> Vec<f32> {
    let (start, end) = (0.1f32, 1.0f32);
    let step = f64::from((end - start) / (steps - 1) as f32);
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                (f64::from(start) + step * i as f64) as f32
            } else {
                (f64::from(end) - step * (steps - i - 1) as f64) as f32
            }
        })
        .collect()
}

/// bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8).
pub fn create_dynamic_map(signed: bool) -> Vec<f32> {
    let (max_exp, total) = (7i32, 8i32);
    let non_sign = total - 1;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..max_exp {
        let items = if signed {
            (1 << (i + non_sign - max_exp)) + 1
        } else {
            (1 << (i + non_sign - max_exp + 1)) + 1
        };
        let b = linspace(items as usize);
        // Python multiplies the f32 tensor of means by a float: an f32 product.
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for k in 0..b.len() - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push(f64::from(scale * mean));
            if signed {
                data.push(f64::from(-scale * mean));
            }
        }
    }
    // additional_items = 2^(non_sign - max_exp) - 1 = 0 for the 8-bit maps.
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    let mut out: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    out.sort_by(f32::total_cmp);
    out
}

/// One quantisation map with what nearest rounding needs, as a lookup table indexed by the top
/// 16 bits of an f32 (sign, exponent, 7 mantissa bits): a "bucket" of floats.
///
/// Nearest rounding is monotone, so every float of a bucket rounds to the entry `lo` of the
/// bucket's lower end or to the next one. For both 8-bit maps at most one midpoint falls inside a
/// bucket (checked by a test), so rounding is `lo + (x > up)`, with `up` that midpoint or +∞:
/// exact (the same results as a binary search over the midpoints), and free of branches, so it
/// vectorises.
///
/// The midpoint `up` lies in the bucket, so its top 16 bits are the bucket's: only its low 16
/// bits are stored, next to `lo` in one u32 (one table read per value). `x > up` is then a
/// comparison of low bits, reversed for negative floats (a larger magnitude is a smaller value).
/// Only the buckets between `key_min` and `key_max` (magnitudes, per sign) are stored: every
/// bucket below has the entry of `key_min`, every finite one above the entry of `key_max`, with
/// no midpoint inside (checked when the table is built), so lookups clamp the bucket into that
/// range. The table (~24 KB per map) stays in the L1 cache. Infinities and NaN round to entry 0.
struct Map {
    code: [f32; 256],
    /// `code` as byte planes, for the AVX512_VBMI dequantisation.
    #[cfg(target_arch = "x86_64")]
    code_planes: vbmi::BytePlanes,
    /// The tables of the AVX512_VBMI rounding (`None` if the map does not fit them).
    #[cfg(target_arch = "x86_64")]
    vbmi_rounding: Option<vbmi::Rounding>,
    /// Entries below this index are negative (the map is sorted; its one zero is +0).
    negatives: u8,
    /// `lo | threshold << 16` for the positive buckets `key_min..=key_max`, then the negative
    /// ones. `threshold` = the low 16 bits of `up` (of `!up` for negative buckets), or 0xFFFF
    /// when the bucket holds no midpoint.
    rounding: Vec<u32>,
    key_min: u32,
    key_max: u32,
}

/// Buckets from here up (by magnitude: the exponent is all ones) are infinities and NaN.
const NON_FINITE_KEY: u32 = 0x7F80;
/// A bucket threshold that no float of the bucket exceeds.
const NO_MIDPOINT: u32 = 0xFFFF;

/// The rounding table of one map over all 2^16 buckets: `(lo, up)` per bucket key.
fn full_rounding_table(code: &[f32; 256]) -> Vec<(u8, f32)> {
    // Midpoints between neighbouring entries, in f32 as the kernel computes them; a value
    // exactly on a midpoint goes to the lower entry.
    let mid: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    let search = |x: f32| mid.partition_point(|&m| m < x);
    (0u32..1 << 16)
        .map(|k| {
            let (a, b) = (f32::from_bits(k << 16), f32::from_bits(k << 16 | 0xFFFF));
            if a.is_nan() || b.is_nan() {
                return (0, f32::INFINITY); // NaN (and the infinities' buckets) quantise to entry 0.
            }
            let (i, j) = (search(a), search(b));
            let (i, j) = (i.min(j), i.max(j));
            (i as u8, if j > i { mid[i] } else { f32::INFINITY })
        })
        .collect()
}

impl Map {
    fn new(signed: bool) -> Self {
        let mut code = [0f32; 256];
        code.copy_from_slice(&create_dynamic_map(signed));
        let full = full_rounding_table(&code);
        let packed = |key: u32| -> u32 {
            let (lo, up) = full[key as usize];
            let threshold = if up.is_finite() {
                debug_assert_eq!(up.to_bits() >> 16, key, "midpoint outside its bucket");
                let low = up.to_bits() & 0xFFFF;
                if key & 0x8000 != 0 {
                    0xFFFF - low
                } else {
                    low
                }
            } else {
                NO_MIDPOINT
            };
            u32::from(lo) | (threshold << 16)
        };
        // The stored range: every bucket outside it (finite, either sign) repeats its edge.
        let same_as = |key: u32, edge: u32| {
            [0, 0x8000].iter().all(|&sign| {
                let (e, k) = (packed(edge | sign), packed(key | sign));
                k == e && e >> 16 == NO_MIDPOINT
            })
        };
        let key_min = (0..NON_FINITE_KEY).take_while(|&k| same_as(k, 0)).last().unwrap_or(0);
        let key_max = (0..NON_FINITE_KEY)
            .rev()
            .take_while(|&k| same_as(k, NON_FINITE_KEY - 1))
            .last()
            .unwrap_or(NON_FINITE_KEY - 1);
        let rounding =
            [0, 0x8000].iter().flat_map(|&sign| (key_min..=key_max).map(move |k| packed(k | sign)));
        let negatives = code.iter().filter(|c| c.is_sign_negative()).count() as u8;
        Map {
            code,
            #[cfg(target_arch = "x86_64")]
            code_planes: vbmi::BytePlanes::new(&code.map(f32::to_bits)),
            #[cfg(target_arch = "x86_64")]
            vbmi_rounding: vbmi::Rounding::new(&code),
            negatives,
            rounding: rounding.collect(),
            key_min,
            key_max,
        }
    }

    /// The widest bucket: how many midpoints fall strictly inside one (must be at most 1).
    #[cfg(test)]
    fn max_midpoints_per_bucket(&self) -> usize {
        let mid: Vec<f32> = self.code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let search = |x: f32| mid.partition_point(|&m| m < x);
        (0u32..1 << 16)
            .map(|k| (f32::from_bits(k << 16), f32::from_bits(k << 16 | 0xFFFF)))
            .filter(|(a, b)| !a.is_nan() && !b.is_nan())
            .map(|(a, b)| search(a).abs_diff(search(b)))
            .max()
            .unwrap_or(0)
    }

    /// Nearest entry; a value exactly on a midpoint goes to the lower entry; ±∞ and NaN give
    /// entry 0.
    #[inline(always)]
    fn quantize(&self, x: f32) -> u8 {
        let bits = x.to_bits();
        let magnitude = (bits >> 16) & 0x7FFF;
        if magnitude >= NON_FINITE_KEY {
            return 0;
        }
        let negative = bits >> 31;
        let span = self.key_max - self.key_min + 1;
        let index = negative * span + magnitude.clamp(self.key_min, self.key_max) - self.key_min;
        let entry = self.rounding[index as usize];
        let low = (bits & 0xFFFF) ^ (negative * 0xFFFF);
        (entry as u8) + u8::from(low > entry >> 16)
    }
}

fn maps() -> &'static (Map, Map) {
    static MAPS: OnceLock<(Map, Map)> = OnceLock::new();
    MAPS.get_or_init(|| (Map::new(true), Map::new(false)))
}

/// The f32 scalars of one step, computed once as the kernel computes them.
#[derive(Clone, Copy)]
struct Scalars {
    b1: f32,
    b2: f32,
    one_minus_b1: f32,
    one_minus_b2: f32,
    step_size: f32,
    eps_term: f32,
    /// The multiplicative weight decay; 1.0 (exact) without decay.
    decay: f32,
    grad_scale: f32,
}

impl Scalars {
    fn new(c: &OptimizerConfig, step: u64, lr: f64, grad_scale: f32) -> Self {
        let (b1, b2) = (c.betas.0 as f32, c.betas.1 as f32);
        let t = step as i32;
        let correction1 = 1.0 - b1.powi(t);
        let correction2 = (1.0 - b2.powi(t)).sqrt();
        let lr32 = lr as f32;
        Scalars {
            b1,
            b2,
            one_minus_b1: 1.0 - b1,
            one_minus_b2: 1.0 - b2,
            step_size: -lr32 * correction2 / correction1,
            eps_term: correction2 * c.eps as f32,
            decay: if c.weight_decay > 0.0 { 1.0 - lr32 * c.weight_decay as f32 } else { 1.0 },
            grad_scale,
        }
    }

    /// The update of one value: weight, moments. A non-finite gradient leaves the weight unchanged
    /// and zeroes both moments. Written without branches (both outcomes computed, one selected)
    /// so the block loops vectorise; the arithmetic is the kernel's, operation for operation.
    #[inline(always)]
    fn update(&self, w: f32, g: f32, s1: f32, s2: f32) -> (f32, f32, f32) {
        let g = g * self.grad_scale;
        let n2 = s2 * self.b2 + self.one_minus_b2 * g * g;
        let n1 = s1 * self.b1 + self.one_minus_b1 * g;
        let nw = (w + self.step_size * (n1 / (n2.sqrt() + self.eps_term))) * self.decay;
        if g.is_finite() {
            (nw, n1, n2)
        } else {
            (w, 0.0, 0.0)
        }
    }
}

/// Values per rayon task: 64 blocks (the split does not change any result: blocks are
/// independent).
const TASK_BLOCKS: usize = 64;

pub(crate) fn step(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &mut [f32],
    g: &[f32],
    gs: f32,
    lr: f64,
) -> Result<()> {
    let n = w.len();
    let sc = Scalars::new(c, st.step, lr, gs);

    if n < c.min_8bit_size {
        let mut m = st.take_f32("state1", n)?;
        let mut v = st.take_f32("state2", n)?;
        for i in 0..n {
            (w[i], m[i], v[i]) = sc.update(w[i], g[i], m[i], v[i]);
        }
        st.put_f32("state1", m);
        st.put_f32("state2", v);
        return Ok(());
    }

    let kernel = task_kernel();
    with_8bit_state(st, n, |q1, q2, a1, a2| {
        w.par_chunks_mut(TASK)
            .zip(g.par_chunks(TASK))
            .zip(q1.par_chunks_mut(TASK).zip(q2.par_chunks_mut(TASK)))
            .zip(a1.par_chunks_mut(TASK_BLOCKS).zip(a2.par_chunks_mut(TASK_BLOCKS)))
            .for_each(|(((w, g), (q1, q2)), (a1, a2))| kernel(&sc, Blocks { w, g, q1, q2, a1, a2 }));
    })
}

/// As [`step`] for bf16 weights (`--full_bf16`) of a tensor with 8-bit state: block by block,
/// the weights (and a bf16 gradient) are widened to f32 on the stack, updated, and the weights
/// rounded back stochastically with the update's rounding `key` (value `i` of the tensor draws
/// `rounding_bits(key, i)`). The same bits as widening the whole tensor, [`step`] and
/// `rounding::stochastic_round` (tested), in one parallel pass over weights and gradient, without
/// tensor-sized f32 copies (the gradient's was made on the calling thread alone).
pub(crate) fn step_bf16(
    c: &OptimizerConfig,
    st: &mut ParamState,
    w: &mut [bf16],
    g: GradRef<'_>,
    gs: f32,
    lr: f64,
    key: u64,
) -> Result<()> {
    let n = w.len();
    if n < c.min_8bit_size || g.len() != n {
        return Err(TrainError::Internal(format!(
            "step_bf16 on {n} weights and {} gradient values (needs 8-bit state, equal lengths)",
            g.len()
        )));
    }
    let sc = Scalars::new(c, st.step, lr, gs);
    let (kernel, widen) = (block_kernel(), widen_kernel());
    let round = rounding::chunk_kernel();
    let g_tasks: Vec<GradRef<'_>> = match g {
        GradRef::F32(g) => g.chunks(TASK).map(GradRef::F32).collect(),
        GradRef::BF16(g) => g.chunks(TASK).map(GradRef::BF16).collect(),
    };
    with_8bit_state(st, n, |q1, q2, a1, a2| {
        w.par_chunks_mut(TASK)
            .zip(g_tasks.into_par_iter())
            .zip(q1.par_chunks_mut(TASK).zip(q2.par_chunks_mut(TASK)))
            .zip(a1.par_chunks_mut(TASK_BLOCKS).zip(a2.par_chunks_mut(TASK_BLOCKS)))
            .enumerate()
            .for_each(|(k, (((wb, g), (q1, q2)), (a1, a2)))| {
                for j in 0..a1.len() {
                    let (first, end) = (j * BLOCK, ((j + 1) * BLOCK).min(wb.len()));
                    let len = end - first;
                    prefetch_block(wb, end);
                    prefetch_block(q1, end);
                    prefetch_block(q2, end);
                    let mut w = [0f32; BLOCK];
                    widen(&wb[first..end], &mut w[..len]);
                    let mut widened_g = [0f32; BLOCK];
                    let g = match g {
                        GradRef::F32(g) => {
                            prefetch_block(g, end);
                            &g[first..end]
                        }
                        GradRef::BF16(g) => {
                            prefetch_block(g, end);
                            widen(&g[first..end], &mut widened_g[..len]);
                            &widened_g[..len]
                        }
                    };
                    let w = &mut w[..len];
                    let (q1, q2) = (&mut q1[first..end], &mut q2[first..end]);
                    kernel(&sc, Block { w, g, q1, q2, a1: &mut a1[j], a2: &mut a2[j] });
                    round(w, &mut wb[first..end], key, (k * TASK + first) as u32);
                }
            });
    })
}

/// bf16 values widened (exactly) to f32 with `half`'s bits (a NaN gets the quiet bit), without
/// branches so the loop vectorises (`half`'s `to_f32`, a scalar loop, was ~12 % of the update's
/// time under `--full_bf16`).
#[inline(always)]
fn widen(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        let bits = u32::from(s.to_bits());
        let quiet = if bits & 0x7FFF > 0x7F80 { 0x40 } else { 0 };
        *d = f32::from_bits((bits | quiet) << 16);
    }
}

type Widen = fn(&[bf16], &mut [f32]);

/// [`widen`] for the CPU at hand (AVX-512 when present; the same bits).
fn widen_kernel() -> Widen {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return avx512::widen;
        }
    }
    widen
}

/// Asks the cache for `values[from..from + BLOCK]` (the next block, while this one is updated):
/// the update reads four streams, which the hardware prefetcher alone kept ~6 % slower than
/// prefetched (one thread, 16 M values; a hint, no effect on results).
#[inline(always)]
fn prefetch_block<T>(values: &[T], from: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = (from + BLOCK).min(values.len());
        let per_line = (64 / std::mem::size_of::<T>()).max(1);
        for i in (from..end).step_by(per_line) {
            // SAFETY: `i` is inside the slice; a prefetch reads nothing.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().add(i).cast()) }
        }
    }
}

/// Values per rayon task.
const TASK: usize = TASK_BLOCKS * BLOCK;

/// Runs `f` on the tensor's 8-bit state (codes of m and v, block absmax of each), taken out of
/// `st` and put back.
fn with_8bit_state(
    st: &mut ParamState,
    n: usize,
    f: impl FnOnce(&mut [u8], &mut [u8], &mut [f32], &mut [f32]),
) -> Result<()> {
    let blocks = n.div_ceil(BLOCK);
    let mut q1 = st.take_u8("state1", n)?;
    let mut q2 = st.take_u8("state2", n)?;
    let mut a1 = st.take_f32("absmax1", blocks)?;
    let mut a2 = st.take_f32("absmax2", blocks)?;
    f(&mut q1, &mut q2, &mut a1, &mut a2);
    st.put_u8("state1", q1);
    st.put_u8("state2", q2);
    st.put_f32("absmax1", a1);
    st.put_f32("absmax2", a2);
    Ok(())
}

/// The blocks of one task: weights, gradient, codes and absmax of up to `TASK_BLOCKS` blocks.
struct Blocks<'a> {
    w: &'a mut [f32],
    g: &'a [f32],
    q1: &'a mut [u8],
    q2: &'a mut [u8],
    a1: &'a mut [f32],
    a2: &'a mut [f32],
}

type TaskKernel = fn(&Scalars, Blocks<'_>);

/// The update of a task's blocks for the CPU at hand: with AVX512_VBMI, blocks software-pipelined
/// ([`avx512::update_blocks_vbmi`]); otherwise [`update_blocks`]. The same results (tested).
fn task_kernel() -> TaskKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::ptr::fn_addr_eq(block_kernel(), avx512::update_block_vbmi as BlockKernel) {
            return avx512::update_blocks_vbmi;
        }
    }
    update_blocks
}

/// The blocks of a task one after the other with the block kernel for this CPU.
fn update_blocks(sc: &Scalars, b: Blocks<'_>) {
    let kernel = block_kernel();
    let Blocks { w, g, q1, q2, a1, a2 } = b;
    for k in 0..a1.len() {
        let (first, end) = (k * BLOCK, ((k + 1) * BLOCK).min(w.len()));
        prefetch_block(w, end);
        prefetch_block(g, end);
        prefetch_block(q1, end);
        prefetch_block(q2, end);
        let (w, g, q1, q2) = (&mut w[first..end], &g[first..end], &mut q1[first..end], &mut q2[first..end]);
        kernel(sc, Block { w, g, q1, q2, a1: &mut a1[k], a2: &mut a2[k] });
    }
}

/// One block of at most `BLOCK` values and its state.
struct Block<'a> {
    w: &'a mut [f32],
    g: &'a [f32],
    q1: &'a mut [u8],
    q2: &'a mut [u8],
    a1: &'a mut f32,
    a2: &'a mut f32,
}

type BlockKernel = fn(&Scalars, Block<'_>);

/// The block update for the CPU at hand: AVX-512 when present, the portable one otherwise. They
/// perform the same IEEE operations in the same order on every value (no fused multiply-adds),
/// so their results are identical (tested).
fn block_kernel() -> BlockKernel {
    #[cfg(target_arch = "x86_64")]
    {
        let (m1, m2) = maps();
        if vbmi_detected() && m1.vbmi_rounding.is_some() && m2.vbmi_rounding.is_some() {
            return avx512::update_block_vbmi;
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return avx512::update_block;
        }
    }
    update_block
}

/// Dequantise a block, update it in f32, take the new absmax, quantise back: one pass over the
/// weights and gradient, the block's moments in stack arrays in between.
fn update_block(sc: &Scalars, b: Block<'_>) {
    let (m1, m2) = maps();
    let len = b.w.len().min(BLOCK);
    let (w, g, q1, q2) = (&mut b.w[..len], &b.g[..len], &mut b.q1[..len], &mut b.q2[..len]);
    let (abs1, abs2) = (*b.a1, *b.a2);
    let mut s1 = [0f32; BLOCK];
    let mut s2 = [0f32; BLOCK];
    for i in 0..len {
        let (nw, n1, n2) =
            sc.update(w[i], g[i], m1.code[q1[i] as usize] * abs1, m2.code[q2[i] as usize] * abs2);
        w[i] = nw;
        s1[i] = n1;
        s2[i] = n2;
    }
    // f32::max ignores NaN and the values are ≥ 0, so the maximum does not depend on the order:
    // 16 running maxima vectorise.
    let mut lanes1 = [0f32; 16];
    let mut lanes2 = [0f32; 16];
    for (c1, c2) in s1[..len].chunks(16).zip(s2[..len].chunks(16)) {
        for j in 0..c1.len() {
            lanes1[j] = lanes1[j].max(c1[j].abs());
            lanes2[j] = lanes2[j].max(c2[j].abs());
        }
    }
    let max1 = lanes1.iter().fold(0f32, |a, &b| a.max(b));
    let max2 = lanes2.iter().fold(0f32, |a, &b| a.max(b));
    *b.a1 = max1;
    *b.a2 = max2;
    // The kernel divides with __fdividef, i.e. multiplies by the reciprocal; so do we. An all-zero
    // block has absmax 0: its values quantise from 0.0 instead of NaN.
    let inv1 = if max1 > 0.0 { 1.0 / max1 } else { 0.0 };
    let inv2 = if max2 > 0.0 { 1.0 / max2 } else { 0.0 };
    for i in 0..len {
        q1[i] = quantize_m(m1, s1[i], inv1);
        q2[i] = m2.quantize(s2[i] * inv2);
    }
}

/// Quantises the first moment `s` of a block with reciprocal absmax `inv`, keeping its sign (the
/// kernel's rule: where the nearest entry has the other sign, take the neighbour towards `s`).
#[inline(always)]
fn quantize_m(m1: &Map, s: f32, inv: f32) -> u8 {
    let c = m1.quantize(s * inv);
    let code_negative = c < m1.negatives;
    if code_negative != s.is_sign_negative() {
        if s > 0.0 {
            c.saturating_add(1)
        } else {
            c.saturating_sub(1)
        }
    } else {
        c
    }
}

/// Whether the CPU has what the byte-permute lookups of [`vbmi`] need.
#[cfg(target_arch = "x86_64")]
fn vbmi_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
}

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod vbmi;

#[cfg(test)]
mod bench;

#[cfg(test)]
mod tests;
