//! Any bytes as a dataset TOML, resolved with fuzzed command-line fallbacks (the dataset flags:
//! bucket sizes including 0, rates out of range or NaN, batch size, resolution), then scanned,
//! checked and bucketed as `train` does, and described by the dry-run report: Ok or Err, never a
//! panic, an abort or an unbounded allocation.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use sdbooth_data::{prepare_datasets, DatasetOptions, DryRunReport};

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch();
    let mut k = common::Knobs { bytes: data };
    let mut opts = DatasetOptions {
        enable_bucket: k.bool(),
        bucket_no_upscale: k.bool(),
        min_bucket_reso: k.size(),
        max_bucket_reso: k.size() * 4,
        bucket_reso_steps: k.size(),
        caption_dropout_rate: k.rate(),
        caption_tag_dropout_rate: k.rate(),
        validation_split: k.rate(),
        train_batch_size: k.u8() as u32,
        shuffle_caption: k.bool(),
        keep_tokens: k.u8() as u32 % 8,
        skip_bad_images: k.bool(),
        ..Default::default()
    };
    if k.bool() {
        opts.resolution = Some(format!("{}", k.size()));
    }
    let toml = dir.join(format!("d{}.toml", std::process::id()));
    if std::fs::write(&toml, k.rest()).is_err() {
        return;
    }
    if let Ok(group) = prepare_datasets(Some(&toml), &opts, dir) {
        let report = DryRunReport::new(&group, &opts);
        let _ = report.to_text();
        let _ = report.to_json();
        let _ = group.batches_per_epoch();
    }
});
