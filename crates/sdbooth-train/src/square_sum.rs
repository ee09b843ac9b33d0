//! The squared L2 norm of an f32 gradient on the host, in one read of the gradient and with the
//! same bits as candle's `grad.sqr()?.sum_all()` on the CPU (which writes a squared copy of the
//! gradient, a fresh model-size allocation on one thread, and then reads it again).
//!
//! candle sums an f32 tensor with `vec_sum`: on x86-64 with AVX2, 32 running partial sums (four
//! 8-lane vectors; partial `k` takes the values at positions ≡ k mod 32 of the whole 32-value
//! groups), reduced in a fixed tree, then the remaining values added one by one; without AVX2,
//! one running sum. Each partial sum is a chain of f32 additions, so the order of those additions
//! is reproduced exactly here (the squares are rounded to f32 before they are added, as the
//! squared copy is). On other architectures candle's own operations are used (`host_square_sum`
//! returns `None`).

/// Values per group of partial sums (candle's `STEP`).
const LANES: usize = 32;

/// From this many values on, the two halves of the partial sums (each half of every 32-value
/// group: one cache line) are summed on two rayon tasks. A fused block's norms run one task per
/// gradient, so a block with one gradient of tens of millions of values otherwise kept one thread
/// reading it while the other waited. Each partial sum is the same chain either way.
const SPLIT_MIN: usize = 1 << 18;

/// An element read as f32. bf16 and f16 widen exactly, so summing them in place gives the bits
/// of summing their f32 copy, without the copy (a `--full_bf16` gradient would otherwise be
/// widened into a temporary as large as twice itself).
pub(crate) trait Widen: Copy + Sync {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Σ x² over `xs` in candle's order for this CPU, or `None` where that order is not reproduced
/// here (the caller then uses candle's operations).
pub(crate) fn host_square_sum<T: Widen>(xs: &[T]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected just above.
            return Some(unsafe { lanes_avx2(xs) });
        }
        Some(sequential(xs))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = xs;
        None
    }
}

/// candle's scalar `vec_sum` over the squares: one running sum.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn sequential<T: Widen>(xs: &[T]) -> f32 {
    let mut sum = 0f32;
    for &x in xs {
        let x = x.widen();
        sum += x * x;
    }
    sum
}

/// candle's AVX2 `vec_sum` over the squares (compiled for AVX2 so the 32 independent partial sums
/// run in vector registers; each is still a sequential chain, so the bits do not change).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_avx2<T: Widen>(xs: &[T]) -> f32 {
    const HALF: usize = LANES / 2;
    let acc = if xs.len() >= SPLIT_MIN {
        // SAFETY (both): this function runs only after AVX2 was detected.
        let (low, high) = rayon::join(
            || unsafe { partial_sums_avx2::<T, 0, HALF>(xs) },
            || unsafe { partial_sums_avx2::<T, HALF, HALF>(xs) },
        );
        std::array::from_fn(|l| if l < HALF { low[l] } else { high[l - HALF] })
    } else {
        partial_sums::<T, 0, LANES>(xs)
    };
    reduce(&acc, xs)
}

/// Partial sums `FIRST..FIRST + N` of `xs`, compiled for AVX2 (a closure calling the inlined
/// function would not inherit the target feature).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn partial_sums_avx2<T: Widen, const FIRST: usize, const N: usize>(xs: &[T]) -> [f32; N] {
    partial_sums::<T, FIRST, N>(xs)
}

/// candle's partial sums `FIRST..FIRST + N`: partial `k` sums the squares at the positions ≡ k
/// mod 32 of the whole 32-value groups, in order.
#[inline(always)]
fn partial_sums<T: Widen, const FIRST: usize, const N: usize>(xs: &[T]) -> [f32; N] {
    let mut acc = [0f32; N];
    for group in xs.chunks_exact(LANES) {
        for (a, &x) in acc.iter_mut().zip(&group[FIRST..FIRST + N]) {
            let x = x.widen();
            *a += x * x;
        }
    }
    acc
}

/// candle's `vec_reduce` of the 32 partial sums: vectors (0+1) + (2+3) lane by lane, then the 8
/// lanes as `_mm_add_ps(low half, high half)` and two `_mm_hadd_ps`; then the values after the
/// last whole group added one by one.
#[inline(always)]
fn reduce<T: Widen>(acc: &[f32; LANES], xs: &[T]) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]));
    let h: [f32; 4] = std::array::from_fn(|l| v[l] + v[4 + l]);
    let mut sum = (h[0] + h[1]) + (h[2] + h[3]);
    for &x in xs.chunks_exact(LANES).remainder() {
        let x = x.widen();
        sum += x * x;
    }
    sum
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn candle_square_sum(xs: &[f32]) -> f32 {
        let t = Tensor::from_slice(xs, xs.len(), &Device::Cpu).unwrap();
        t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Values whose sums round differently in every order: wide magnitudes, signs, zeros,
    /// infinities; lengths with and without a remainder.
    #[test]
    fn equals_candles_sqr_sum_all_bit_for_bit() {
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // 300_007 and 1 << 20 are summed in two halves on two tasks (SPLIT_MIN).
        for n in [0, 1, 31, 32, 33, 64, 1000, 4096 + 17, 300_007, 1 << 20] {
            let xs: Vec<f32> = (0..n)
                .map(|i| {
                    let r = next();
                    let mantissa = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    mantissa * 2f32.powi((r % 40) as i32 - 20) * if i % 977 == 5 { 0.0 } else { 1.0 }
                })
                .collect();
            let Some(got) = host_square_sum(&xs) else { return };
            assert_eq!(got.to_bits(), candle_square_sum(&xs).to_bits(), "n = {n}");
        }
        let mut with_inf = vec![1.5f32; 100];
        with_inf[40] = f32::INFINITY;
        assert_eq!(host_square_sum(&with_inf), Some(f32::INFINITY));
    }

    /// bf16 values summed in place give the bits of their f32 widening summed.
    #[test]
    fn bf16_in_place_equals_the_widened_copy() {
        let xs: Vec<half::bf16> =
            (0..10_007).map(|i| half::bf16::from_f32(((i * 7919) % 2003) as f32 * 1e-3 - 1.0)).collect();
        let widened: Vec<f32> = xs.iter().map(|x| x.to_f32()).collect();
        assert_eq!(host_square_sum(&xs).map(f32::to_bits), host_square_sum(&widened).map(f32::to_bits));
    }
}
