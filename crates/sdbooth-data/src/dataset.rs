//! Building the datasets: kohya's DreamBoothDataset.__init__ (subsets, captions, reg balancing)
//! and make_buckets, on top of the upfront image check.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::bucket::{BucketManager, Reso};
use crate::config::{DatasetGroupSpec, DatasetSpec, SubsetSpec};
use crate::error::{BadFile, BadFiles, DataError, Result};
use crate::options::DatasetOptions;
use crate::scan::{read_caption, scan_folder, unused_caption_files, CaptionRead};
use crate::validate::{probe_all, ImageProbe};

/// The most image repeats (images × num_repeats, reg images included) one dataset's epoch may
/// hold. Each one is an entry in a bucket list; far beyond any real dataset (10,000 images × 1,000
/// repeats), far below what would exhaust memory or wrap a count.
pub const MAX_IMAGES_PER_EPOCH: u64 = 10_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEntry {
    pub path: PathBuf,
    /// Index into the dataset's `subsets`.
    pub subset: usize,
    pub is_reg: bool,
    /// Caption as read (before per-step processing); class_tokens when there is no caption file.
    pub caption: String,
    pub caption_file: Option<PathBuf>,
    /// Size the bucket is chosen from (EXIF orientation applied unless ignored).
    pub size: Reso,
    /// EXIF orientation applied when loading (None: none, or ignored).
    pub orientation: Option<String>,
    pub has_alpha: bool,
    /// Repeats after reg balancing (kohya rewrites reg images' repeats).
    pub num_repeats: u32,
    pub bucket: Reso,
    pub resized_size: Reso,
    pub ar_error: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubsetInfo {
    pub spec: SubsetSpec,
    /// Images found (kohya's img_count); 0 when the subset was ignored.
    pub img_count: usize,
    /// Why kohya ignores this subset (repeats < 1, duplicate folder, no images).
    pub ignored: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub reso: Reso,
    /// Indices into `Dataset::images`, each repeated num_repeats times.
    pub items: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub spec: DatasetSpec,
    pub subsets: Vec<SubsetInfo>,
    /// Registered images: train images, then the reg images the balancing loop registered.
    pub images: Vec<ImageEntry>,
    /// Sorted by resolution, as kohya's BucketManager.sort; only resolutions some image uses
    /// (the index is the bucket number kohya prints).
    pub buckets: Vec<Bucket>,
    /// Train images × repeats.
    pub num_train_images: u64,
    /// Reg images × repeats before balancing (kohya's num_reg_images).
    pub num_reg_images: u64,
    pub mean_ar_error: f64,
    /// Instance images held out by `validation_split` (kohya's split_train_val), each with the
    /// bucket it would train in; never in `buckets`. Validation loss reads them.
    #[serde(default)]
    pub validation_images: Vec<ImageEntry>,
}

impl Dataset {
    /// Batches in one epoch: per bucket, ceil(count / batch_size).
    pub fn batches_per_epoch(&self) -> usize {
        let bs = self.spec.batch_size.max(1);
        self.buckets.iter().map(|b| b.items.len().div_ceil(bs)).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetGroup {
    pub datasets: Vec<Dataset>,
    pub notes: Vec<String>,
    /// Problems skipped with skip_bad_images.
    pub skipped: Vec<BadFile>,
    /// Warnings about images that are used (wrong extension, very large).
    pub image_warnings: Vec<BadFile>,
    /// Images whose EXIF orientation is applied (kohya would train them unrotated).
    pub rotated: Vec<(PathBuf, String)>,
    pub ignore_exif_orientation: bool,
}

impl DatasetGroup {
    /// Batches in one epoch over all datasets (the DataLoader length kohya prints).
    pub fn batches_per_epoch(&self) -> usize {
        self.datasets.iter().map(Dataset::batches_per_epoch).sum()
    }
    pub fn num_train_images(&self) -> u64 {
        self.datasets.iter().map(|d| d.num_train_images).sum()
    }
    pub fn num_reg_images(&self) -> u64 {
        self.datasets.iter().map(|d| d.num_reg_images).sum()
    }
}

/// A dataset with its subsets' infos and (subset index, listed image paths).
type ListedDataset = (DatasetSpec, Vec<SubsetInfo>, Vec<(usize, Vec<PathBuf>)>);

/// One subset's listed images with their captions, before registration.
struct Listed {
    subset: usize,
    images: Vec<(PathBuf, String, Option<PathBuf>)>,
}

/// Scans, checks and buckets every dataset of `spec`. Fails with all problems together unless
/// `opts.skip_bad_images`.
pub fn build_dataset_group(spec: DatasetGroupSpec, opts: &DatasetOptions) -> Result<DatasetGroup> {
    // kohya's is_latent_cacheable check: cached latents cannot hold per-step colour or crop changes.
    if opts.cache_latents || opts.cache_latents_to_disk {
        let bad = spec.datasets.iter().flat_map(|d| &d.subsets).any(|s| s.color_aug || s.random_crop);
        if bad {
            return Err(DataError::InvalidOption {
                key: "--cache_latents".into(),
                message: "cannot be used with color_aug or random_crop (kohya refuses this too)".into(),
            });
        }
    }
    let mut notes = spec.notes.clone();
    let spec_file = spec.config_file.clone();
    let mut problems: Vec<BadFile> = Vec::new();
    // 1. list folders (kohya order: datasets, then subsets), dropping what kohya ignores.
    let mut per_ds: Vec<ListedDataset> = Vec::new();
    for ds in spec.datasets {
        notes.extend(ds.notes.iter().cloned());
        let mut infos = Vec::new();
        let mut lists = Vec::new();
        for (i, ss) in ds.subsets.iter().enumerate() {
            let mut info = SubsetInfo { spec: ss.clone(), img_count: 0, ignored: None };
            if ss.num_repeats < 1 {
                info.ignored = Some(format!(
                    "key `num_repeats` is {}; a subset needs at least 1 repeat (kohya ignores it too)",
                    ss.num_repeats
                ));
            } else if ds.subsets[..i].iter().any(|o| o.image_dir == ss.image_dir) {
                info.ignored = Some("duplicate image_dir; the first subset is used".into());
            } else {
                let scan = scan_folder(&ss.image_dir);
                problems.extend(scan.problems);
                notes.extend(scan.notes);
                lists.push((i, scan.images));
            }
            if let Some(why) = &info.ignored {
                notes.push(format!("ignored subset {}: {why}", ss.image_dir.display()));
            }
            infos.push(info);
        }
        per_ds.push((ds, infos, lists));
    }
    // 2. check every image once, in parallel.
    let mut all: Vec<PathBuf> =
        per_ds.iter().flat_map(|(_, _, l)| l.iter().flat_map(|(_, v)| v.clone())).collect();
    all.sort();
    all.dedup();
    let probes: BTreeMap<PathBuf, std::result::Result<ImageProbe, String>> =
        all.iter().cloned().zip(probe_all(&all)).collect();
    let mut image_warnings = Vec::new();
    for (p, r) in &probes {
        match r {
            Err(cause) => problems.push(BadFile { path: p.clone(), cause: cause.clone() }),
            Ok(probe) => image_warnings
                .extend(probe.warnings.iter().map(|w| BadFile { path: p.clone(), cause: w.clone() })),
        }
    }
    // 3. captions (problems join the same report).
    let mut listed_per_ds = Vec::new();
    let mut unused_captions: Vec<PathBuf> = Vec::new();
    for (ds, _, lists) in &per_ds {
        let mut listed = Vec::new();
        for (si, paths) in lists {
            let ss = &ds.subsets[*si];
            let mut images = Vec::new();
            for p in paths {
                if !matches!(probes.get(p), Some(Ok(_))) {
                    continue;
                }
                let (caption, file) = match read_caption(p, &ss.caption_extension, ss.caption.enable_wildcard)
                {
                    Err(cause) => {
                        problems.push(BadFile { path: p.clone(), cause });
                        continue;
                    }
                    Ok(CaptionRead::Found { text, file }) => (text, Some(file)),
                    Ok(CaptionRead::Missing) => (ss.class_tokens.clone().unwrap_or_default(), None),
                };
                if file.is_none() {
                    unused_captions.extend(unused_caption_files(p, &ss.caption_extension));
                }
                images.push((p.clone(), caption, file));
            }
            listed.push(Listed { subset: *si, images });
        }
        listed_per_ds.push(listed);
    }
    if !unused_captions.is_empty() {
        notes.push(format!(
            "WARNING: {} caption file(s) exist but are NOT used, because their extension is not the \
             caption_extension (kohya's default for DreamBooth is .caption); those images train with \
             class_tokens instead. Set caption_extension to use them. First: {}",
            unused_captions.len(),
            unused_captions[0].display()
        ));
    }
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems.dedup();
    if !problems.is_empty() && !opts.skip_bad_images {
        return Err(DataError::BadFiles(BadFiles(problems)));
    }
    // 4. register, balance, bucket.
    let mut datasets = Vec::new();
    let mut rotated = Vec::new();
    for ((ds, mut infos, _), listed) in per_ds.into_iter().zip(listed_per_ds) {
        let d = register(ds, &mut infos, listed, &probes, opts, &mut notes, &mut rotated)?;
        datasets.push(d);
    }
    if datasets.iter().all(|d| d.images.is_empty()) {
        return Err(DataError::EmptyDataset { detail: empty_dataset_detail(&datasets, spec_file, &notes) });
    }
    Ok(DatasetGroup {
        datasets,
        notes,
        skipped: problems,
        image_warnings,
        rotated,
        ignore_exif_orientation: opts.ignore_exif_orientation,
    })
}

/// Why no train image is left, per dataset and subset, so the user knows which key or folder to fix.
fn empty_dataset_detail(datasets: &[Dataset], config_file: Option<PathBuf>, notes: &[String]) -> String {
    let mut lines = Vec::new();
    if datasets.is_empty() {
        lines.push(match &config_file {
            Some(f) => format!("{} has no [[datasets]] table", f.display()),
            None => "no dataset".into(),
        });
    }
    let mut train_subsets = 0;
    for (i, d) in datasets.iter().enumerate() {
        if d.subsets.is_empty() {
            lines.push(match &config_file {
                Some(f) => {
                    format!("[[datasets]] number {} in {} has no [[datasets.subsets]]", i + 1, f.display())
                }
                None => "no usable <repeats>_<class tokens> sub-folder in --train_data_dir".into(),
            });
        }
        for s in &d.subsets {
            let dir = s.spec.image_dir.display();
            let line = match (&s.ignored, s.spec.is_reg) {
                (Some(why), true) => format!("reg subset {dir}: {why}"),
                (Some(why), false) => format!("subset {dir}: {why}"),
                (None, true) => {
                    format!("reg subset {dir}: {} image(s), used only to balance train images", s.img_count)
                }
                (None, false) => format!("subset {dir}: {} image(s)", s.img_count),
            };
            train_subsets += usize::from(!s.spec.is_reg);
            lines.push(line);
        }
    }
    if train_subsets == 0 && datasets.iter().any(|d| !d.subsets.is_empty()) {
        lines.push(
            "every subset is a regularization subset (is_reg = true or --reg_data_dir): at least one \
             train subset is needed"
                .into(),
        );
    }
    // Folders and files that were skipped explain an empty dataset more often than anything else.
    lines.extend(notes.iter().filter(|n| n.contains("ignored") && !n.starts_with("ignored subset")).cloned());
    format!("no usable train images:\n  {}", lines.join("\n  "))
}

/// kohya's split_train_val for the train side: the first ceil(n * (1 - split)) after
/// `random.seed(seed); random.shuffle(...)` with Python's generator, so with a validation_seed
/// the same images are held out as in kohya. (Without one kohya uses its global random state,
/// which cannot be reproduced; we then use --seed, or 0.)
/// Returns (train, held out).
fn train_split<T>(mut items: Vec<T>, split: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    crate::rng::Streams::new(seed).validation_split().shuffle(&mut items);
    let keep = ((items.len() as f64) * (1.0 - split)).ceil() as usize;
    let held_out = items.split_off(keep.min(items.len()));
    (items, held_out)
}

fn register(
    spec: DatasetSpec,
    infos: &mut [SubsetInfo],
    listed: Vec<Listed>,
    probes: &BTreeMap<PathBuf, std::result::Result<ImageProbe, String>>,
    opts: &DatasetOptions,
    notes: &mut Vec<String>,
    rotated: &mut Vec<(PathBuf, String)>,
) -> Result<Dataset> {
    let mut images: Vec<ImageEntry> = Vec::new();
    let mut reg: Vec<ImageEntry> = Vec::new();
    let mut validation_images: Vec<ImageEntry> = Vec::new();
    let (mut num_train, mut num_reg) = (0u64, 0u64);
    for l in listed {
        let ss = &spec.subsets[l.subset];
        let mut items = l.images;
        if spec.validation_split > 0.0 && !ss.is_reg {
            let seed = spec.validation_seed.or(opts.seed).unwrap_or(0);
            let (train, held_out) = train_split(items, spec.validation_split, seed);
            items = train;
            for (path, caption, caption_file) in held_out {
                let Some(Ok(probe)) = probes.get(&path) else { continue };
                let orientation = if opts.ignore_exif_orientation { None } else { probe.orientation.clone() };
                validation_images.push(ImageEntry {
                    path,
                    subset: l.subset,
                    is_reg: false,
                    caption,
                    caption_file,
                    size: probe.size(opts.ignore_exif_orientation),
                    orientation,
                    has_alpha: probe.has_alpha,
                    num_repeats: 1,
                    bucket: (0, 0),
                    resized_size: (0, 0),
                    ar_error: 0.0,
                });
            }
        }
        if items.is_empty() {
            infos[l.subset].ignored = Some("no images found".into());
            notes.push(format!("ignored subset {}: no images found", ss.image_dir.display()));
            continue;
        }
        // Checked: resolve_subset bounds num_repeats, but many subsets can still add up.
        let repeats = u64::try_from(ss.num_repeats).unwrap_or(0);
        let total = if ss.is_reg { &mut num_reg } else { &mut num_train };
        let before = *total;
        *total = repeats
            .checked_mul(items.len() as u64)
            .and_then(|n| before.checked_add(n))
            .filter(|&n| n <= MAX_IMAGES_PER_EPOCH)
            .ok_or_else(|| DataError::InvalidOption {
                key: format!("num_repeats of subset {}", ss.image_dir.display()),
                message: format!(
                    "{} images × {} repeats brings the dataset over {MAX_IMAGES_PER_EPOCH} image repeats \
                     per epoch; lower num_repeats and use max_train_steps or max_train_epochs for length",
                    items.len(),
                    ss.num_repeats
                ),
            })?;
        infos[l.subset].img_count = items.len();
        for (path, caption, caption_file) in items {
            let Some(Ok(probe)) = probes.get(&path) else { continue };
            let orientation = if opts.ignore_exif_orientation { None } else { probe.orientation.clone() };
            if let Some(o) = &orientation {
                rotated.push((path.clone(), o.clone()));
            }
            let e = ImageEntry {
                path,
                subset: l.subset,
                is_reg: ss.is_reg,
                caption,
                caption_file,
                size: probe.size(opts.ignore_exif_orientation),
                orientation,
                has_alpha: probe.has_alpha,
                // At most MAX_IMAGES_PER_EPOCH (resolve_subset), so it fits.
                num_repeats: u32::try_from(ss.num_repeats).unwrap_or(u32::MAX),
                bucket: (0, 0),
                resized_size: (0, 0),
                ar_error: 0.0,
            };
            if ss.is_reg {
                reg.push(e);
            } else {
                images.push(e);
            }
        }
    }
    // kohya's balancing loop: register reg images in order until their repeats reach the train
    // count; then give +1 repeat to each in turn. Reg images beyond that are never registered.
    if num_reg == 0 {
        notes.push("no regularization images".into());
    } else {
        if num_train < num_reg {
            notes
                .push("some reg images are not used (more reg images than train images), as in kohya".into());
        }
        let first = images.len();
        let mut n = 0u64;
        let mut first_loop = true;
        'outer: while n < num_train {
            for (i, info) in reg.iter().enumerate() {
                if first_loop {
                    images.push(info.clone());
                    n += info.num_repeats as u64;
                } else {
                    images[first + i].num_repeats += 1;
                    n += 1;
                }
                if n >= num_train {
                    break 'outer;
                }
            }
            first_loop = false;
        }
    }
    let buckets = assign_buckets(&spec, &mut images)?;
    // Held-out images take the bucket they would train in; one that fits none is not validated.
    let bm = bucket_manager(&spec);
    validation_images.retain_mut(|img| {
        let c = bm.select_bucket(img.size.0, img.size.1);
        let fits = c.reso.0 > 0
            && c.reso.1 > 0
            && crate::resize::check_resize(img.size, c.resized_size).is_ok()
            && (spec.enable_bucket || (img.size.0 >= spec.resolution.0 && img.size.1 >= spec.resolution.1));
        if !fits {
            notes.push(format!("validation image {} fits no bucket; not validated", img.path.display()));
        }
        (img.bucket, img.resized_size, img.ar_error) = (c.reso, c.resized_size, c.ar_error);
        fits
    });
    let mean_ar_error = if spec.enable_bucket && !images.is_empty() {
        images.iter().map(|i| i.ar_error.abs()).sum::<f64>() / images.len() as f64
    } else {
        0.0
    };
    Ok(Dataset {
        spec,
        subsets: infos.to_vec(),
        images,
        buckets,
        num_train_images: num_train,
        num_reg_images: num_reg,
        mean_ar_error,
        validation_images,
    })
}

fn bucket_manager(spec: &DatasetSpec) -> BucketManager {
    if !spec.enable_bucket {
        BucketManager::fixed(spec.resolution)
    } else if spec.bucket_no_upscale {
        BucketManager::no_upscale(spec.resolution, spec.bucket_reso_steps)
    } else {
        BucketManager::predefined(
            spec.resolution,
            spec.min_bucket_reso,
            spec.max_bucket_reso,
            spec.bucket_reso_steps,
        )
    }
}

fn assign_buckets(spec: &DatasetSpec, images: &mut [ImageEntry]) -> Result<Vec<Bucket>> {
    let bm = bucket_manager(spec);
    // kohya's BucketManager only lists the resolutions some image selected (add_if_new_reso).
    let mut resos: Vec<Reso> = Vec::new();
    for img in images.iter_mut() {
        let c = bm.select_bucket(img.size.0, img.size.1);
        if c.reso.0 == 0 || c.reso.1 == 0 {
            return Err(DataError::ImageLoad {
                path: img.path.clone(),
                message: format!(
                    "{}x{} is smaller than bucket_reso_steps {} with bucket_no_upscale; it fits no bucket",
                    img.size.0, img.size.1, spec.bucket_reso_steps
                ),
            });
        }
        if !spec.enable_bucket && (img.size.0 < spec.resolution.0 || img.size.1 < spec.resolution.1) {
            return Err(DataError::ImageLoad {
                path: img.path.clone(),
                message: format!(
                    "{}x{} is smaller than the resolution {}x{} and enable_bucket is off (kohya fails on it \
                     when loading); enable buckets or resize the image",
                    img.size.0, img.size.1, spec.resolution.0, spec.resolution.1
                ),
            });
        }
        let ss = &spec.subsets[img.subset];
        let larger = img.size.0 > spec.resolution.0 || img.size.1 > spec.resolution.1;
        if !spec.enable_bucket && larger && !ss.random_crop && ss.face_crop_aug_range.is_none() {
            return Err(DataError::ImageLoad {
                path: img.path.clone(),
                message: format!(
                    "{}x{} is larger than the resolution {}x{} but enable_bucket, random_crop and \
                     face_crop_aug_range are all off (kohya fails on it when loading)",
                    img.size.0, img.size.1, spec.resolution.0, spec.resolution.1
                ),
            });
        }
        // From the header sizes, before any decoding: a resize that cannot fit in memory.
        crate::resize::check_resize(img.size, c.resized_size)
            .map_err(|message| DataError::ImageLoad { path: img.path.clone(), message })?;
        img.bucket = c.reso;
        img.resized_size = c.resized_size;
        img.ar_error = c.ar_error;
        if !resos.contains(&c.reso) {
            resos.push(c.reso);
        }
    }
    resos.sort();
    let mut buckets: Vec<Bucket> = resos.into_iter().map(|reso| Bucket { reso, items: Vec::new() }).collect();
    for (i, img) in images.iter().enumerate() {
        if let Ok(b) = buckets.binary_search_by(|b| b.reso.cmp(&img.bucket)) {
            buckets[b].items.extend(std::iter::repeat_n(i, img.num_repeats as usize));
        }
    }
    Ok(buckets)
}
