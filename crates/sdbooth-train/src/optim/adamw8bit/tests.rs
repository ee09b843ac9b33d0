//! Tests of the AdamW8bit kernels: rounding tables, every kernel against the portable one, the
//! bf16 step, independence from the thread count.

use super::*;
use crate::optim::OptimizerKind;

/// The compact table rounds every float as the full 2^16-bucket table (`lo + (up < x)`) does:
/// checked on every bucket at its ends, around its midpoint and at a spread of low bits.
#[test]
fn compact_rounding_table_equals_the_full_one() {
    let (m1, m2) = maps();
    for m in [m1, m2] {
        let full = full_rounding_table(&m.code);
        assert!(m.rounding.len() <= 2 * 3200, "table of {} entries", m.rounding.len());
        for key in 0u32..1 << 16 {
            let (lo, up) = full[key as usize];
            let up_low = up.to_bits() & 0xFFFF;
            let lows = [0, 1, 0x5555, 0x8000, 0xFFFE, 0xFFFF, up_low.wrapping_sub(1), up_low, up_low + 1];
            for low in lows.into_iter().filter(|&l| l <= 0xFFFF) {
                let x = f32::from_bits((key << 16) | low);
                let want = if x.is_nan() { 0 } else { lo + u8::from(up < x) };
                assert_eq!(m.quantize(x), want, "x = {x:e} ({:#010x})", x.to_bits());
            }
        }
    }
}

/// The AVX-512 lookup equals the scalar one on every bucket (both edges of its low bits).
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_rounding_lookup_equals_the_scalar_one() {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return;
    }
    let (m1, m2) = maps();
    for m in [m1, m2] {
        let xs: Vec<f32> =
            (0u32..1 << 17).map(|i| f32::from_bits(((i >> 1) << 16) | ((i & 1) * 0xFFFF))).collect();
        for chunk in xs.chunks(16) {
            let want: Vec<u8> = chunk.iter().map(|&x| m.quantize(x)).collect();
            // SAFETY: AVX-512F detected above; `chunk` has 16 values.
            let got = unsafe {
                use std::arch::x86_64::*;
                let mut out = [0i32; 16];
                let codes = avx512::quantize_for_test(m, _mm512_loadu_ps(chunk.as_ptr()));
                _mm512_storeu_si512(out.as_mut_ptr().cast(), codes);
                out.map(|c| c as u8)
            };
            assert_eq!(got.as_slice(), want.as_slice(), "{chunk:?}");
        }
    }
}

/// Widening (portable and dispatched) gives `half`'s bits for every bf16, NaNs included.
#[test]
fn widen_equals_half_on_every_bf16() {
    let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let want: Vec<u32> = all.iter().map(|x| x.to_f32().to_bits()).collect();
    for kernel in [widen as Widen, widen_kernel()] {
        let mut got = vec![0f32; all.len()];
        kernel(&all, &mut got);
        assert_eq!(bits(&got), want);
    }
}

#[test]
fn at_most_one_midpoint_per_bucket() {
    let (m1, m2) = maps();
    assert!(m1.max_midpoints_per_bucket() <= 1);
    assert!(m2.max_midpoints_per_bucket() <= 1);
    assert_eq!(m1.negatives, 127);
    assert_eq!(m2.negatives, 0);
}

/// A tensor's weights, gradient and 8-bit state.
#[derive(Clone, PartialEq, Debug)]
pub(super) struct Case {
    pub(super) w: Vec<f32>,
    pub(super) g: Vec<f32>,
    pub(super) q1: Vec<u8>,
    pub(super) q2: Vec<u8>,
    pub(super) a1: Vec<f32>,
    pub(super) a2: Vec<f32>,
}

