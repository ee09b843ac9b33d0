//! A counting global allocator for the peak-memory tests: it tracks live bytes, their peak and the
//! largest single allocation. A test binary installs it with
//! `#[global_allocator] static GLOBAL: Counting = Counting;` and holds one test, so no other
//! test's allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
            LARGEST.fetch_max(l.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
}

/// Starts a measurement: the peak restarts from the bytes live now, the largest allocation from 0.
/// Returns the live bytes, the baseline of [`peak_and_largest`].
pub fn start() -> usize {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    LARGEST.store(0, Relaxed);
    base
}

/// (peak live bytes above `base`, largest single allocation) since [`start`].
pub fn peak_and_largest(base: usize) -> (usize, usize) {
    (PEAK.load(Relaxed) - base, LARGEST.load(Relaxed))
}
