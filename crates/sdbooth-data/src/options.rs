//! Command-line fallbacks of kohya's dataset (train_util.add_dataset_arguments and the few training
//! flags the dataset reads). A value set in the dataset TOML wins over these; these win over the
//! defaults, which are kohya's.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Everything the CLI hands to the data path. Field names are kohya's flag names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetOptions {
    /// `--train_data_dir` (legacy `<repeats>_<class tokens>` folders).
    pub train_data_dir: Option<String>,
    /// `--reg_data_dir`.
    pub reg_data_dir: Option<String>,
    /// `--resolution`: "512" or "768,512" (width,height).
    pub resolution: Option<String>,
    pub train_batch_size: u32,
    pub enable_bucket: bool,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    pub bucket_no_upscale: bool,
    pub caption_extension: String,
    /// kohya's misspelt alias, kept for old command lines; wins over caption_extension when set.
    pub caption_extention: Option<String>,
    pub shuffle_caption: bool,
    pub keep_tokens: u32,
    /// kohya's command-line default is "" (= off).
    pub keep_tokens_separator: String,
    pub caption_separator: String,
    pub secondary_separator: Option<String>,
    pub enable_wildcard: bool,
    pub caption_prefix: Option<String>,
    pub caption_suffix: Option<String>,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: u32,
    pub caption_tag_dropout_rate: f64,
    pub color_aug: bool,
    pub flip_aug: bool,
    pub random_crop: bool,
    /// `--face_crop_aug_range` "2.0,4.0".
    pub face_crop_aug_range: Option<String>,
    pub token_warmup_min: u32,
    pub token_warmup_step: f64,
    pub weighted_captions: bool,
    pub alpha_mask: bool,
    pub resize_interpolation: Option<String>,
    pub prior_loss_weight: f64,
    pub max_token_length: Option<u32>,
    pub debug_dataset: bool,
    pub cache_info: bool,
    pub seed: Option<u64>,
    /// sdbooth: keep kohya's behaviour of ignoring EXIF orientation.
    pub ignore_exif_orientation: bool,
    /// sdbooth: train without the files the upfront check rejects instead of aborting.
    pub skip_bad_images: bool,
    /// Dataset TOML key only in train_db (train_network has the flag); kept here for the fallback chain.
    pub validation_split: f64,
    pub validation_seed: Option<u64>,
    pub max_train_steps: u64,
    pub max_train_epochs: Option<u64>,
    pub gradient_accumulation_steps: u64,
    pub cache_latents: bool,
    pub cache_latents_to_disk: bool,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            train_data_dir: None,
            reg_data_dir: None,
            resolution: None,
            train_batch_size: 1,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            caption_extension: ".caption".into(),
            caption_extention: None,
            shuffle_caption: false,
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            caption_separator: ",".into(),
            secondary_separator: None,
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            color_aug: false,
            flip_aug: false,
            random_crop: false,
            face_crop_aug_range: None,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            weighted_captions: false,
            alpha_mask: false,
            resize_interpolation: None,
            prior_loss_weight: 1.0,
            max_token_length: None,
            debug_dataset: false,
            cache_info: false,
            seed: None,
            ignore_exif_orientation: false,
            skip_bad_images: false,
            validation_split: 0.0,
            validation_seed: None,
            max_train_steps: 1600,
            max_train_epochs: None,
            gradient_accumulation_steps: 1,
            cache_latents: false,
            cache_latents_to_disk: false,
        }
    }
}

/// kohya's `--resize_interpolation` choices (cv2 names and aliases; "box" is accepted by its helper).
pub const RESIZE_INTERPOLATIONS: &[&str] =
    &["lanczos", "lanczos4", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"];

/// Parses "512" or "768,512" into (width, height), as kohya's prepare_dataset_args does.
pub fn parse_resolution(s: &str) -> Result<(u32, u32)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let nums: std::result::Result<Vec<u32>, _> = parts.iter().map(|p| p.parse::<u32>()).collect();
    let bad = || DataError::InvalidOption {
        key: "--resolution".into(),
        message: format!("must be 'size' or 'width,height' with positive integers, got {s:?}"),
    };
    match nums.map_err(|_| bad())?.as_slice() {
        [r] if *r > 0 => Ok((*r, *r)),
        [w, h] if *w > 0 && *h > 0 => Ok((*w, *h)),
        _ => Err(bad()),
    }
}

