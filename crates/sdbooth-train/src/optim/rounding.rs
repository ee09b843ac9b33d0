//! Stochastic rounding of f32 weights to bf16 on the host (`--full_bf16`).
//!
//! Each f32 gets 16 random bits added to its bit pattern and is truncated to its top 16 bits:
//! the chance of rounding up is the distance to the lower neighbour, so the expected stored value
//! equals the f32 value and updates far below bf16's resolution still move the weights on
//! average. The random bits of value `i` of one update are a counter-based hash of `(key, i)`,
//! the same hash the tensor-operation path computes on the device (`device/rounding.rs`), so both
//! paths round to the same bits (except f32 subnormals, which the device's value-based rule keeps
//! at their nearest bf16 neighbour toward zero). The key depends on the rounding seed, the
//! parameter's name and its step count (`device::rounding_key`): the result does not depend on
//! the order parameters are updated in or on the thread count, and a resumed run repeats it.
//!
//! The hash is a few 32-bit multiplications, additions and shifts per value: the loop vectorises
//! (AVX-512 or AVX2 chosen at run time, the same integer operations everywhere) and runs in
//! parallel over fixed chunks, at memory speed instead of one ChaCha draw per four values.

use half::bf16;
use rayon::prelude::*;

/// Values per rayon task.
const CHUNK: usize = 1 << 14;

/// The 16 random bits (0..65536) of value `index` of the update keyed `key`: the device path's
/// hash (`device/rounding.rs`, `uniform16`), in u32 arithmetic.
#[inline(always)]
pub fn rounding_bits(key: u64, index: u32) -> u32 {
    let (k0, k1) = (key as u32, (key >> 32) as u32);
    let mut h = index.wrapping_add(k0);
    for (mult, add) in
        [(0x2c1b_3c6d_u32, k1), (0x297a_2d39, k0 ^ 0x9e37_79b9), (0x6b43_a9b5, k1 ^ 0x7f4a_7c15)]
    {
        h = h.wrapping_add(h >> 16);
        h = h.wrapping_mul(mult).wrapping_add(add);
        h = h.wrapping_add(h >> 15);
    }
    h >> 16
}

/// Rounds `src` into `dst` (same length) with the stream of `key`; value `i` takes
/// `rounding_bits(key, i)`.
pub fn stochastic_round(src: &[f32], dst: &mut [bf16], key: u64) {
    let kernel = chunk_kernel();
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(k, (dst, src))| {
        kernel(src, dst, key, (k * CHUNK) as u32);
    });
}

/// Rounds `src` (values `first..` of a tensor) into `dst` on this thread: `(src, dst, key, first)`.
pub(crate) type ChunkKernel = fn(&[f32], &mut [bf16], u64, u32);

/// The chunk rounding for the CPU at hand (all give the same bits).
pub(crate) fn chunk_kernel() -> ChunkKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |s, d, key, first| unsafe { round_chunk_avx512(s, d, key, first) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return |s, d, key, first| unsafe { round_chunk_avx2(s, d, key, first) };
        }
    }
    round_chunk
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_chunk_avx512(src: &[f32], dst: &mut [bf16], key: u64, first: u32) {
    round_chunk(src, dst, key, first)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_chunk_avx2(src: &[f32], dst: &mut [bf16], key: u64, first: u32) {
    round_chunk(src, dst, key, first)
}

/// Values `first..first + src.len()` of the stream; written without branches (non-finite values
/// are truncated unchanged, a NaN kept quiet) so it vectorises.
#[inline(always)]
fn round_chunk(src: &[f32], dst: &mut [bf16], key: u64, first: u32) {
    for (i, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
        let bits = x.to_bits();
        let finite = bits & 0x7F80_0000 != 0x7F80_0000;
        let r = rounding_bits(key, first.wrapping_add(i as u32));
        // bf16::from_f32 of a non-finite value: infinities truncate; NaN stays NaN (quiet bit).
        let nan_quiet = if bits & 0x007F_FFFF != 0 { 0x0040_0000 } else { 0 };
        let rounded = if finite { bits.wrapping_add(r) } else { bits | nan_quiet };
        *d = bf16::from_bits((rounded >> 16) as u16);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.618).sin() * 3.0 + 1e-3).collect()
    }

    #[test]
    fn same_bits_for_any_thread_count_and_kernel() {
        let n = CHUNK * 3 + 7;
        let src = values(n);
        let mut want = vec![bf16::ZERO; n];
        round_chunk(&src, &mut want, 99, 0);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut got = vec![bf16::ZERO; n];
            pool.install(|| stochastic_round(&src, &mut got, 99));
            assert_eq!(got, want, "{threads} threads");
        }
    }

    /// The host rounding gives the tensor path's bits (normal values, zeros, bf16 values).
    #[test]
    fn equals_the_device_paths_rounding() {
        let mut src = values(10_000);
        src[3] = 0.0;
        src[4] = -0.0;
        src[5] = 1.0;
        src[6] = -2.5;
        for key in [0, 1, 0xDEAD_BEEF_0123_4567] {
            let mut host = vec![bf16::ZERO; src.len()];
            stochastic_round(&src, &mut host, key);
            let t = Tensor::from_slice(&src, src.len(), &Device::Cpu).unwrap();
            let device =
                super::super::device::stochastic_round_bf16(&t, key).unwrap().to_vec1::<bf16>().unwrap();
            assert_eq!(host, device, "key {key:#x}");
        }
    }

    /// Non-finite values keep their class; finite ones go to a bf16 neighbour.
    #[test]
    fn specials_and_neighbours() {
        let src = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.0 + 2f32.powi(-9), -3.0e-20];
        let mut dst = [bf16::ZERO; 5];
        stochastic_round(&src, &mut dst, 5);
        assert_eq!(dst[0], bf16::INFINITY);
        assert_eq!(dst[1], bf16::NEG_INFINITY);
        assert!(dst[2].is_nan());
        for (d, x) in dst[3..].iter().zip(&src[3..]) {
            let (lo, hi) = (
                bf16::from_bits((x.to_bits() >> 16) as u16),
                bf16::from_bits((x.to_bits() >> 16) as u16 + 1),
            );
            assert!(*d == lo || *d == hi, "{x} -> {d}");
        }
    }
}
