//! What `train --dry_run` prints (the dataset part of what kohya prints before training) and
//! writes with `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::bucket::Reso;
use crate::dataset::DatasetGroup;
use crate::error::BadFile;
use crate::options::DatasetOptions;
use crate::sampler::{step_plan, StepPlan};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubsetReport {
    pub image_dir: PathBuf,
    pub image_count: usize,
    pub num_repeats: i64,
    pub is_reg: bool,
    pub class_tokens: Option<String>,
    pub caption_extension: String,
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    pub flip_aug: bool,
    pub color_aug: bool,
    pub random_crop: bool,
    pub alpha_mask: bool,
    pub ignored: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketReport {
    /// kohya's bucket number (index among the sorted buckets in use).
    pub index: usize,
    pub resolution: Reso,
    /// Images including repeats.
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageReport {
    pub path: PathBuf,
    pub subset: usize,
    pub is_reg: bool,
    pub size: Reso,
    pub bucket: Reso,
    pub resized_size: Reso,
    pub num_repeats: u32,
    pub caption: String,
    pub orientation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegBalance {
    /// Reg images × repeats found (kohya's "reg images with repeats").
    pub found_with_repeats: u64,
    /// Reg images the balancing loop registered, and their repeats after it.
    pub registered_images: usize,
    pub used_with_repeats: u64,
    /// Reg images never used because the train count was reached first.
    pub unused_images: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetReport {
    pub batch_size: usize,
    pub resolution: Reso,
    pub enable_bucket: bool,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    pub bucket_no_upscale: bool,
    pub subsets: Vec<SubsetReport>,
    pub num_train_images: u64,
    pub reg: RegBalance,
    pub buckets: Vec<BucketReport>,
    pub mean_ar_error: f64,
    pub batches_per_epoch: usize,
    pub images: Vec<ImageReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRunReport {
    pub datasets: Vec<DatasetReport>,
    pub num_train_images: u64,
    pub num_reg_images: u64,
    pub batches_per_epoch: u64,
    pub steps: StepPlan,
    pub notes: Vec<String>,
    pub skipped: Vec<BadFile>,
    pub image_warnings: Vec<BadFile>,
    pub rotated: Vec<(PathBuf, String)>,
    pub ignore_exif_orientation: bool,
}

impl DryRunReport {
    pub fn new(group: &DatasetGroup, opts: &DatasetOptions) -> Self {
        let datasets = group
            .datasets
            .iter()
            .map(|d| {
                let reg_found: usize = d.subsets.iter().filter(|s| s.spec.is_reg).map(|s| s.img_count).sum();
                let reg_imgs: Vec<_> = d.images.iter().filter(|i| i.is_reg).collect();
                DatasetReport {
                    batch_size: d.spec.batch_size,
                    resolution: d.spec.resolution,
                    enable_bucket: d.spec.enable_bucket,
                    min_bucket_reso: d.spec.min_bucket_reso,
                    max_bucket_reso: d.spec.max_bucket_reso,
                    bucket_reso_steps: d.spec.bucket_reso_steps,
                    bucket_no_upscale: d.spec.bucket_no_upscale,
                    subsets: d
                        .subsets
                        .iter()
                        .map(|s| SubsetReport {
                            image_dir: s.spec.image_dir.clone(),
                            image_count: s.img_count,
                            num_repeats: s.spec.num_repeats,
                            is_reg: s.spec.is_reg,
                            class_tokens: s.spec.class_tokens.clone(),
                            caption_extension: s.spec.caption_extension.clone(),
                            shuffle_caption: s.spec.caption.shuffle_caption,
                            keep_tokens: s.spec.caption.keep_tokens,
                            flip_aug: s.spec.flip_aug,
                            color_aug: s.spec.color_aug,
                            random_crop: s.spec.random_crop,
                            alpha_mask: s.spec.alpha_mask,
                            ignored: s.ignored.clone(),
                        })
                        .collect(),
                    num_train_images: d.num_train_images,
                    reg: RegBalance {
                        found_with_repeats: d.num_reg_images,
                        registered_images: reg_imgs.len(),
                        used_with_repeats: reg_imgs.iter().map(|i| i.num_repeats as u64).sum(),
                        unused_images: reg_found.saturating_sub(reg_imgs.len()),
                    },
                    buckets: d
                        .buckets
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| !b.items.is_empty())
                        .map(|(index, b)| BucketReport { index, resolution: b.reso, count: b.items.len() })
                        .collect(),
                    mean_ar_error: d.mean_ar_error,
                    batches_per_epoch: d.batches_per_epoch(),
                    images: d
                        .images
                        .iter()
                        .map(|i| ImageReport {
                            path: i.path.clone(),
                            subset: i.subset,
                            is_reg: i.is_reg,
                            size: i.size,
                            bucket: i.bucket,
                            resized_size: i.resized_size,
                            num_repeats: i.num_repeats,
                            caption: i.caption.clone(),
                            orientation: i.orientation.clone(),
                        })
                        .collect(),
                }
            })
            .collect();
        let bpe = group.batches_per_epoch() as u64;
        DryRunReport {
            datasets,
            num_train_images: group.num_train_images(),
            num_reg_images: group.num_reg_images(),
            batches_per_epoch: bpe,
            steps: step_plan(
                bpe,
                opts.gradient_accumulation_steps,
                opts.max_train_steps,
                opts.max_train_epochs,
                1,
            ),
            notes: group.notes.clone(),
            skipped: group.skipped.clone(),
            image_warnings: group.image_warnings.clone(),
            rotated: group.rotated.clone(),
            ignore_exif_orientation: group.ignore_exif_orientation,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Text laid out like kohya's log before training.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for w in &self.image_warnings {
            let _ = writeln!(s, "warning: {}: {}", w.path.display(), w.cause);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "skipped {} bad file(s) (--skip_bad_images):", self.skipped.len());
            for b in &self.skipped {
                let _ = writeln!(s, "  {}: {}", b.path.display(), b.cause);
            }
        }
        if !self.rotated.is_empty() {
            let _ = writeln!(
                s,
                "EXIF orientation applied to {} image(s) (kohya ignores it; --ignore_exif_orientation to do the same):",
                self.rotated.len()
            );
            for (p, o) in &self.rotated {
                let _ = writeln!(s, "  {}: {o}", p.display());
            }
        }
        for (i, d) in self.datasets.iter().enumerate() {
            let _ = writeln!(s, "[Dataset {i}]");
            let _ = writeln!(s, "  batch_size: {}", d.batch_size);
            let _ = writeln!(s, "  resolution: ({}, {})", d.resolution.0, d.resolution.1);
            let _ = writeln!(s, "  enable_bucket: {}", d.enable_bucket);
            if d.enable_bucket {
                let _ = writeln!(s, "    min_bucket_reso: {}", d.min_bucket_reso);
                let _ = writeln!(s, "    max_bucket_reso: {}", d.max_bucket_reso);
                let _ = writeln!(s, "    bucket_reso_steps: {}", d.bucket_reso_steps);
                let _ = writeln!(s, "    bucket_no_upscale: {}", d.bucket_no_upscale);
            }
            for (j, ss) in d.subsets.iter().enumerate() {
                let _ = writeln!(s, "  [Subset {j} of Dataset {i}]");
                let _ = writeln!(s, "    image_dir: \"{}\"", ss.image_dir.display());
                let _ = writeln!(s, "    image_count: {}", ss.image_count);
                let _ = writeln!(s, "    num_repeats: {}", ss.num_repeats);
                let _ = writeln!(s, "    is_reg: {}", ss.is_reg);
                let _ = writeln!(s, "    class_tokens: {}", ss.class_tokens.as_deref().unwrap_or("None"));
                let _ = writeln!(s, "    caption_extension: {}", ss.caption_extension);
                let _ = writeln!(
                    s,
                    "    shuffle_caption: {}, keep_tokens: {}",
                    ss.shuffle_caption, ss.keep_tokens
                );
                let _ = writeln!(
                    s,
                    "    flip_aug: {}, color_aug: {}, random_crop: {}, alpha_mask: {}",
                    ss.flip_aug, ss.color_aug, ss.random_crop, ss.alpha_mask
                );
                if let Some(why) = &ss.ignored {
                    let _ = writeln!(s, "    IGNORED: {why}");
                }
            }
            let _ = writeln!(s, "  {} train images with repeats.", d.num_train_images);
            let _ = writeln!(s, "  {} reg images with repeats.", d.reg.found_with_repeats);
            if d.reg.found_with_repeats > 0 {
                let _ = writeln!(
                    s,
                    "  reg balancing: {} reg image(s) used, {} with repeats (to match {} train); {} unused",
                    d.reg.registered_images, d.reg.used_with_repeats, d.num_train_images, d.reg.unused_images
                );
            }
            let _ = writeln!(s, "  number of images (including repeats) per bucket:");
            for b in &d.buckets {
                let _ = writeln!(
                    s,
                    "    bucket {}: resolution ({}, {}), count: {}",
                    b.index, b.resolution.0, b.resolution.1, b.count
                );
            }
            if d.enable_bucket {
                let _ = writeln!(s, "  mean ar error (without repeats): {}", d.mean_ar_error);
            }
            let _ = writeln!(s, "  batches per epoch: {}", d.batches_per_epoch);
        }
        let _ = writeln!(s, "num train images * repeats: {}", self.num_train_images);
        let _ = writeln!(s, "num reg images: {}", self.num_reg_images);
        let _ = writeln!(s, "num batches per epoch: {}", self.batches_per_epoch);
        let _ = writeln!(s, "num epochs: {}", self.steps.num_epochs);
        let _ = writeln!(s, "total optimization steps: {}", self.steps.max_train_steps);
        s
    }
}
