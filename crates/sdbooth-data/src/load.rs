//! Loading a training sample as kohya's __getitem__ does: decode, resize and crop to the bucket
//! (or face-crop / random-crop without buckets), color_aug, flip, alpha mask, then a CHW f32
//! buffer in [-1, 1]. Randomness per sample comes from a stream named by (seed, epoch, batch,
//! slot), so a batch loads the same whatever the thread count, and after a resume.

use std::path::Path;

use image::{DynamicImage, ImageBuffer, Pixel, RgbaImage};
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bucket::{crop_ltrb, Reso};
use crate::caption::{process_caption, CaptionContext};
use crate::config::SubsetSpec;
use crate::dataset::{DatasetGroup, ImageEntry};
use crate::error::{DataError, Result};
use crate::resize::resize;
use crate::rng::Streams;
use crate::sampler::BatchRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleContext {
    pub seed: u64,
    /// 1-based epoch.
    pub epoch: u64,
    /// Global optimisation step (for token warmup).
    pub step: u64,
    pub max_train_steps: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub width: u32,
    pub height: u32,
    /// 3 × height × width, RGB, in [-1, 1].
    pub pixels: Vec<f32>,
    /// height × width in [0, 1] when the subset has alpha_mask.
    pub mask: Option<Vec<f32>>,
    /// Caption after per-step processing (weighted syntax left for the tokenizer).
    pub caption: String,
    /// prior_loss_weight for reg images, else 1.
    pub loss_weight: f32,
    pub is_reg: bool,
    pub flipped: bool,
    pub original_size: Reso,
    /// kohya's crop_ltrb (left, top, right, bottom) of the resized image in the bucket.
    pub crop_ltrb: (f64, f64, f64, f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub width: u32,
    pub height: u32,
    /// B × 3 × H × W
    pub pixels: Vec<f32>,
    /// B × H × W; samples without a mask get ones (kohya's rule when any sample has one).
    pub masks: Option<Vec<f32>>,
    pub captions: Vec<String>,
    pub loss_weights: Vec<f32>,
    pub samples: Vec<Sample>,
}

fn load_err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::ImageLoad { path: path.to_path_buf(), message: message.into() }
}

/// Decodes with the orientation applied (unless the entry says none) as RGBA8.
fn decode(entry: &ImageEntry) -> Result<RgbaImage> {
    let reader = image::ImageReader::open(&entry.path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| load_err(&entry.path, e.to_string()))?;
    let mut img: DynamicImage = reader.decode().map_err(|e| load_err(&entry.path, e.to_string()))?;
    use image::metadata::Orientation as O;
    let o = match entry.orientation.as_deref() {
        Some("Rotate90") => Some(O::Rotate90),
        Some("Rotate180") => Some(O::Rotate180),
        Some("Rotate270") => Some(O::Rotate270),
        Some("FlipHorizontal") => Some(O::FlipHorizontal),
        Some("FlipVertical") => Some(O::FlipVertical),
        Some("Rotate90FlipH") => Some(O::Rotate90FlipH),
        Some("Rotate270FlipH") => Some(O::Rotate270FlipH),
        _ => None,
    };
    if let Some(o) = o {
        img.apply_orientation(o);
    }
    Ok(img.to_rgba8())
}

fn crop<P: Pixel<Subpixel = u8> + 'static>(
    img: &ImageBuffer<P, Vec<u8>>,
    x: u32,
    y: u32,
    w: u32,
    h: u32,
) -> ImageBuffer<P, Vec<u8>> {
    image::imageops::crop_imm(img, x, y, w, h).to_image()
}

