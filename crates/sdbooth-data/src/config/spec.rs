//! Resolved dataset parameters: what kohya's blueprint holds after the fallback chain.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Caption processing parameters of one subset (kohya's BaseSubset caption fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionOptions {
    pub shuffle_caption: bool,
    pub caption_separator: String,
    pub keep_tokens: usize,
    /// None when unset or empty (kohya treats "" as off).
    pub keep_tokens_separator: Option<String>,
    pub secondary_separator: Option<String>,
    pub enable_wildcard: bool,
    pub caption_prefix: Option<String>,
    pub caption_suffix: Option<String>,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: u32,
    pub caption_tag_dropout_rate: f64,
    pub token_warmup_min: u32,
    /// N steps, or N * max_train_steps when N < 1.
    pub token_warmup_step: f64,
    /// `--weighted_captions` (a training flag; carried here so caption code can see it).
    pub weighted_captions: bool,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        Self {
            shuffle_caption: false,
            caption_separator: ",".into(),
            keep_tokens: 0,
            keep_tokens_separator: None,
            secondary_separator: None,
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            weighted_captions: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubsetSpec {
    /// Resolved folder (working directory first, then beside the TOML).
    pub image_dir: PathBuf,
    /// kohya ignores a subset with num_repeats < 1 (with a warning).
    pub num_repeats: i64,
    pub is_reg: bool,
    pub class_tokens: Option<String>,
    /// Always starts with '.' (kohya adds it), or is empty.
    pub caption_extension: String,
    pub caption: CaptionOptions,
    pub color_aug: bool,
    pub flip_aug: bool,
    pub random_crop: bool,
    pub face_crop_aug_range: Option<(f64, f64)>,
    pub alpha_mask: bool,
    /// The subset's own value, else the dataset's, else the command line's.
    pub resize_interpolation: Option<String>,
    pub custom_attributes: serde_json::Value,
}

/// The pixel block of Stable Diffusion's VAE (its downscale factor): images it encodes are
/// multiples of it.
const VAE_BLOCK: u32 = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// (width, height)
    pub resolution: (u32, u32),
    pub batch_size: usize,
    pub enable_bucket: bool,
    /// Adjusted to multiples of bucket_reso_steps as kohya does.
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    /// Only true when enable_bucket is (kohya forces it off otherwise).
    pub bucket_no_upscale: bool,
    pub prior_loss_weight: f64,
    pub validation_split: f64,
    pub validation_seed: Option<u64>,
    pub resize_interpolation: Option<String>,
    pub network_multiplier: f64,
    pub subsets: Vec<SubsetSpec>,
    /// Warnings made while resolving (adjusted bucket sizes).
    pub notes: Vec<String>,
}

impl DatasetSpec {
    /// The image sizes the VAE can encode, then kohya's adjust_min_max_bucket_reso_by_steps and
    /// verify_bucket_reso_steps(64). `blame`
    /// builds the error for a key where its value came from (TOML line or command-line flag).
    pub(crate) fn check_buckets(&mut self, blame: impl Fn(&str, String) -> DataError) -> Result<()> {
        let err = |key: &str, message: String| blame(key, message);
        if let Some(message) = crate::options::rate_problem(self.validation_split) {
            // kohya warns and skips the split; we refuse, since the user asked for something.
            return Err(err("validation_split", message));
        }
        if !self.enable_bucket {
            // Every image is cropped to `resolution`, and Stable Diffusion's VAE works on
            // blocks of VAE_BLOCK pixels (sdbooth_models::vae::check_image_size): refused here,
            // before the model is loaded, not at the first step. (Buckets are multiples of
            // bucket_reso_steps, itself a multiple of 64.)
            let (w, h) = self.resolution;
            if !w.is_multiple_of(VAE_BLOCK) || !h.is_multiple_of(VAE_BLOCK) {
                return Err(err(
                    "resolution",
                    format!(
                        "{w}x{h} must be a multiple of {VAE_BLOCK} without buckets (the VAE works \
                         on {VAE_BLOCK}x{VAE_BLOCK} pixel blocks); round it, or enable_bucket"
                    ),
                ));
            }
            return Ok(());
        }
        let steps = self.bucket_reso_steps;
        if !steps.is_multiple_of(64) {
            return Err(err(
                "bucket_reso_steps",
                format!(
                    "is {steps}; it must be divisible by 64 for Stable Diffusion (kohya checks the same)"
                ),
            ));
        }
        if self.min_bucket_reso < steps {
            // kohya rounds it down to 0 and then divides by it (ZeroDivisionError); found by
            // fuzz/dataset_config.
            return Err(err(
                "min_bucket_reso",
                format!(
                    "{} is below bucket_reso_steps {steps}; it must be at least {steps}",
                    self.min_bucket_reso
                ),
            ));
        }
        if !self.min_bucket_reso.is_multiple_of(steps) {
            let adj = self.min_bucket_reso - self.min_bucket_reso % steps;
            self.notes.push(format!(
                "min_bucket_reso is adjusted to be a multiple of bucket_reso_steps: {} -> {adj}",
                self.min_bucket_reso
            ));
            self.min_bucket_reso = adj;
        }
        if !self.max_bucket_reso.is_multiple_of(steps) {
            let adj = self.max_bucket_reso + steps - self.max_bucket_reso % steps;
            self.notes.push(format!(
                "max_bucket_reso is adjusted to be a multiple of bucket_reso_steps: {} -> {adj}",
                self.max_bucket_reso
            ));
            self.max_bucket_reso = adj;
        }
        let (w, h) = self.resolution;
        if w.min(h) < self.min_bucket_reso {
            return Err(err(
                "min_bucket_reso",
                format!("{} must be <= the smaller side of resolution {w}x{h}", self.min_bucket_reso),
            ));
        }
        if w.max(h) > self.max_bucket_reso {
            return Err(err(
                "max_bucket_reso",
                format!("{} must be >= the larger side of resolution {w}x{h}", self.max_bucket_reso),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetGroupSpec {
    pub datasets: Vec<DatasetSpec>,
    /// Things the user should know (image_dir found beside the TOML, skipped legacy folders, ...).
    pub notes: Vec<String>,
    pub config_file: Option<PathBuf>,
}
