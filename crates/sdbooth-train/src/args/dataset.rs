//! Dataset flags: kohya's add_dataset_arguments plus sdbooth's image-check flags. They are the
//! command-line fallbacks of the dataset TOML (subset > dataset > general > flag > default).

use clap::Args;
use serde::{Deserialize, Serialize};

use super::types::RESIZE_INTERPOLATIONS;

#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[command(rename_all = "snake_case", next_help_heading = "Dataset")]
pub struct DatasetArgs {
    /// Dataset TOML ([general], [[datasets]], [[datasets.subsets]]).
    #[arg(long, value_name = "TOML")]
    pub dataset_config: Option<String>,
    /// Training images in <repeats>_<class tokens> folders (legacy layout).
    #[arg(long, value_name = "DIR")]
    pub train_data_dir: Option<String>,
    /// Regularization (class) images in <repeats>_<class tokens> folders (legacy layout).
    #[arg(long, value_name = "DIR")]
    pub reg_data_dir: Option<String>,
    /// Training resolution: SIZE or WIDTH,HEIGHT.
    #[arg(long, value_name = "SIZE|W,H")]
    pub resolution: Option<String>,
    /// Aspect-ratio bucketing.
    #[arg(long)]
    pub enable_bucket: bool,
    /// Smallest bucket side (a multiple of --bucket_reso_steps).
    #[arg(long, value_name = "PX", default_value_t = 256)]
    pub min_bucket_reso: u32,
    /// Largest bucket side (a multiple of --bucket_reso_steps).
    #[arg(long, value_name = "PX", default_value_t = 1024)]
    pub max_bucket_reso: u32,
    /// Bucket side step in pixels (64 for SD).
    #[arg(long, value_name = "PX", default_value_t = 64)]
    pub bucket_reso_steps: u32,
    /// One bucket per image size, never upscaling.
    #[arg(long)]
    pub bucket_no_upscale: bool,
    /// Resize filter (default: area for downscaling, as kohya).
    #[arg(long, value_name = "FILTER", value_parser = clap::builder::PossibleValuesParser::new(RESIZE_INTERPOLATIONS))]
    pub resize_interpolation: Option<String>,
    /// Caption file extension.
    #[arg(long, value_name = "EXT", default_value = ".caption")]
    pub caption_extension: String,
    /// Old spelling of --caption_extension (wins when given, as kohya).
    #[arg(long, value_name = "EXT")]
    pub caption_extention: Option<String>,
    /// Shuffle the comma-separated tags of each caption.
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Tag separator for shuffling and dropout.
    #[arg(long, value_name = "SEP", default_value = ",")]
    pub caption_separator: String,
    /// Keep the first N tags in place when shuffling.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_tokens: u32,
    /// Tags before this separator stay in place when shuffling (overrides --keep_tokens).
    #[arg(long, value_name = "SEP", default_value = "")]
    pub keep_tokens_separator: String,
    /// Second separator, turned into --caption_separator after shuffling and dropout.
    #[arg(long, value_name = "SEP")]
    pub secondary_separator: Option<String>,
    /// Wildcards in captions ({a|b|c}) and multi-line caption files.
    #[arg(long)]
    pub enable_wildcard: bool,
    /// Text put before every caption.
    #[arg(long, value_name = "TEXT")]
    pub caption_prefix: Option<String>,
    /// Text put after every caption.
    #[arg(long, value_name = "TEXT")]
    pub caption_suffix: Option<String>,
    /// Probability of training an image with an empty caption.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub caption_dropout_rate: f64,
    /// Empty captions for every image every N epochs.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub caption_dropout_every_n_epochs: u32,
    /// Probability of dropping each tag.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub caption_tag_dropout_rate: f64,
    /// Start with N tags per caption (token warmup).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub token_warmup_min: u32,
    /// Reach all tags at step N (N < 1: that ratio of --max_train_steps).
    #[arg(long, value_name = "N", default_value_t = 0.0)]
    pub token_warmup_step: f64,
    /// A1111 caption weights such as (word:1.2).
    #[arg(long)]
    pub weighted_captions: bool,
    /// Weak colour (hue) augmentation.
    #[arg(long)]
    pub color_aug: bool,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip_aug: bool,
    /// Random crop instead of a centre crop.
    #[arg(long)]
    pub random_crop: bool,
    /// Face-centred crop augmentation with this scale range, e.g. 2.0,4.0.
    #[arg(long, value_name = "LO,HI")]
    pub face_crop_aug_range: Option<String>,
    /// Take a loss mask from each image's alpha channel.
    #[arg(long)]
    pub alpha_mask: bool,
    /// Folder of mask images for --masked_loss.
    #[arg(long, value_name = "DIR")]
    pub conditioning_data_dir: Option<String>,
    /// Cache image sizes and captions in the dataset folder.
    #[arg(long)]
    pub cache_info: bool,
    /// A Python dataset class (package.module.Class).
    #[arg(long, value_name = "CLASS")]
    pub dataset_class: Option<String>,
    /// Fraction of images held out for validation.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    pub validation_split: f64,
    /// Seed of the validation split (default: --seed).
    #[arg(long, value_name = "SEED")]
    pub validation_seed: Option<u64>,
    /// Train without images that fail the upfront check instead of aborting.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Ignore EXIF orientation, as kohya does (photos may train sideways).
    #[arg(long)]
    pub ignore_exif_orientation: bool,
}
