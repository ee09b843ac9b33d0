//! `--dataset_config` TOML and the legacy `--train_data_dir`/`--reg_data_dir` layout, resolved
//! into [`DatasetGroupSpec`] with kohya's fallback order: subset → dataset → general →
//! command line → default (config_util.BlueprintGenerator).

mod legacy;
mod schema;
mod spec;
mod tree;

use std::path::{Path, PathBuf};

pub use legacy::legacy_dataset_config;
pub use spec::{CaptionOptions, DatasetGroupSpec, DatasetSpec, SubsetSpec};

use crate::dataset::MAX_IMAGES_PER_EPOCH;
use crate::error::{DataError, Result};
use crate::options::{
    check_resize_interpolation, parse_face_crop_aug_range, parse_resolution, rate_problem, DatasetOptions,
};
use tree::{Kind, Node};

/// Loads a kohya dataset TOML. `cwd` is where relative `image_dir` paths are looked up first,
/// as kohya does; a path missing there but present beside the TOML is used with a note.
pub fn load_dataset_config(path: &Path, opts: &DatasetOptions, cwd: &Path) -> Result<DatasetGroupSpec> {
    opts.validate()?;
    let lower = path.to_string_lossy().to_lowercase();
    if lower.ends_with(".json") {
        return Err(DataError::Unsupported { what: "a JSON --dataset_config (use TOML)".into() });
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
    let root = tree::parse(path, &text)?;
    schema::check_root(path, &root)?;
    let general: &[(String, Node)] = match find(&root, "general") {
        Some(Node { kind: Kind::Table(t), .. }) => t,
        _ => &[],
    };
    schema::check_table(path, schema::G, general)?;
    let datasets: Vec<&Node> = match find(&root, "datasets") {
        Some(Node { kind: Kind::Array(a), .. }) => a.iter().collect(),
        _ => Vec::new(),
    };
    let toml_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut notes = Vec::new();
    let mut out = Vec::new();
    for ds_node in datasets {
        let Kind::Table(ds) = &ds_node.kind else { continue };
        schema::check_table(path, schema::D, ds)?;
        let subsets: Vec<&Node> = match find(ds, "subsets") {
            Some(Node { kind: Kind::Array(a), .. }) => a.iter().collect(),
            _ => Vec::new(),
        };
        let mut subset_specs = Vec::new();
        for ss_node in subsets {
            let Kind::Table(ss) = &ss_node.kind else { continue };
            schema::check_table(path, schema::S, ss)?;
            let lv = Levels { file: path, subset: Some(ss), dataset: ds, general };
            let Some(dir_node) = find(ss, "image_dir") else {
                return Err(DataError::ConfigMissingKey {
                    path: path.to_path_buf(),
                    line: ss_node.line,
                    key: "image_dir".into(),
                    table: "[[datasets.subsets]]".into(),
                });
            };
            let raw = lv.string("image_dir")?.unwrap_or_default();
            let image_dir = resolve_image_dir(&raw, cwd, &toml_dir, dir_node.line, path, &mut notes);
            subset_specs.push(resolve_subset(&lv, opts, image_dir, None)?);
        }
        let lv = Levels { file: path, subset: None, dataset: ds, general };
        out.push(resolve_dataset(&lv, opts, subset_specs, ds_node.line)?);
    }
    Ok(DatasetGroupSpec { datasets: out, notes, config_file: Some(path.to_path_buf()) })
}

fn resolve_image_dir(
    raw: &str,
    cwd: &Path,
    toml_dir: &Path,
    line: usize,
    file: &Path,
    notes: &mut Vec<String>,
) -> PathBuf {
    let p = Path::new(raw);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let from_cwd = cwd.join(p);
    if from_cwd.is_dir() {
        return from_cwd;
    }
    let beside = toml_dir.join(p);
    if beside.is_dir() {
        notes.push(format!(
            "{}:{line}: image_dir {raw:?} does not exist in the working directory {}; using {} \
             (beside the TOML file). kohya resolves it from the working directory only.",
            file.display(),
            cwd.display(),
            beside.display()
        ));
        return beside;
    }
    from_cwd
}

fn find<'a>(t: &'a [(String, Node)], key: &str) -> Option<&'a Node> {
    t.iter().find(|(k, _)| k == key).map(|(_, n)| n)
}

