//! bf16 GEMM on the CPU: bf16 operands, f32 accumulation, for `--mixed_precision bf16`.
//!
//! `dst[m×n] (row stride dst_rs) = (accumulate ? dst : 0) + a[m×k] · b[k×n]`, with `a` and `b`
//! strided matrices ([`Mat`]) of bf16 or f32 ([`GemmElem`]: f32 values are rounded to bf16, to
//! nearest even, as they are packed) and `dst` in f32. Two kernels, picked once per process:
//!
//! * [`Bf16Kernel::Avx512Bf16`]: `vdpbf16ps` (AVX512_BF16: Zen 4, Sapphire Rapids and later),
//!   which multiplies pairs of bf16 values and adds both products to an f32 lane. Both operands
//!   are packed first (pairs of consecutive k values interleaved, see [`pack`]), then the output
//!   is cut into fixed tiles of [`TILE_M`]×[`TILE_N`] that rayon computes in parallel. Each output
//!   element is summed by one task in a fixed k order, so results do not depend on the thread
//!   count.
//! * [`Bf16Kernel::F32Fallback`]: widens the operands to f32 (exact) and runs the f32 GEMM: the
//!   same math (bf16 inputs, f32 sums), for CPUs without bf16 dot products. It also runs when
//!   `SDBOOTH_BF16_KERNEL=f32_fallback` is set, so CI on any CPU tests both paths.
//!
//! The two kernels round differently (the hardware adds two products per step and flushes
//! subnormals), so they agree within f32 rounding of the sums, not bit for bit.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod cache;
#[cfg(target_arch = "x86_64")]
mod pack;
#[cfg(target_arch = "x86_64")]
mod pack_f32;
mod panels;

use crate::cpu::{self, GemmElem, Mat};
pub(crate) use cache::register as register_weight;
#[cfg(target_arch = "x86_64")]
use cache::PanelShape;
pub use cache::{PackedStep, PackedWeights};
pub(crate) use panels::{Panels, PanelsPart};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// The environment variable that forces a bf16 kernel (`f32_fallback`, or `avx512_bf16` where the
/// CPU has it); read once per process.
pub const BF16_KERNEL_ENV: &str = "SDBOOTH_BF16_KERNEL";

/// Rows of the microkernel (one broadcast pair per row per step).
pub(crate) const MR: usize = 12;
/// Columns of the microkernel: two 16-lane f32 registers.
pub(crate) const NR: usize = 32;
/// Output rows per parallel task (a multiple of [`MR`]).
const TILE_M: usize = 8 * MR;
/// Output columns per parallel task (a multiple of [`NR`]).
const TILE_N: usize = 4 * NR;
/// k pairs per block: a block of one packed column panel (`KC·NR·4` bytes = 16 KiB) stays in L1
/// while every row panel of the tile streams past it.
const KC: usize = 128;

/// Which bf16 GEMM kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AVX512_BF16 `vdpbf16ps` microkernel.
    Avx512Bf16,
    /// Widen to f32 and run the f32 GEMM.
    F32Fallback,
}

impl Bf16Kernel {
    /// The name `sdbooth bench` reports (`"avx512_bf16"`, `"f32_fallback"`).
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Avx512Bf16 => "avx512_bf16",
            Bf16Kernel::F32Fallback => "f32_fallback",
        }
    }

    /// Whether this machine can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Bf16Kernel::Avx512Bf16 => avx512_bf16_detected(),
            Bf16Kernel::F32Fallback => true,
        }
    }
}

fn avx512_bf16_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel bf16 GEMMs use in this process: the fastest the CPU has, unless
/// `SDBOOTH_BF16_KERNEL` names another (an unknown or unavailable name falls back to f32 with a
/// logged warning, since this runs deep inside an op where no error can be returned).
pub fn active_kernel() -> Bf16Kernel {
    static KERNEL: OnceLock<Bf16Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let best = if avx512_bf16_detected() { Bf16Kernel::Avx512Bf16 } else { Bf16Kernel::F32Fallback };
        match std::env::var(BF16_KERNEL_ENV).as_deref() {
            Err(_) | Ok("") => best,
            Ok("f32_fallback") => Bf16Kernel::F32Fallback,
            Ok("avx512_bf16") if best == Bf16Kernel::Avx512Bf16 => best,
            Ok(other) => {
                tracing::warn!(
                    "{BF16_KERNEL_ENV}={other} is not a bf16 kernel this CPU has \
                     (avx512_bf16 available: {}); using f32_fallback",
                    best == Bf16Kernel::Avx512Bf16
                );
                Bf16Kernel::F32Fallback
            }
        }
    })
}

