//! Seeded random weights for any architecture: builtin models and tests need no download.
//!
//! The generator is deliberately simple (SplitMix64 over a per-parameter key, uniform values) so
//! that `tools/goldens/*.py` reproduces the exact same f32 weights in NumPy: golden fixtures then
//! hold inputs, outputs and gradients, not megabytes of weights. Each parameter has its own
//! stream, keyed by its name, so values do not depend on the order or set of other parameters,
//! and large tensors are filled in parallel with a deterministic result.
//!
//! Value of element `i` of parameter `name` under `seed`:
//! ```text
//! key = fnv1a64(name) ^ mix(seed)
//! u   = (mix(key + (i + 1) * 0x9E3779B97F4A7C15) >> 40) / 2^24          in [0, 1), exact in f32
//! x   = (2u - 1) * a                                                      computed in f64, rounded to f32
//! ```
//! with `mix` SplitMix64's finaliser and `a` by kind (see `InitStyle`).

use candle_core::{Device, Var};

use crate::{ModelError, ParamStore};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bit: a stable hash of the parameter name.
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitStyle {
    /// What a fresh model looks like: weights (ndim >= 2) uniform with variance 1/fan_in, so
    /// activations keep their scale layer to layer; biases 0; norm scales (1-D `.weight`) 1.
    Standard,
    /// Every tensor random, for golden tests that must exercise biases and norm scales too:
    /// weights as `Standard`, biases uniform in ±0.1, norm scales uniform in 1 ± 0.1.
    AllRandom,
}

/// Centre and half-width `a` of the uniform distribution for one parameter (`a == 0`: a
/// constant, as `Standard` biases and norm scales).
fn range(name: &str, shape: &[usize], style: InitStyle) -> (f64, f64) {
    let is_bias = name.ends_with("bias");
    if shape.len() >= 2 && !is_bias {
        let fan_in: usize = shape[1..].iter().product();
        return (0.0, (3.0 / fan_in.max(1) as f64).sqrt());
    }
    let centre = if is_bias { 0.0 } else { 1.0 };
    match style {
        InitStyle::Standard => (centre, 0.0),
        InitStyle::AllRandom => (centre, 0.1),
    }
}

/// The values of one parameter (row-major), as described in the module docs.
pub fn param_values(name: &str, shape: &[usize], seed: u64, style: InitStyle) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let (centre, a) = range(name, shape, style);
    if a == 0.0 {
        return vec![centre as f32; n];
    }
    let key = fnv1a64(name) ^ mix(seed);
    let value = |i: usize| -> f32 {
        let u =
            (mix(key.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN))) >> 40) as f64 / (1u64 << 24) as f64;
        (centre + (2.0 * u - 1.0) * a) as f32
    };
    let mut out = vec![0f32; n];
    // Large tensors (SD1.5 has 860M weights) are filled on all cores; each element depends only
    // on its index, so the split does not change the result.
    const CHUNK: usize = 1 << 20;
    if n <= CHUNK {
        out.iter_mut().enumerate().for_each(|(i, v)| *v = value(i));
    } else {
        let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1);
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            for (c, part) in out.chunks_mut(per).enumerate() {
                let value = &value;
                s.spawn(move || part.iter_mut().enumerate().for_each(|(i, v)| *v = value(c * per + i)));
            }
        });
    }
    out
}

/// Seeded weights for every `(name, shape)` (f32), `InitStyle::Standard`. They are made on the
/// host, as a model read from a file is; the trainer moves them to its device.
pub fn random_params(shapes: &[(String, Vec<usize>)], seed: u64) -> Result<ParamStore, ModelError> {
    random_params_with(shapes, seed, InitStyle::Standard, &Device::Cpu)
}

pub fn random_params_with(
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    style: InitStyle,
    device: &Device,
) -> Result<ParamStore, ModelError> {
    let mut store = ParamStore::new();
    for (name, shape) in shapes {
        let values = param_values(name, shape, seed, style);
        // A Var built from the Vec directly: no second copy of an 860M-weight model.
        let var = Var::from_vec(values, shape.as_slice(), device)?;
        store.insert_var(name.clone(), var);
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_name_and_scaled() {
        let a = param_values("x.weight", &[64, 32, 3, 3], 7, InitStyle::Standard);
        let b = param_values("x.weight", &[64, 32, 3, 3], 7, InitStyle::Standard);
        let c = param_values("x.weight", &[64, 32, 3, 3], 8, InitStyle::Standard);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let var: f64 = a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / a.len() as f64;
        let want = 1.0 / (32.0 * 9.0);
        assert!((var / want - 1.0).abs() < 0.05, "variance {var} vs {want}");
        assert_eq!(param_values("x.bias", &[4], 7, InitStyle::Standard), vec![0.0; 4]);
        assert_eq!(param_values("n.weight", &[4], 7, InitStyle::Standard), vec![1.0; 4]);
        let r = param_values("n.weight", &[100], 7, InitStyle::AllRandom);
        assert!(r.iter().all(|&v| (0.9..=1.1).contains(&v)) && r.iter().any(|&v| v != 1.0));
    }

    #[test]
    fn parallel_fill_matches_serial_formula() {
        // Above the chunk threshold the fill is threaded; element values must not change.
        let n = (1 << 20) + 3;
        let big = param_values("w.weight", &[n, 1], 3, InitStyle::Standard);
        let small = param_values("w.weight", &[1000, 1], 3, InitStyle::Standard);
        assert_eq!(&big[..1000], &small[..]);
    }
}