/// Deterministic test data: gradients with NaN/Inf, zeros and tiny values, random states,
/// some all-zero blocks of m.
pub(super) fn data(n: usize, seed: u64) -> Case {
    let mut x = seed;
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    let mut unit = move || next() as f32 / u32::MAX as f32 * 2.0 - 1.0;
    let byte = |u: f32| ((u + 1.0) * 127.9) as u8;
    let w: Vec<f32> = (0..n).map(|_| unit()).collect();
    let g: Vec<f32> = (0..n)
        .map(|i| match i % 997 {
            3 => f32::NAN,
            5 => f32::INFINITY,
            k if (600..700).contains(&k) => 0.0,
            k if k % 31 == 0 => unit() * 1e-8,
            _ => unit() * 1e-2,
        })
        .collect();
    let q1: Vec<u8> = (0..n).map(|_| byte(unit())).collect();
    let q2: Vec<u8> = (0..n).map(|_| byte(unit())).collect();
    let blocks = n.div_ceil(BLOCK);
    let a1: Vec<f32> = (0..blocks).map(|b| if b % 7 == 2 { 0.0 } else { unit().abs() * 1e-2 }).collect();
    let a2: Vec<f32> = (0..blocks).map(|_| unit().abs() * 1e-4).collect();
    Case { w, g, q1, q2, a1, a2 }
}

/// `data(n, seed)` after one update by `update` (with weight decay and a gradient scale).
fn updated(n: usize, seed: u64, update: impl FnOnce(&Scalars, &mut Case)) -> Case {
    let mut t = data(n, seed);
    let mut c = OptimizerConfig::new(OptimizerKind::AdamW8bit);
    c.weight_decay = 0.01;
    update(&Scalars::new(&c, 3, 1e-3, 0.7), &mut t);
    t
}

/// [`updated`] by a block kernel, block by block.
fn run(kernel: BlockKernel, n: usize, seed: u64) -> Case {
    updated(n, seed, |sc, t| {
        let blocks = t.w.chunks_mut(BLOCK).zip(t.g.chunks(BLOCK));
        let states = t.q1.chunks_mut(BLOCK).zip(t.q2.chunks_mut(BLOCK));
        for (k, ((w, g), (q1, q2))) in blocks.zip(states).enumerate() {
            let (a1, a2) = (&mut t.a1[k], &mut t.a2[k]);
            kernel(sc, Block { w, g, q1, q2, a1, a2 });
        }
    })
}

/// [`updated`] by a task kernel, all blocks as one task.
fn run_task(kernel: TaskKernel, n: usize, seed: u64) -> Case {
    updated(n, seed, |sc, t| {
        let Case { w, g, q1, q2, a1, a2 } = t;
        kernel(sc, Blocks { w, g, q1, q2, a1, a2 });
    })
}

/// Asserts that `got` has the bits of `want`: weights, codes and absmax.
fn assert_same_bits(want: &Case, got: &Case, what: &str) {
    assert_eq!(bits(&want.w), bits(&got.w), "{what}: weights");
    assert_eq!((&want.q1, &want.q2), (&got.q1, &got.q2), "{what}: states");
    assert_eq!((bits(&want.a1), bits(&want.a2)), (bits(&got.a1), bits(&got.a2)), "{what}: absmax");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every block kernel this CPU can run, the portable one first (the dispatched one is among
/// them; the others are what CPUs without its features run).
pub(super) fn kernels() -> Vec<(&'static str, BlockKernel)> {
    let mut kernels: Vec<(&str, BlockKernel)> = vec![("portable", update_block)];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            kernels.push(("avx512", avx512::update_block));
        }
        if vbmi_detected() {
            kernels.push(("avx512_vbmi", avx512::update_block_vbmi));
        }
    }
    kernels
}

/// Every task kernel this CPU can run, the block-by-block loop first.
pub(super) fn task_kernels() -> Vec<(&'static str, TaskKernel)> {
    let mut kernels: Vec<(&str, TaskKernel)> = vec![("blocks", update_blocks)];
    #[cfg(target_arch = "x86_64")]
    {
        if vbmi_detected() {
            kernels.push(("pipelined_vbmi", avx512::update_blocks_vbmi));
        }
    }
    kernels
}