/// `dst = (accumulate ? dst : 0) + a · b` with the [`active_kernel`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<A: GemmElem, B: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
) {
    gemm_with(active_kernel(), m, n, k, dst, dst_rs, accumulate, a, b)
}

/// An operand of a product: a strided matrix, packed by the product, or part of an operand
/// packed once for many products ([`Panels`], only where [`Panels::supported`]).
#[derive(Clone, Copy)]
pub(crate) enum Operand<'a, E = f32> {
    Mat(Mat<'a, E>),
    Packed(PanelsPart<'a>),
}

impl<'a, E> From<Mat<'a, E>> for Operand<'a, E> {
    fn from(mat: Mat<'a, E>) -> Self {
        Operand::Mat(mat)
    }
}

impl<'a, E: Copy> Operand<'a, E> {
    /// The matrix, unless packed already.
    #[cfg(target_arch = "x86_64")]
    fn mat(&self) -> Option<Mat<'a, E>> {
        match *self {
            Operand::Mat(mat) => Some(mat),
            Operand::Packed(_) => None,
        }
    }

    /// The operand's panels and the values from one panel to the next, for a product that
    /// packed (or kept) it whole into `packed` (`stride` values per panel): unless it is part of
    /// panels packed before.
    #[cfg(target_arch = "x86_64")]
    fn whole_panels<'b>(&self, packed: &'b [u32], stride: usize) -> (&'b [u32], usize)
    where
        'a: 'b,
    {
        match *self {
            Operand::Packed(part) => (part.data, part.stride),
            Operand::Mat(_) => (packed, stride),
        }
    }

    /// Whether the operand holds an `outer × k` matrix, as the lhs (`width` [`MR`]: outer =
    /// rows) or the rhs ([`NR`]: outer = columns).
    fn fits(&self, width: usize, outer: usize, k: usize) -> bool {
        match self {
            _ if outer == 0 || k == 0 => true,
            Operand::Mat(mat) if width == MR => mat.max_index(outer, k) < mat.data.len(),
            Operand::Mat(mat) => mat.max_index(k, outer) < mat.data.len(),
            Operand::Packed(part) => part.fits(width, outer, k),
        }
    }
}

/// [`gemm`] on the calling thread only, for products inside a task that is already one of many
/// running in parallel (attention's tiles, one head per task): no rayon jobs, no kept weight
/// packings, operands possibly packed already. Same sums as [`gemm`] (each output element is
/// summed in the same fixed k order).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
) {
    run(active_kernel(), Threads::Caller, m, n, k, dst, dst_rs, accumulate, a, b)
}

/// Where a GEMM's packing and tiles run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// On rayon's pool (the caller waits).
    Pool,
    /// On the calling thread alone.
    Caller,
}

/// [`gemm`] with a chosen kernel (tests run both). Panics if `kernel` is not
/// [`available`](Bf16Kernel::available) or a matrix does not fit its slice (a crate bug: the
/// ops validate shapes first).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with<A: GemmElem, B: GemmElem>(
    kernel: Bf16Kernel,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
) {
    run(kernel, Threads::Pool, m, n, k, dst, dst_rs, accumulate, a.into(), b.into())
}

/// [`gemm_with`] on the given threads.
#[allow(clippy::too_many_arguments)]
fn run<A: GemmElem, B: GemmElem>(
    kernel: Bf16Kernel,
    threads: Threads,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Operand<'_, A>,
    b: Operand<'_, B>,
) {
    assert!(kernel.available(), "bf16 gemm: kernel {} is not available on this CPU", kernel.name());
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_rs >= n && (m - 1) * dst_rs + n <= dst.len(), "bf16 gemm: dst too small");
    assert!(a.fits(MR, m, k), "bf16 gemm: lhs too small");
    assert!(b.fits(NR, n, k), "bf16 gemm: rhs too small");
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    match kernel {
        Bf16Kernel::F32Fallback => match (a, b) {
            (Operand::Mat(a), Operand::Mat(b)) => fallback(threads, m, n, k, dst, dst_rs, accumulate, a, b),
            _ => unreachable!("bf16 gemm: panels are packed only for the AVX512_BF16 kernel"),
        },
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512Bf16 => tiled(threads, m, n, k, dst, dst_rs, accumulate, a, b),
        #[cfg(not(target_arch = "x86_64"))]
        Bf16Kernel::Avx512Bf16 => unreachable!("the AVX512_BF16 kernel is never available off x86_64"),
    }
}

