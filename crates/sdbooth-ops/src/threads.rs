//! Keeping candle's element-wise worker threads from competing with the GEMM threads.
//!
//! candle 0.11 runs large element-wise ops (additions, products, unary maps: most of the autograd
//! gradient bookkeeping) on a "barrier pool" of its own threads, beside rayon's pool on which the
//! GEMMs of this crate and candle's matmul run: with N threads each, 2N − 1 busy threads share N
//! cores. After each op candle's workers spin for up to `CANDLE_BARRIER_POOL_SPIN_LIMIT` rounds
//! (default 25 000 `pause` instructions, about half a millisecond on Zen 4) before parking, and a
//! training step issues thousands of such ops, each followed by GEMMs whose threads the spinning
//! workers then slow down. With the limit at 200 (a few microseconds: still enough to stay awake
//! between back-to-back element-wise ops) the SD1.5 256-px fp32 step with 2 threads on the
//! shared 2-core Zen 4 went from 49.4 / 64.2 to 37.1 / 42.8 s/step (A B A B, the machine heavily
//! loaded by other jobs; user CPU time 59.7 / 63.2 → 51.4 / 50.2 s per run).
//!
//! Results do not change: the pools split the same work, only their waiting differs.

/// The environment variable candle reads once, when its barrier pool starts.
pub const SPIN_LIMIT_ENV: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The spin limit used unless the user set one.
pub const SPIN_LIMIT: u32 = 200;

/// Sets candle's barrier-pool spin limit to [`SPIN_LIMIT`] unless the environment already sets
/// one. Call it at the start of `main`, before any thread exists (it writes the process
/// environment, which must not race with readers) and before the first tensor op.
pub fn tune_thread_pools() {
    if std::env::var_os(SPIN_LIMIT_ENV).is_none() {
        std::env::set_var(SPIN_LIMIT_ENV, SPIN_LIMIT.to_string());
    }
}
