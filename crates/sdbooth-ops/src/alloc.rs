//! Allocation of kernel outputs: glibc malloc tuning for training-sized buffers, and output
//! buffers without a zero fill ([`uninit_output`]).
//!
//! Every op output is a fresh allocation (candle owns the `Vec`), and a training step makes
//! many large ones: a 1280-channel 3x3 conv weight gradient is 59 MB, a 1280→10240 linear
//! weight 52 MB. glibc serves anything above its mmap threshold (at most 32 MB) with a fresh
//! `mmap` and unmaps it on free, so every such buffer is page-faulted and zeroed by the kernel
//! page by page again: measured here, a 59 MB calloc + first touch costs 24 ms, about as much
//! as the 1280-channel grad-weight GEMM itself, and the SD1.5 256-px step spent a third of its
//! time in the kernel. Serving large blocks from the heap and not trimming it keeps freed pages
//! mapped for the next step's buffers of the same sizes. SD1.5 256-px step, AdamW, gradient
//! checkpointing, two runs back to back on the shared 2-core machine: 18.0 s → 14.5 s per step
//! (backward 12.2 → 9.8 s, optimizer 3.7 → 2.6 s, kernel time 24 → 17 s over the run), peak RSS
//! +0.2%.
//!
//! Applied once, on the first CPU conv2d/linear call (or explicitly with [`tune_allocator`]).
//! Set `SDBOOTH_NO_MALLOC_TUNING=1` to leave malloc as it is. Only glibc is touched; other
//! platforms and allocators are unaffected.

use std::sync::Once;

use half::{bf16, f16};

static TUNE: Once = Once::new();

/// Tunes glibc malloc for large, repeatedly allocated buffers (see the module docs). Idempotent;
/// a no-op off glibc or with `SDBOOTH_NO_MALLOC_TUNING` set.
pub fn tune_allocator() {
    TUNE.call_once(|| {
        if std::env::var_os("SDBOOTH_NO_MALLOC_TUNING").is_some() {
            return;
        }
        imp::tune();
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::os::raw::c_int;

    // glibc's <malloc.h> parameter numbers.
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_TOP_PAD: c_int = -2;
    const M_MMAP_MAX: c_int = -4;

    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    pub(super) fn tune() {
        // SAFETY: mallopt only changes allocator parameters; glibc serialises it with the
        // arenas' locks, and a rejected value leaves the old one in place.
        unsafe {
            // No mmap-served blocks: large buffers come from the heap and are reused after free
            // (when the heap cannot grow glibc still falls back to mmap).
            mallopt(M_MMAP_MAX, 0);
            // Never trim the heap: the activations freed at the end of a step are the next
            // step's buffers. glibc stores the value as a size_t, so -1 means "no limit"
            // (a 2 GiB limit still re-faulted gigabytes per step).
            mallopt(M_TRIM_THRESHOLD, -1);
            // Grow the heap in 64 MiB steps: fewer brk calls.
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn tune() {}
}

/// Element types [`uninit_output`] may hand out: plain numbers, every bit pattern a valid value,
/// no drop glue. (`pub` only because [`crate::cpu::GemmElem`] requires it; the module is private.)
pub trait Plain: Copy + Send + Sync + 'static {
    /// What debug builds fill new buffers with, so an element a kernel forgot to write shows.
    const POISON: Self;
}

impl Plain for f32 {
    const POISON: Self = f32::NAN;
}

impl Plain for bf16 {
    const POISON: Self = bf16::NAN;
}

impl Plain for f16 {
    const POISON: Self = f16::NAN;
}

impl Plain for f64 {
    const POISON: Self = f64::NAN;
}

/// A buffer of `n` values for a kernel output that the kernel overwrites completely, without the
/// zero fill of `vec![0.0; n]`. That fill is a serial `memset` on the thread that applies the op
/// (glibc's calloc zeroes reused heap memory; [`tune_allocator`] makes nearly every buffer
/// reused), a whole pass over the output before the kernel's own parallel pass: in the SD1.5
/// step about 5 % of the main thread's time, with the GEMM threads waiting.
///
/// The contents are whatever the allocator's memory held (NaN in debug builds).
///
/// # Safety
/// The caller must write every element before reading any and before the buffer leaves the
/// kernel (returned, wrapped in a tensor); only dropping it unwritten is allowed. Each call site
/// says why its kernel writes every element (`SAFETY:`). Rust calls reading memory that was never
/// written undefined behaviour even for `f32`, whose every bit pattern is a number; the contract
/// rules such reads out (kernels only store through `&mut` slices of the buffer until it is full).
pub(crate) unsafe fn uninit_output<T: Plain>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    if cfg!(debug_assertions) {
        v.resize(n, T::POISON);
        return v;
    }
    // SAFETY: the capacity is `n`; `T` has no invalid values and no drop glue, and the caller
    // writes every element before any is read (the contract above).
    unsafe { v.set_len(n) };
    v
}