/// The three TOML levels one value is looked up in, nearest first.
pub(crate) struct Levels<'a> {
    file: &'a Path,
    subset: Option<&'a [(String, Node)]>,
    dataset: &'a [(String, Node)],
    general: &'a [(String, Node)],
}

impl<'a> Levels<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.subset
            .and_then(|s| find(s, key))
            .or_else(|| find(self.dataset, key))
            .or_else(|| find(self.general, key))
    }
    fn bad(&self, key: &str, node: &Node, message: impl Into<String>) -> DataError {
        DataError::ConfigValue {
            path: self.file.to_path_buf(),
            line: node.line,
            key: key.into(),
            message: message.into(),
        }
    }
    fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key)?.kind {
            Kind::Bool(b) => Some(b),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Option<i64> {
        match self.get(key)?.kind {
            Kind::Int(i) => Some(i),
            _ => None,
        }
    }
    fn num(&self, key: &str) -> Option<f64> {
        match self.get(key)?.kind {
            Kind::Int(i) => Some(i as f64),
            Kind::Float(f) => Some(f),
            _ => None,
        }
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        Ok(match &self.get(key).map(|n| &n.kind) {
            Some(Kind::Str(s)) => Some(s.clone()),
            _ => None,
        })
    }
    /// A non-negative integer that must fit in u32.
    fn uint(&self, key: &str, min: i64) -> Result<Option<u32>> {
        let Some(node) = self.get(key) else { return Ok(None) };
        let Kind::Int(i) = node.kind else { return Ok(None) };
        if i < min || i > u32::MAX as i64 {
            return Err(self.bad(key, node, format!("must be an integer >= {min}, got {i}")));
        }
        Ok(Some(i as u32))
    }
    fn rate(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.num(key) else { return Ok(None) };
        match rate_problem(v) {
            Some(message) => Err(self.blame(key, message)),
            None => Ok(Some(v)),
        }
    }
    /// An error about the value of `key` where it came from: its TOML line when one of the levels
    /// sets it, else the command-line flag `--key` (whose value, or default, was used).
    pub(crate) fn blame(&self, key: &str, message: impl Into<String>) -> DataError {
        match self.get(key) {
            Some(node) => self.bad(key, node, message),
            None => DataError::InvalidOption { key: format!("--{key}"), message: message.into() },
        }
    }
    fn as_option_error(&self, key: &str, e: DataError) -> DataError {
        match (self.get(key), e) {
            (Some(n), DataError::InvalidOption { message, .. }) => self.bad(key, n, message),
            (_, e) => e,
        }
    }
}

