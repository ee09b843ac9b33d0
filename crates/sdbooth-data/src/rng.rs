//! Every random stream of a training run, by name, with how it is derived from the run's seed.
//!
//! A derivation is part of a run's result: changing one changes the weights every run that uses
//! the stream trains to. So each stream keeps the derivation it was introduced with (hence ChaCha8
//! streams seeded from a u64 beside keyed ChaCha20 streams), and a new stream takes a new
//! [`Purpose`] of the keyed stream rather than a scheme of its own.
//!
//! Streams that are consumed as the run goes (noise, VAE sampling) are saved with the training
//! state; the others are rebuilt from the seed and their key (epoch, dataset, sample slot,
//! parameter name and step), so resuming needs nothing else.

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};

use crate::pyrandom::PyRandom;

/// The purposes of the keyed stream (part of its key: distinct purposes never share numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Purpose {
    BucketShuffle = 1,
    BatchOrder = 2,
    Sample = 3,
}

/// A keyed ChaCha20 stream: (seed, purpose, a, b) is its 32-byte key.
fn keyed(seed: u64, purpose: Purpose, a: u64, b: u64) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(purpose as u64).to_le_bytes());
    key[16..24].copy_from_slice(&a.to_le_bytes());
    key[24..].copy_from_slice(&b.to_le_bytes());
    ChaCha20Rng::from_seed(key)
}

/// The splitmix64 finaliser: spreads every input bit over the output.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over `bytes`, starting from `basis`.
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The random streams of a run seeded with `seed` (`--seed`; `--validation_seed` for the
/// validation streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streams {
    seed: u64,
}

impl Streams {
    pub fn new(seed: u64) -> Self {
        Streams { seed }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The shuffle of the images in each bucket of `dataset` in `epoch` (1-based).
    pub fn bucket_shuffle(&self, epoch: u64, dataset: usize) -> ChaCha20Rng {
        keyed(self.seed, Purpose::BucketShuffle, epoch, dataset as u64)
    }

    /// The order of all batches of `epoch` (kohya's DataLoader shuffle).
    pub fn batch_order(&self, epoch: u64) -> ChaCha20Rng {
        keyed(self.seed, Purpose::BatchOrder, epoch, 0)
    }

    /// Augmentation (flip, crop, colour) and caption randomness (shuffle, dropout) of the sample in
    /// `slot` of `epoch`.
    pub fn sample(&self, epoch: u64, slot: u64) -> ChaCha20Rng {
        keyed(self.seed, Purpose::Sample, epoch, slot)
    }

    /// The training noise and timesteps, drawn in kohya's order (the bench also draws its
    /// synthetic latents from it first). Saved with the state.
    pub fn noise(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed)
    }

    /// Sampling of the VAE's latent distribution when latents are not cached. Saved with the
    /// state.
    pub fn vae_sampling(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed ^ 0x5641_4500)
    }

    /// The VAE sample of a cached latent: keyed by the image's path, so the latent does not depend
    /// on the order images are cached in.
    pub fn cached_latent(&self, image: &Path) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(fnv1a(image.to_string_lossy().as_bytes(), self.seed))
    }

    /// The fixed noise and timesteps of the validation loss.
    pub fn validation(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed ^ 0x5641_4c49_4441_5445)
    }

    /// The held-out split of a subset (`validation_split`): Python's `random` as kohya seeds it,
    /// so the same images are held out.
    pub(crate) fn validation_split(&self) -> PyRandom {
        PyRandom::new(self.seed)
    }

    /// The sampler seed of sample prompt `index` when the prompt gives no `--d`: fixed by the
    /// run's seed and the index, so a prompt gives comparable images at every step.
    pub fn prompt_seed(&self, index: usize) -> u64 {
        splitmix64(self.seed.wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            & 0xFFFF_FFFF
    }

    /// Stochastic rounding of bf16 weights (`--full_bf16`) for parameter `name` at its `step`-th
    /// update: independent of the order parameters are updated in.
    pub fn rounding(&self, name: &str, step: u64) -> ChaCha8Rng {
        let h = fnv1a(name.as_bytes(), 0xcbf2_9ce4_8422_2325);
        ChaCha8Rng::seed_from_u64(splitmix64(splitmix64(self.seed ^ h) ^ step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn keyed_streams_differ_by_every_field() {
        let a = keyed(1, Purpose::BatchOrder, 3, 4).next_u64();
        assert_ne!(a, keyed(0, Purpose::BatchOrder, 3, 4).next_u64());
        assert_ne!(a, keyed(1, Purpose::Sample, 3, 4).next_u64());
        assert_ne!(a, keyed(1, Purpose::BatchOrder, 0, 4).next_u64());
        assert_ne!(a, keyed(1, Purpose::BatchOrder, 3, 0).next_u64());
        assert_eq!(a, keyed(1, Purpose::BatchOrder, 3, 4).next_u64());
    }

    /// The derivations are part of every trained model: pin the first draw of each stream, so a
    /// change to one fails here rather than as a silent change of the weights.
    #[test]
    fn derivations_are_pinned() {
        let s = Streams::new(42);
        let first = [
            s.bucket_shuffle(1, 0).next_u64(),
            s.batch_order(1).next_u64(),
            s.sample(1, 0).next_u64(),
            s.noise().next_u64(),
            s.vae_sampling().next_u64(),
            s.cached_latent(Path::new("a/b.png")).next_u64(),
            s.validation().next_u64(),
            s.rounding("w", 1).next_u64(),
            s.prompt_seed(0),
        ];
        let want: [u64; 9] = [
            12966854929109036729,
            13869361491828584405,
            8479474679761387768,
            12578764544318200737,
            15663983695233621577,
            3752866755287939105,
            121558080085156757,
            8597476041609964266,
            803958421,
        ];
        assert_eq!(first, want);
    }
}