/// The f32 path: each operand rounded to bf16 and widened back (exact for bf16 values), so this is
/// the same product with f32 sums.
#[allow(clippy::too_many_arguments)]
fn fallback<A: GemmElem, B: GemmElem>(
    threads: Threads,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
) {
    let (a32, b32) = (rounded_f32(threads, a.data), rounded_f32(threads, b.data));
    let a = Mat { data: &a32, rs: a.rs, cs: a.cs };
    let b = Mat { data: &b32, rs: b.rs, cs: b.cs };
    let par = match threads {
        Threads::Pool => cpu::par_threads(),
        Threads::Caller => gemm::Parallelism::None,
    };
    cpu::sgemm(m, n, k, dst, dst_rs, accumulate, a, b, par);
}

/// The values rounded to bf16, as f32 (in parallel chunks on the pool).
fn rounded_f32<E: GemmElem>(threads: Threads, v: &[E]) -> Vec<f32> {
    let round = |(o, i): (&mut [f32], &[E])| {
        for (o, i) in o.iter_mut().zip(i) {
            *o = f32::from_bits(u32::from(i.bf16_bits()) << 16);
        }
    };
    let mut out = vec![0f32; v.len()];
    match threads {
        Threads::Pool => {
            out.par_chunks_mut(cpu::CAST_CHUNK).zip(v.par_chunks(cpu::CAST_CHUNK)).for_each(round)
        }
        Threads::Caller => out.chunks_mut(cpu::CAST_CHUNK).zip(v.chunks(cpu::CAST_CHUNK)).for_each(round),
    }
    out
}

/// A destination pointer shared by the tile tasks; each task writes only its own rectangle.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: tasks write disjoint tiles of one live `&mut [f32]` (see `tiled`).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for DstPtr {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for DstPtr {}

