//! Epoch order and step counting. kohya shuffles each bucket per epoch with Python's `random`
//! seeded by seed + epoch, cuts batches, and the DataLoader shuffles the batches of all
//! datasets. We do the same with the keyed streams of `rng` (bucket shuffle, batch order), so any
//! epoch's order can be rebuilt from the seed alone and resume only needs (epoch, batch index).

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::dataset::DatasetGroup;
use crate::rng::Streams;

/// One batch: images of one bucket of one dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRef {
    pub dataset: usize,
    pub bucket: usize,
    /// Indices into `datasets[dataset].images`.
    pub images: Vec<usize>,
}

impl DatasetGroup {
    /// The batches of `epoch` (1-based, as kohya's) in training order.
    pub fn epoch_batches(&self, seed: u64, epoch: u64) -> Vec<BatchRef> {
        let streams = Streams::new(seed);
        let mut out = Vec::new();
        for (di, ds) in self.datasets.iter().enumerate() {
            let mut rng = streams.bucket_shuffle(epoch, di);
            let bs = ds.spec.batch_size.max(1);
            for (bi, b) in ds.buckets.iter().enumerate() {
                let mut items = b.items.clone();
                items.shuffle(&mut rng);
                for chunk in items.chunks(bs) {
                    out.push(BatchRef { dataset: di, bucket: bi, images: chunk.to_vec() });
                }
            }
        }
        let mut rng = streams.batch_order(epoch);
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

/// Iterates batches epoch after epoch. Saved (with the training state) as its [`SamplerState`];
/// a sampler read back rebuilds its epoch's order from the seed when it is next asked for a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "SamplerState", into = "SamplerState")]
pub struct Sampler {
    state: SamplerState,
    /// The batches of `state.epoch`, built on first use.
    current: Option<Vec<BatchRef>>,
}

impl From<SamplerState> for Sampler {
    fn from(state: SamplerState) -> Self {
        Sampler { state: SamplerState { epoch: state.epoch.max(1), ..state }, current: None }
    }
}

impl From<Sampler> for SamplerState {
    fn from(sampler: Sampler) -> Self {
        sampler.state
    }
}

impl Sampler {
    pub fn new(group: &DatasetGroup, seed: u64) -> Self {
        Self::resume(group, SamplerState { seed, epoch: 1, next_batch: 0 })
    }

    pub fn resume(group: &DatasetGroup, state: SamplerState) -> Self {
        let mut sampler = Sampler::from(state);
        sampler.current = Some(group.epoch_batches(state.seed, sampler.state.epoch));
        sampler
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// The next batch with its (epoch, index in epoch). Moves to the next epoch after the last.
    pub fn next_batch(&mut self, group: &DatasetGroup) -> Option<(u64, usize, BatchRef)> {
        let state = &mut self.state;
        let current = self.current.get_or_insert_with(|| group.epoch_batches(state.seed, state.epoch));
        if state.next_batch >= current.len() {
            if current.is_empty() {
                return None;
            }
            state.epoch += 1;
            state.next_batch = 0;
            *current = group.epoch_batches(state.seed, state.epoch);
        }
        let i = state.next_batch;
        let b = current.get(i)?.clone();
        state.next_batch += 1;
        Some((state.epoch, i, b))
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
}