/// Task kernels give the portable block kernel's bits: tasks of whole blocks (even and odd
/// counts), with a shorter last block, of one short block; NaN/Inf gradients and all-zero
/// blocks included.
#[test]
fn every_task_kernel_equals_the_portable_block_kernel() {
    let dispatched = task_kernel();
    assert!(
        task_kernels().iter().any(|&(_, k)| std::ptr::fn_addr_eq(k, dispatched)),
        "dispatched task kernel untested"
    );
    for (name, kernel) in task_kernels() {
        for (n, seed) in
            [(TASK, 1), (256 * 7, 5), (256 * 9 + 77, 2), (256 + 64 + 16 + 5, 4), (100, 3), (256, 6)]
        {
            assert_same_bits(
                &run(update_block, n, seed),
                &run_task(kernel, n, seed),
                &format!("{name}, n={n}"),
            );
        }
    }
}

#[test]
fn every_kernel_equals_the_portable_one() {
    let dispatched = block_kernel();
    assert!(
        kernels().iter().any(|&(_, k)| std::ptr::fn_addr_eq(k, dispatched)),
        "dispatched kernel untested"
    );
    for (name, kernel) in kernels() {
        for (n, seed) in [(256 * 40, 1), (256 * 9 + 77, 2), (256 + 64 + 16 + 5, 4), (100, 3)] {
            assert_same_bits(&run(update_block, n, seed), &run(kernel, n, seed), &format!("{name}, n={n}"));
        }
    }
}

/// bf16 weights updated block by block, with f32 or bf16 gradients, on 1 or 3 threads, give
/// the bits of widening the whole tensors, the f32 step and stochastic rounding of the result.
#[test]
fn bf16_step_equals_widen_step_round() {
    let n = TASK * 2 + 300;
    let Case { w: w0, g, .. } = data(n, 11);
    let g_bf16: Vec<bf16> = g.iter().map(|&x| bf16::from_f32(x)).collect();
    let c = OptimizerConfig::new(OptimizerKind::AdamW8bit);
    let wb0: Vec<bf16> = w0.iter().map(|&x| bf16::from_f32(x)).collect();
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for grad in [GradRef::F32(&g), GradRef::BF16(&g_bf16)] {
            let g32: Vec<f32> = grad.with_f32(|g| g.to_vec());
            let (mut st_a, mut st_b) = (ParamState::default(), ParamState::default());
            let (mut wa, mut wb) = (wb0.clone(), wb0.clone());
            for s in 1..=3 {
                let key = 0x1234_5678_9ABC_DEF0 ^ s;
                st_a.step = s;
                pool.install(|| step_bf16(&c, &mut st_a, &mut wa, grad, 0.5, 1e-3, key)).unwrap();
                st_b.step = s;
                let mut w32: Vec<f32> = wb.iter().map(|x| x.to_f32()).collect();
                step(&c, &mut st_b, &mut w32, &g32, 0.5, 1e-3).unwrap();
                rounding::stochastic_round(&w32, &mut wb, key);
            }
            assert_eq!(wa, wb, "{threads} threads");
            assert_eq!(st_a, st_b, "{threads} threads");
        }
    }
}

#[test]
fn step_does_not_depend_on_the_thread_count() {
    let n = TASK_BLOCKS * BLOCK * 5 + 300;
    let Case { w: w0, g, .. } = data(n, 9);
    let c = OptimizerConfig::new(OptimizerKind::AdamW8bit);
    let once = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut st = ParamState::default();
            let mut w = w0.clone();
            for s in 1..=3 {
                st.step = s;
                step(&c, &mut st, &mut w, &g, 1.0, 1e-3).unwrap();
            }
            (bits(&w), st)
        })
    };
    assert_eq!(once(1), once(3));
}