#[cfg(target_arch = "x86_64")]
impl DstPtr {
    /// The pointer `offset` values on (a method, so closures capture the `Sync` wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// The packed, tiled bf16 product (AVX512_BF16).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tiled<A: GemmElem, B: GemmElem>(
    threads: Threads,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Operand<'_, A>,
    b: Operand<'_, B>,
) {
    let kp = k.div_ceil(2);
    // This thread's packing buffers, taken out while in use (a nested call on this thread, from
    // rayon's work stealing, finds them empty and allocates its own).
    let (mut pa, mut pb) = PACK_BUFFERS.with(|b| std::mem::take(&mut *b.borrow_mut()));
    // A weight packed with k contiguous (the forward's layout) may be kept from earlier in the
    // step (see `cache`); every other operand is packed here.
    let pool = threads == Threads::Pool;
    let (a_mat, b_mat) = (a.mat(), b.mat());
    let kept_a = a_mat.filter(|a| pool && a.cs == 1).and_then(|a| {
        cache::packed(a.data, PanelShape { width: MR, outer: m, k, so: a.rs }, |buf| {
            pack::lhs(m, k, a, buf, threads)
        })
    });
    let kept_b = b_mat.filter(|b| pool && b.rs == 1).and_then(|b| {
        cache::packed(b.data, PanelShape { width: NR, outer: n, k, so: b.cs }, |buf| {
            pack::rhs(k, n, b, buf, threads)
        })
    });
    let (tiles_m, tiles_n) = (m.div_ceil(TILE_M), n.div_ceil(TILE_N));
    // An operand that only one tile reads at each of its rows (columns) is packed by the tiles
    // themselves, one k block at a time into a buffer that stays in cache, instead of whole
    // through memory first (written, then read back): the lhs when the output has one tile
    // column and k is not contiguous in it (n ≤ TILE_N: the transposed weight of the input
    // gradient of convs at 8x8 and below), the rhs when the output has one tile row (the
    // 64- and 77-token linears). The packed values and the k order of every sum are the same
    // either way. An lhs with k contiguous (a weight in the forward, when not kept) streams
    // better packed whole, a panel's k values at a time (one thread, 1280-channel 3x3 conv at
    // 4x4, forward: 60 GFLOP/s whole, 52 in the tiles).
    let a_in_tiles = a_mat.filter(|a| kept_a.is_none() && tiles_n == 1 && a.cs != 1);
    let b_in_tiles = b_mat.filter(|_| kept_b.is_none() && tiles_m == 1);
    if let (Some(a), None, None) = (a_mat, &kept_a, a_in_tiles) {
        pack::lhs(m, k, a, &mut pa, threads);
    }
    if let (Some(b), None, None) = (b_mat, &kept_b, b_in_tiles) {
        pack::rhs(k, n, b, &mut pb, threads);
    }
    let (pa_ref, a_stride) = a.whole_panels(kept_a.as_deref().map_or(&pa, |v| v), kp * MR);
    let (pb_ref, b_stride) = b.whole_panels(kept_b.as_deref().map_or(&pb, |v| v), kp * NR);
    let out = DstPtr(dst.as_mut_ptr());
    let tile = |t: usize| {
        let (r0, c0) = ((t / tiles_n) * TILE_M, (t % tiles_n) * TILE_N);
        let (r1, c1) = ((r0 + TILE_M).min(m), (c0 + TILE_N).min(n));
        // This thread's block buffers, taken out while in use (as `PACK_BUFFERS`).
        let (mut ba, mut bb) = BLOCK_BUFFERS.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if a_in_tiles.is_some() && ba.len() < TILE_M * KC {
            ba.resize(TILE_M * KC, 0);
        }
        if b_in_tiles.is_some() && bb.len() < TILE_N * KC {
            bb.resize(TILE_N * KC, 0);
        }
        for q0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - q0);
            if let Some(a) = a_in_tiles {
                pack::lhs_block(m, k, a, r0..r1, q0..q0 + kc, &mut ba);
            }
            if let Some(b) = b_in_tiles {
                pack::rhs_block(k, n, b, c0..c1, q0..q0 + kc, &mut bb);
            }
            let a_panel = |r: usize| -> &[u32] {
                if a_in_tiles.is_some() {
                    &ba[((r - r0) / MR) * kc * MR..][..kc * MR]
                } else {
                    &pa_ref[(r / MR) * a_stride + q0 * MR..][..kc * MR]
                }
            };
            let b_panel = |c: usize| -> &[u32] {
                if b_in_tiles.is_some() {
                    &bb[((c - c0) / NR) * kc * NR..][..kc * NR]
                } else {
                    &pb_ref[(c / NR) * b_stride + q0 * NR..][..kc * NR]
                }
            };
            for c in (c0..c1).step_by(NR) {
                let bpanel = b_panel(c);
                for r in (r0..r1).step_by(MR) {
                    let apanel = a_panel(r);
                    // The next block: the next row panel, else the first row panel of the next
                    // column panel, else the tile's first panels in the next k block where they
                    // are packed already (else nothing new: this block's own lhs panel).
                    let (next_a, next_b) = if r + MR < r1 {
                        (a_panel(r + MR).as_ptr(), std::ptr::null())
                    } else if c + NR < c1 {
                        (a_panel(r0).as_ptr(), b_panel(c + NR).as_ptr())
                    } else if q0 + KC < kp && a_in_tiles.is_none() && b_in_tiles.is_none() {
                        let a_next = pa_ref[(r0 / MR) * a_stride + (q0 + KC) * MR..].as_ptr();
                        (a_next, pb_ref[(c0 / NR) * b_stride + (q0 + KC) * NR..].as_ptr())
                    } else {
                        (apanel.as_ptr(), std::ptr::null())
                    };
                    let block = avx512::Block {
                        // In bounds: row r < m, column c < n of `dst` (asserted in `gemm_with`).
                        dst: out.at(r * dst_rs + c),
                        rs: dst_rs,
                        rows: (r1 - r).min(MR),
                        cols: (c1 - c).min(NR),
                        load: q0 > 0 || accumulate,
                        next_a,
                        next_b,
                    };
                    microkernel(kc, apanel, bpanel, &block);
                }
            }
        }
        BLOCK_BUFFERS.with(|b| *b.borrow_mut() = (ba, bb));
    };
    match threads {
        Threads::Pool => (0..tiles_m * tiles_n).into_par_iter().for_each(tile),
        Threads::Caller => (0..tiles_m * tiles_n).for_each(tile),
    }
    PACK_BUFFERS.with(|b| *b.borrow_mut() = (pa, pb));
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Packed lhs and rhs panels of this thread's last bf16 GEMM, reused by the next: the
    /// shapes repeat every step, and fresh buffers cost a zero-fill (or page faults) per call.
    /// They hold at most the two largest operands this thread packed (a few tens of MB).
    static PACK_BUFFERS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// One k block of the lhs and rhs panels of a tile, for operands packed by the tiles (at
    /// most `TILE_M·KC` and `TILE_N·KC` values: 48 and 64 KiB).
    static BLOCK_BUFFERS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The block's `dst` (see [`avx512::Block`]) plus `Σ_q a[q] ⊗ b[q]` over `kc` packed pairs.
#[cfg(target_arch = "x86_64")]
fn microkernel(kc: usize, a: &[u32], b: &[u32], block: &avx512::Block) {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR && block.rows <= MR && block.cols <= NR);
    // SAFETY: this path runs only when `gemm_with` saw the kernel available (features
    // detected), the slices hold kc pairs of both panels (asserted above), and the block's rows
    // and columns lie inside `dst`, in the tile of the one task that calls this.
    unsafe { avx512::kernel(kc, a.as_ptr(), b.as_ptr(), block) }
}