/// Subset parameters: TOML levels first, then the command line (whose defaults are kohya's).
/// `legacy` carries (num_repeats, is_reg, class_tokens) from a `<repeats>_<class>` folder name.
pub(crate) fn resolve_subset(
    lv: &Levels<'_>,
    opts: &DatasetOptions,
    image_dir: PathBuf,
    legacy: Option<(i64, bool, String)>,
) -> Result<SubsetSpec> {
    let face = match lv.get("face_crop_aug_range") {
        Some(Node { kind: Kind::Array(a), line }) => {
            let v: Vec<f64> = a
                .iter()
                .filter_map(|n| match n.kind {
                    Kind::Int(i) => Some(i as f64),
                    Kind::Float(f) => Some(f),
                    _ => None,
                })
                .collect();
            match v.as_slice() {
                [lo, hi] if lo <= hi && *lo > 0.0 => Some((*lo, *hi)),
                _ => {
                    return Err(DataError::ConfigValue {
                        path: lv.file.to_path_buf(),
                        line: *line,
                        key: "face_crop_aug_range".into(),
                        message: "must be [lower, upper] with 0 < lower <= upper".into(),
                    })
                }
            }
        }
        _ => opts.face_crop_aug_range.as_deref().map(parse_face_crop_aug_range).transpose()?,
    };
    let resize_interpolation =
        lv.string("resize_interpolation")?.or_else(|| opts.resize_interpolation.clone());
    if let Some(r) = &resize_interpolation {
        check_resize_interpolation("resize_interpolation", r)
            .map_err(|e| lv.as_option_error("resize_interpolation", e))?;
    }
    let (legacy_repeats, legacy_reg, legacy_class) = match legacy {
        Some((n, r, c)) => (Some(n), Some(r), Some(c)),
        None => (None, None, None),
    };
    let mut caption_extension =
        lv.string("caption_extension")?.unwrap_or_else(|| opts.effective_caption_extension().to_string());
    // kohya's DreamBoothSubset adds the missing dot.
    if !caption_extension.is_empty() && !caption_extension.starts_with('.') {
        caption_extension.insert(0, '.');
    }
    if lv.bool("cache_info").unwrap_or(opts.cache_info) {
        let what = match lv.get("cache_info") {
            Some(n) => format!("cache_info ({}:{})", lv.file.display(), n.line),
            None => "--cache_info".into(),
        };
        return Err(DataError::Unsupported { what });
    }
    let custom_attributes = match lv.get("custom_attributes") {
        Some(n) => node_to_json(n),
        None => serde_json::Value::Object(Default::default()),
    };
    let caption = CaptionOptions {
        shuffle_caption: lv.bool("shuffle_caption").unwrap_or(opts.shuffle_caption),
        caption_separator: lv.string("caption_separator")?.unwrap_or_else(|| opts.caption_separator.clone()),
        keep_tokens: lv.uint("keep_tokens", 0)?.unwrap_or(opts.keep_tokens) as usize,
        keep_tokens_separator: lv
            .string("keep_tokens_separator")?
            .or_else(|| Some(opts.keep_tokens_separator.clone()))
            .filter(|s| !s.is_empty()),
        secondary_separator: lv.string("secondary_separator")?.or_else(|| opts.secondary_separator.clone()),
        enable_wildcard: lv.bool("enable_wildcard").unwrap_or(opts.enable_wildcard),
        caption_prefix: lv.string("caption_prefix")?.or_else(|| opts.caption_prefix.clone()),
        caption_suffix: lv.string("caption_suffix")?.or_else(|| opts.caption_suffix.clone()),
        caption_dropout_rate: lv.rate("caption_dropout_rate")?.unwrap_or(opts.caption_dropout_rate),
        caption_dropout_every_n_epochs: lv
            .uint("caption_dropout_every_n_epochs", 0)?
            .unwrap_or(opts.caption_dropout_every_n_epochs),
        caption_tag_dropout_rate: lv
            .rate("caption_tag_dropout_rate")?
            .unwrap_or(opts.caption_tag_dropout_rate),
        token_warmup_min: lv.uint("token_warmup_min", 0)?.unwrap_or(opts.token_warmup_min),
        token_warmup_step: lv.num("token_warmup_step").unwrap_or(opts.token_warmup_step),
        weighted_captions: opts.weighted_captions,
    };
    if caption.caption_separator.is_empty() {
        return Err(lv.blame("caption_separator", "must not be empty"));
    }
    if let Some(message) = crate::options::non_negative_problem(caption.token_warmup_step) {
        return Err(lv.blame("token_warmup_step", message));
    }
    let num_repeats = lv.int("num_repeats").or(legacy_repeats).unwrap_or(1);
    if num_repeats > MAX_IMAGES_PER_EPOCH as i64 {
        let message = format!(
            "num_repeats {num_repeats} is more than an epoch can hold (at most {MAX_IMAGES_PER_EPOCH} \
             image repeats per dataset); lower it and use max_train_steps or max_train_epochs for length"
        );
        return Err(match (lv.get("num_repeats"), legacy_repeats.is_some()) {
            (None, true) => DataError::InvalidOption {
                key: format!("folder {} (its <repeats>_ prefix)", image_dir.display()),
                message,
            },
            _ => lv.blame("num_repeats", message),
        });
    }
    Ok(SubsetSpec {
        image_dir,
        num_repeats,
        is_reg: lv.bool("is_reg").or(legacy_reg).unwrap_or(false),
        class_tokens: lv.string("class_tokens")?.or(legacy_class),
        caption_extension,
        caption,
        color_aug: lv.bool("color_aug").unwrap_or(opts.color_aug),
        flip_aug: lv.bool("flip_aug").unwrap_or(opts.flip_aug),
        random_crop: lv.bool("random_crop").unwrap_or(opts.random_crop),
        face_crop_aug_range: face,
        alpha_mask: lv.bool("alpha_mask").unwrap_or(opts.alpha_mask),
        resize_interpolation,
        custom_attributes,
    })
}