/// Parses "2.0,4.0"; kohya requires two floats with lower <= upper.
pub fn parse_face_crop_aug_range(s: &str) -> Result<(f64, f64)> {
    let bad = || DataError::InvalidOption {
        key: "--face_crop_aug_range".into(),
        message: format!("must be two floats 'lower,upper' with lower <= upper, got {s:?}"),
    };
    let nums: Vec<f64> =
        s.split(',').map(|p| p.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|_| bad())?;
    match nums.as_slice() {
        [a, b] if a <= b && *a > 0.0 => Ok((*a, *b)),
        _ => Err(bad()),
    }
}

pub fn check_resize_interpolation(key: &str, v: &str) -> Result<()> {
    if RESIZE_INTERPOLATIONS.contains(&v) {
        Ok(())
    } else {
        Err(DataError::InvalidOption {
            key: key.into(),
            message: format!("{v:?} is not one of {}", RESIZE_INTERPOLATIONS.join(", ")),
        })
    }
}

impl DatasetOptions {
    /// The caption extension after kohya's backward-compatible alias is applied.
    pub fn effective_caption_extension(&self) -> &str {
        self.caption_extention.as_deref().unwrap_or(&self.caption_extension)
    }

    /// Checks the values that kohya parses or asserts before building datasets, and refuses the
    /// features this crate has not implemented.
    pub fn validate(&self) -> Result<()> {
        if let Some(r) = &self.resolution {
            parse_resolution(r)?;
        }
        if let Some(r) = &self.face_crop_aug_range {
            parse_face_crop_aug_range(r)?;
        }
        if let Some(i) = &self.resize_interpolation {
            check_resize_interpolation("--resize_interpolation", i)?;
        }
        if let Some(m) = self.max_token_length {
            if m != 150 && m != 225 {
                return Err(DataError::InvalidOption {
                    key: "--max_token_length".into(),
                    message: format!("must be 150 or 225 (or unset for 75), got {m}"),
                });
            }
        }
        if self.train_batch_size == 0 {
            return Err(DataError::InvalidOption {
                key: "--train_batch_size".into(),
                message: "must be at least 1".into(),
            });
        }
        if self.gradient_accumulation_steps == 0 {
            return Err(DataError::InvalidOption {
                key: "--gradient_accumulation_steps".into(),
                message: "must be at least 1".into(),
            });
        }
        // Sizes the bucket arithmetic divides by: 0 would panic there (kohya's TOML schema and our
        // TOML path require >= 1 as well).
        for (key, v) in [
            ("--min_bucket_reso", self.min_bucket_reso),
            ("--max_bucket_reso", self.max_bucket_reso),
            ("--bucket_reso_steps", self.bucket_reso_steps),
        ] {
            if v == 0 {
                return Err(DataError::InvalidOption {
                    key: key.into(),
                    message: "must be at least 1".into(),
                });
            }
        }
        for (key, v) in [
            ("--caption_dropout_rate", self.caption_dropout_rate),
            ("--caption_tag_dropout_rate", self.caption_tag_dropout_rate),
            ("--validation_split", self.validation_split),
        ] {
            if let Some(message) = rate_problem(v) {
                return Err(DataError::InvalidOption { key: key.into(), message });
            }
        }
        for (key, v) in
            [("--token_warmup_step", self.token_warmup_step), ("--prior_loss_weight", self.prior_loss_weight)]
        {
            if let Some(message) = non_negative_problem(v) {
                return Err(DataError::InvalidOption { key: key.into(), message });
            }
        }
        if self.cache_info {
            return Err(DataError::Unsupported { what: "--cache_info".into() });
        }
        Ok(())
    }
}

/// The one check of a rate (caption dropout rates, validation_split), shared by the TOML keys and
/// the command-line flags: None when `v` is within [0, 1], else what is wrong with it.
pub(crate) fn rate_problem(v: f64) -> Option<String> {
    // NaN fails `contains` too.
    (!(0.0..=1.0).contains(&v)).then(|| format!("must be between 0.0 and 1.0, got {v}"))
}

/// None when `v` is a finite number >= 0, else what is wrong with it.
pub fn non_negative_problem(v: f64) -> Option<String> {
    (!(v.is_finite() && v >= 0.0)).then(|| format!("must be a finite number >= 0, got {v}"))
}