/// kohya's color_aug: with p = 0.33, either a hue shift of up to ±8 (OpenCV's 0..180 hue
/// scale) or a gamma in [0.95, 1.05] applied to raw 0..255 values.
fn color_aug(img: &mut RgbaImage, rng: &mut ChaCha20Rng) {
    if rng.gen::<f64>() > 0.33 {
        return;
    }
    if rng.gen::<f64>() > 0.5 {
        let mut shift = rng.gen_range(-8.0..8.0f64);
        if shift < 0.0 {
            shift += 180.0;
        }
        for p in img.pixels_mut() {
            let (h, s, v) = rgb_to_hsv8(p.0[0], p.0[1], p.0[2]);
            let h2 = ((h as f64 + shift) % 180.0) as u8;
            let (r, g, b) = hsv8_to_rgb(h2, s, v);
            p.0[0] = r;
            p.0[1] = g;
            p.0[2] = b;
        }
    } else {
        let gamma = rng.gen_range(0.95..1.05f64);
        for p in img.pixels_mut() {
            for c in 0..3 {
                // numpy: uint8 ** float, clipped, cast back (truncation).
                p.0[c] = (p.0[c] as f64).powf(gamma).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// OpenCV's 8-bit RGB → HSV (H in 0..180).
fn rgb_to_hsv8(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let (rf, gf, bf) = (r as f64, g as f64, b as f64);
    let v = rf.max(gf).max(bf);
    let mn = rf.min(gf).min(bf);
    let diff = v - mn;
    let s = if v > 0.0 { diff * 255.0 / v } else { 0.0 };
    let mut h = if diff == 0.0 {
        0.0
    } else if v == rf {
        60.0 * (gf - bf) / diff
    } else if v == gf {
        120.0 + 60.0 * (bf - rf) / diff
    } else {
        240.0 + 60.0 * (rf - gf) / diff
    };
    if h < 0.0 {
        h += 360.0;
    }
    ((h / 2.0).round().min(179.0) as u8, s.round() as u8, v as u8)
}

fn hsv8_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let h = h as f64 * 2.0 / 60.0;
    let s = s as f64 / 255.0;
    let v = v as f64;
    let i = h.floor() as i32 % 6;
    let f = h - h.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    (r.round() as u8, g.round() as u8, b.round() as u8)
}

/// kohya's crop_target for face_crop_aug_range without buckets. Face position comes from the
/// file name `<name>_<cx>_<cy>_<w>_<h>.<ext>`.
fn face_crop(
    img: RgbaImage,
    entry: &ImageEntry,
    ss: &SubsetSpec,
    target: Reso,
    range: (f64, f64),
    rng: &mut ChaCha20Rng,
) -> Result<Option<RgbaImage>> {
    let stem = entry.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let t: Vec<&str> = stem.split('_').collect();
    if t.len() < 5 {
        return Ok(None);
    }
    let n = t.len();
    let parsed: Vec<i64> = t[n - 4..].iter().filter_map(|s| s.parse().ok()).collect();
    let [fcx, fcy, fw, fh] = parsed[..] else { return Ok(None) };
    if fcx <= 0 {
        return Ok(None);
    }
    let (w, h) = img.dimensions();
    let (tw, th) = target;
    if (w, h) == (tw, th) {
        return Ok(Some(img));
    }
    let face = fw.max(fh).max(1) as f64;
    let size = tw.min(th) as f64;
    let mut min_scale = (th as f64 / h as f64).max(tw as f64 / w as f64);
    min_scale = 1f64.min(min_scale.max(size / (face * range.1)));
    let max_scale = 1f64.min(min_scale.max(size / (face * range.0)));
    let scale = if min_scale >= max_scale { min_scale } else { rng.gen_range(min_scale..max_scale) };
    let nh = (h as f64 * scale + 0.5) as u32;
    let nw = (w as f64 * scale + 0.5) as u32;
    if nh < th || nw < tw {
        return Err(load_err(&entry.path, format!("{w}x{h} is too small for the face crop to {tw}x{th}")));
    }
    let mut img = resize(&img, nw, nh, entry_interp(ss)).map_err(|m| load_err(&entry.path, m))?;
    let fc = [(fcy as f64 * scale + 0.5) as i64, (fcx as f64 * scale + 0.5) as i64];
    let face_size = fw.max(fh);
    for (axis, (target, length)) in [(th as i64, nh as i64), (tw as i64, nw as i64)].into_iter().enumerate() {
        let face_p = fc[axis];
        let mut p1 = face_p - target / 2;
        if ss.random_crop {
            let r = (length - face_p).max(face_p).max(0);
            p1 += rng.gen_range(0..=r) + rng.gen_range(0..=r) - r;
        } else if range.0 != range.1 && face_size > (size as i64) / 10 && face_size >= 40 {
            p1 += rng.gen_range((-face_size).div_euclid(20)..=face_size / 20);
        }
        let p1 = p1.min(length - target).max(0) as u32;
        let (cw, ch) = img.dimensions();
        img = if axis == 0 { crop(&img, 0, p1, cw, th) } else { crop(&img, p1, 0, tw, ch) };
    }
    Ok(Some(img))
}

fn entry_interp(ss: &SubsetSpec) -> Option<&str> {
    ss.resize_interpolation.as_deref()
}

/// Loads image `image` of dataset `dataset`. `slot` makes its random stream unique within the
/// epoch (load_batch uses batch index << 20 | position).
pub fn load_sample(
    group: &DatasetGroup,
    dataset: usize,
    image: usize,
    slot: u64,
    ctx: &SampleContext,
) -> Result<Sample> {
    let ds =
        group.datasets.get(dataset).ok_or_else(|| DataError::Sampler(format!("no dataset {dataset}")))?;
    let entry = ds.images.get(image).ok_or_else(|| DataError::Sampler(format!("no image {image}")))?;
    let ss = ds
        .subsets
        .get(entry.subset)
        .map(|s| &s.spec)
        .ok_or_else(|| DataError::Sampler("no subset".into()))?;
    let mut rng = Streams::new(ctx.seed).sample(ctx.epoch, slot);
    let flipped = ss.flip_aug && rng.gen::<f64>() < 0.5;
    let mut img = decode(entry)?;
    let original = img.dimensions();
    let (bw, bh) = entry.bucket;
    let ltrb;
    if ds.spec.enable_bucket {
        let (rw, rh) = entry.resized_size;
        if (rw, rh) != original {
            img = resize(&img, rw, rh, entry_interp(ss)).map_err(|m| load_err(&entry.path, m))?;
        }
        let (w, h) = img.dimensions();
        let x = if w > bw {
            if ss.random_crop {
                rng.gen_range(0..=w - bw)
            } else {
                (w - bw) / 2
            }
        } else {
            0
        };
        let y = if h > bh {
            if ss.random_crop {
                rng.gen_range(0..=h - bh)
            } else {
                (h - bh) / 2
            }
        } else {
            0
        };
        img = crop(&img, x, y, bw.min(w), bh.min(h));
        ltrb = crop_ltrb(entry.bucket, original);
    } else {
        let face = match ss.face_crop_aug_range {
            Some(r) => face_crop(img.clone(), entry, ss, ds.spec.resolution, r, &mut rng)?,
            None => None,
        };
        img = match face {
            Some(f) => f,
            None => {
                let (w, h) = img.dimensions();
                let (tw, th) = ds.spec.resolution;
                let y = if h > th { rng.gen_range(0..=h - th) } else { 0 };
                let x = if w > tw { rng.gen_range(0..=w - tw) } else { 0 };
                crop(&img, x, y, tw.min(w), th.min(h))
            }
        };
        ltrb = (0.0, 0.0, 0.0, 0.0);
    }
    if img.dimensions() != entry.bucket {
        return Err(load_err(
            &entry.path,
            format!("internal size mismatch: got {:?}, bucket is {:?}", img.dimensions(), entry.bucket),
        ));
    }
    if ss.color_aug {
        color_aug(&mut img, &mut rng);
    }
    if flipped {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut pixels = vec![0f32; 3 * plane];
    let mut mask = if ss.alpha_mask { Some(vec![1f32; plane]) } else { None };
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            // torchvision Normalize([0.5], [0.5]) after ToTensor.
            pixels[c * plane + i] = (p.0[c] as f32 / 255.0 - 0.5) / 0.5;
        }
        if let Some(m) = mask.as_mut() {
            if entry.has_alpha {
                m[i] = p.0[3] as f32 / 255.0;
            }
        }
    }
    let caption_ctx =
        CaptionContext { epoch: ctx.epoch, step: ctx.step, max_train_steps: ctx.max_train_steps };
    let caption = process_caption(&ss.caption, &entry.caption, caption_ctx, &mut rng);
    Ok(Sample {
        width: w,
        height: h,
        pixels,
        mask,
        caption,
        loss_weight: if entry.is_reg { ds.spec.prior_loss_weight as f32 } else { 1.0 },
        is_reg: entry.is_reg,
        flipped,
        original_size: original,
        crop_ltrb: ltrb,
    })
}

/// Loads a whole batch in parallel. `batch_index` is its index within the epoch.
pub fn load_batch(
    group: &DatasetGroup,
    batch: &BatchRef,
    batch_index: usize,
    ctx: &SampleContext,
) -> Result<Batch> {
    let samples: Vec<Sample> = batch
        .images
        .par_iter()
        .enumerate()
        .map(|(k, &img)| load_sample(group, batch.dataset, img, ((batch_index as u64) << 20) | k as u64, ctx))
        .collect::<Result<_>>()?;
    let (width, height) = samples.first().map(|s| (s.width, s.height)).unwrap_or((0, 0));
    let mut pixels = Vec::with_capacity(samples.len() * samples.first().map_or(0, |s| s.pixels.len()));
    for s in &samples {
        pixels.extend_from_slice(&s.pixels);
    }
    let masks = if samples.iter().any(|s| s.mask.is_some()) {
        let plane = (width * height) as usize;
        let mut m = Vec::with_capacity(samples.len() * plane);
        for s in &samples {
            match &s.mask {
                Some(x) => m.extend_from_slice(x),
                None => m.extend(std::iter::repeat_n(1.0, plane)),
            }
        }
        Some(m)
    } else {
        None
    };
    Ok(Batch {
        width,
        height,
        pixels,
        masks,
        captions: samples.iter().map(|s| s.caption.clone()).collect(),
        loss_weights: samples.iter().map(|s| s.loss_weight).collect(),
        samples,
    })
}