fn node_to_json(n: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &n.kind {
        Kind::Str(s) => J::String(s.clone()),
        Kind::Int(i) => J::from(*i),
        Kind::Float(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
        Kind::Bool(b) => J::Bool(*b),
        Kind::Datetime => J::Null,
        Kind::Array(a) => J::Array(a.iter().map(node_to_json).collect()),
        Kind::Table(t) => J::Object(t.iter().map(|(k, v)| (k.clone(), node_to_json(v))).collect()),
    }
}

/// Dataset parameters plus kohya's checks from DreamBoothDataset.__init__ and
/// verify_bucket_reso_steps(64).
pub(crate) fn resolve_dataset(
    lv: &Levels<'_>,
    opts: &DatasetOptions,
    subsets: Vec<SubsetSpec>,
    line: usize,
) -> Result<DatasetSpec> {
    let file = lv.file.to_path_buf();
    let resolution = match lv.get("resolution") {
        Some(Node { kind: Kind::Int(i), line }) if *i > 0 && *i <= u32::MAX as i64 => (*i as u32, *i as u32),
        Some(Node { kind: Kind::Array(a), line }) => {
            match (a.first().map(|n| &n.kind), a.get(1).map(|n| &n.kind)) {
                (Some(Kind::Int(w)), Some(Kind::Int(h)))
                    if *w > 0 && *h > 0 && *w <= u32::MAX as i64 && *h <= u32::MAX as i64 =>
                {
                    (*w as u32, *h as u32)
                }
                _ => {
                    return Err(DataError::ConfigValue {
                        path: file,
                        line: *line,
                        key: "resolution".into(),
                        message: "must be a positive integer or [width, height]".into(),
                    })
                }
            }
        }
        Some(n) => return Err(lv.bad("resolution", n, "must be a positive integer or [width, height]")),
        None => match &opts.resolution {
            Some(r) => parse_resolution(r)?,
            None => {
                return Err(DataError::ConfigMissingKey {
                    path: file,
                    line,
                    key: "resolution".into(),
                    table: "this dataset (and [general] and --resolution)".into(),
                })
            }
        },
    };
    let batch_size = lv.uint("batch_size", 1)?.unwrap_or(opts.train_batch_size);
    let enable_bucket = lv.bool("enable_bucket").unwrap_or(opts.enable_bucket);
    let min_bucket_reso = lv.uint("min_bucket_reso", 1)?.unwrap_or(opts.min_bucket_reso);
    let max_bucket_reso = lv.uint("max_bucket_reso", 1)?.unwrap_or(opts.max_bucket_reso);
    let bucket_reso_steps = lv.uint("bucket_reso_steps", 1)?.unwrap_or(opts.bucket_reso_steps);
    let bucket_no_upscale = lv.bool("bucket_no_upscale").unwrap_or(opts.bucket_no_upscale);
    let validation_split = lv.num("validation_split").unwrap_or(opts.validation_split);
    let validation_seed = match lv.int("validation_seed") {
        Some(s) => Some(s as u64),
        None => opts.validation_seed,
    };
    let resize_interpolation =
        lv.string("resize_interpolation")?.or_else(|| opts.resize_interpolation.clone());
    let network_multiplier = lv.num("network_multiplier").unwrap_or(1.0);
    let mut spec = DatasetSpec {
        resolution,
        batch_size: batch_size as usize,
        enable_bucket,
        min_bucket_reso,
        max_bucket_reso,
        bucket_reso_steps,
        bucket_no_upscale: enable_bucket && bucket_no_upscale,
        prior_loss_weight: opts.prior_loss_weight,
        validation_split,
        validation_seed,
        resize_interpolation,
        network_multiplier,
        subsets,
        notes: Vec::new(),
    };
    spec.check_buckets(|key, message| lv.blame(key, message))?;
    Ok(spec)
}
