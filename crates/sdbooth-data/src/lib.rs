//! The CPU-side data path of DreamBooth training, with kohya's semantics: dataset TOML and legacy
//! folders, captions, the CLIP tokenizer, image checks, buckets, augmentation and batches.

pub mod bucket;
pub mod caption;
pub mod config;
pub mod dataset;
pub mod error;
pub mod load;
pub mod options;
mod pyrandom;
pub mod report;
mod resize;
pub mod rng;
pub mod sampler;
mod scan;
pub mod tokenizer;
pub mod validate;

pub use bucket::{BucketChoice, BucketManager, Reso};
pub use caption::{process_caption, CaptionContext};
pub use config::{
    legacy_dataset_config, load_dataset_config, CaptionOptions, DatasetGroupSpec, DatasetSpec, SubsetSpec,
};
pub use dataset::{build_dataset_group, Bucket, Dataset, DatasetGroup, ImageEntry, SubsetInfo};
pub use error::{BadFile, BadFiles, DataError};
pub use load::{load_batch, load_sample, Batch, Sample, SampleContext};
pub use options::DatasetOptions;
pub use report::{DryRunReport, ImageReport};
pub use rng::Streams;
pub use sampler::{step_plan, BatchRef, Sampler, SamplerState, StepPlan};
pub use scan::IMAGE_EXTENSIONS;

/// Resolves the dataset from either `--dataset_config` or the legacy folders, then scans and
/// buckets it: what `train` and `train --dry_run` call first. `cwd` is where relative
/// `image_dir` paths are looked up (kohya: the working directory).
pub fn prepare_datasets(
    dataset_config: Option<&std::path::Path>,
    opts: &DatasetOptions,
    cwd: &std::path::Path,
) -> Result<DatasetGroup, DataError> {
    let spec = match dataset_config {
        Some(p) => {
            let mut spec = load_dataset_config(p, opts, cwd)?;
            if opts.train_data_dir.is_some() || opts.reg_data_dir.is_some() {
                spec.notes.push(
                    "--train_data_dir/--reg_data_dir are ignored because --dataset_config is given (as kohya)".into(),
                );
            }
            spec
        }
        None => legacy_dataset_config(opts, cwd)?,
    };
    build_dataset_group(spec, opts)
}
