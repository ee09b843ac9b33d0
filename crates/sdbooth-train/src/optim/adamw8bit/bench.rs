//! Microbenchmark of the block and task kernels (an ignored test: `cargo test --release -p
//! sdbooth-train --lib adamw8bit::bench -- --ignored --nocapture`): ns per value on one thread, on
//! data that stays in the cache (32 K values) and on data streamed from memory (32 M values),
//! kernels alternated A B A B; prints the best of the rounds per kernel. Time is the thread's CPU
//! time (/proc/thread-self/schedstat, wall time where that is missing): on a shared machine less
//! disturbed by other processes than wall time. On the shared VM that time advanced in 4 ms ticks,
//! so each timing covers ~0.1–0.5 s of work (4000 cached passes, 8 streamed ones).

use std::time::Instant;

use super::tests::{data, kernels, task_kernels};
use super::{Block, BlockKernel, Blocks, Scalars, TaskKernel, BLOCK, TASK};
use crate::optim::{OptimizerConfig, OptimizerKind};

/// Seconds of CPU time this thread has run, if the kernel says.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(stat.split_whitespace().next()?.parse::<f64>().ok()? * 1e-9)
}

/// A kernel to time: per block (as the block kernels' tests call them) or per task of
/// `TASK` values (as `step` calls them).
#[derive(Clone, Copy)]
enum Kernel {
    Block(BlockKernel),
    Task(TaskKernel),
}

/// Seconds of one pass of `kernel` over all blocks of `case`, `passes` times.
fn time(kernel: Kernel, case: &mut super::tests::Case, passes: usize) -> f64 {
    let c = OptimizerConfig::new(OptimizerKind::AdamW8bit);
    let sc = Scalars::new(&c, 3, 1e-3, 1.0);
    let (start, cpu_start) = (Instant::now(), thread_cpu_seconds());
    for _ in 0..passes {
        match kernel {
            Kernel::Block(kernel) => {
                let blocks = case.w.chunks_mut(BLOCK).zip(case.g.chunks(BLOCK));
                let states = case.q1.chunks_mut(BLOCK).zip(case.q2.chunks_mut(BLOCK));
                let absmax = case.a1.iter_mut().zip(case.a2.iter_mut());
                for (((w, g), (q1, q2)), (a1, a2)) in blocks.zip(states).zip(absmax) {
                    kernel(&sc, Block { w, g, q1, q2, a1, a2 });
                }
            }
            Kernel::Task(kernel) => {
                let tasks = case.w.chunks_mut(TASK).zip(case.g.chunks(TASK));
                let states = case.q1.chunks_mut(TASK).zip(case.q2.chunks_mut(TASK));
                let blocks = TASK / BLOCK;
                let absmax = case.a1.chunks_mut(blocks).zip(case.a2.chunks_mut(blocks));
                for (((w, g), (q1, q2)), (a1, a2)) in tasks.zip(states).zip(absmax) {
                    kernel(&sc, Blocks { w, g, q1, q2, a1, a2 });
                }
            }
        }
    }
    match (cpu_start, thread_cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => start.elapsed().as_secs_f64(),
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn block_kernels_ns_per_value() {
    for (label, n, passes) in [("cached", 32 << 10, 4000), ("streamed", 32 << 20, 8)] {
        let mut case = data(n, 5);
        let blocks = kernels().into_iter().map(|(name, k)| (name, Kernel::Block(k)));
        let kernels: Vec<(&str, Kernel)> =
            blocks.chain(task_kernels().into_iter().map(|(name, k)| (name, Kernel::Task(k)))).collect();
        let mut best = vec![f64::INFINITY; kernels.len()];
        for _round in 0..4 {
            for (k, &(_, kernel)) in kernels.iter().enumerate() {
                let secs = time(kernel, &mut case, passes);
                best[k] = best[k].min(secs * 1e9 / (n * passes) as f64);
            }
        }
        for ((name, _), ns) in kernels.iter().zip(best) {
            println!("{label:>8} {name:>14}: {ns:.3} ns/value");
        }
    }
}
