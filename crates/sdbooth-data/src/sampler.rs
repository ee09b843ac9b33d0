//! Epoch order and step counting. kohya shuffles each bucket per epoch with Python's `random`
//! seeded by seed + epoch, cuts batches, and the DataLoader shuffles the batches of all
//! datasets. We do the same with ChaCha streams named by (seed, purpose, epoch), so any epoch's
//! order can be rebuilt from the seed alone and resume only needs (epoch, batch index).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::DatasetGroup;

/// One batch: images of one bucket of one dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRef {
    pub dataset: usize,
    pub bucket: usize,
    /// Indices into `datasets[dataset].images`.
    pub images: Vec<usize>,
}

/// A named, seeded random stream. Distinct purposes never share numbers.
pub fn stream(seed: u64, purpose: u64, a: u64, b: u64) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&purpose.to_le_bytes());
    key[16..24].copy_from_slice(&a.to_le_bytes());
    key[24..].copy_from_slice(&b.to_le_bytes());
    ChaCha20Rng::from_seed(key)
}

pub(crate) const STREAM_BUCKET_SHUFFLE: u64 = 1;
pub(crate) const STREAM_BATCH_ORDER: u64 = 2;
pub(crate) const STREAM_SAMPLE: u64 = 3;

impl DatasetGroup {
    /// The batches of `epoch` (1-based, as kohya's) in training order.
    pub fn epoch_batches(&self, seed: u64, epoch: u64) -> Vec<BatchRef> {
        let mut out = Vec::new();
        for (di, ds) in self.datasets.iter().enumerate() {
            let mut rng = stream(seed, STREAM_BUCKET_SHUFFLE, epoch, di as u64);
            let bs = ds.spec.batch_size.max(1);
            for (bi, b) in ds.buckets.iter().enumerate() {
                let mut items = b.items.clone();
                items.shuffle(&mut rng);
                for chunk in items.chunks(bs) {
                    out.push(BatchRef { dataset: di, bucket: bi, images: chunk.to_vec() });
                }
            }
        }
        let mut rng = stream(seed, STREAM_BATCH_ORDER, epoch, 0);
        out.shuffle(&mut rng);
        out
    }
}

/// Where the sampler is; saved with the training state so resume continues exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    /// 1-based epoch of the next batch.
    pub epoch: u64,
    /// Index of the next batch within that epoch.
    pub next_batch: usize,
}

/// Iterates batches epoch after epoch.
#[derive(Debug, Clone)]
pub struct Sampler {
    state: SamplerState,
    current: Vec<BatchRef>,
}

impl Sampler {
    pub fn new(group: &DatasetGroup, seed: u64) -> Self {
        Self::resume(group, SamplerState { seed, epoch: 1, next_batch: 0 })
    }

    pub fn resume(group: &DatasetGroup, state: SamplerState) -> Self {
        let current = group.epoch_batches(state.seed, state.epoch.max(1));
        Self { state: SamplerState { epoch: state.epoch.max(1), ..state }, current }
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The next batch with its (epoch, index in epoch). Moves to the next epoch after the last.
    pub fn next_batch(&mut self, group: &DatasetGroup) -> Option<(u64, usize, BatchRef)> {
        if self.state.next_batch >= self.current.len() {
            if self.current.is_empty() {
                return None;
            }
            self.state.epoch += 1;
            self.state.next_batch = 0;
            self.current = group.epoch_batches(self.state.seed, self.state.epoch);
        }
        let i = self.state.next_batch;
        let b = self.current.get(i)?.clone();
        self.state.next_batch += 1;
        Some((self.state.epoch, i, b))
    }
}

/// Step counting as train_db.py does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    pub batches_per_epoch: u64,
    /// ceil(batches / gradient_accumulation_steps)
    pub updates_per_epoch: u64,
    /// --max_train_steps, or --max_train_epochs × updates per epoch.
    pub max_train_steps: u64,
    /// ceil(max_train_steps / updates_per_epoch)
    pub num_epochs: u64,
}

/// `num_processes` is 1 unless data-parallel training is on.
pub fn step_plan(
    batches_per_epoch: u64,
    gradient_accumulation_steps: u64,
    max_train_steps: u64,
    max_train_epochs: Option<u64>,
    num_processes: u64,
) -> StepPlan {
    let ga = gradient_accumulation_steps.max(1);
    let np = num_processes.max(1);
    let max_train_steps = match max_train_epochs {
        // math.ceil(len / num_processes / ga) with float division.
        Some(e) => e * (batches_per_epoch as f64 / np as f64 / ga as f64).ceil() as u64,
        None => max_train_steps,
    };
    let updates_per_epoch = batches_per_epoch.div_ceil(ga);
    let num_epochs = if updates_per_epoch == 0 { 0 } else { max_train_steps.div_ceil(updates_per_epoch) };
    StepPlan { batches_per_epoch, updates_per_epoch, max_train_steps, num_epochs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_plan_matches_train_db_arithmetic() {
        let p = step_plan(10, 3, 100, None, 1);
        assert_eq!((p.updates_per_epoch, p.max_train_steps, p.num_epochs), (4, 100, 25));
        let p = step_plan(10, 3, 1600, Some(5), 1);
        assert_eq!((p.max_train_steps, p.num_epochs), (20, 5));
    }

    #[test]
    fn streams_differ_by_every_field() {
        use rand::RngCore;
        let a = stream(1, 2, 3, 4).next_u64();
        assert_ne!(a, stream(0, 2, 3, 4).next_u64());
        assert_ne!(a, stream(1, 0, 3, 4).next_u64());
        assert_ne!(a, stream(1, 2, 0, 4).next_u64());
        assert_ne!(a, stream(1, 2, 3, 0).next_u64());
        assert_eq!(a, stream(1, 2, 3, 4).next_u64());
    }
}
