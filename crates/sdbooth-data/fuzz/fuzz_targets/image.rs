//! Any bytes as an image file (PNG, JPEG, WebP, BMP, GIF, TIFF by content), through the upfront
//! check (header, decompression-bomb and resize bounds, full decode), bucketing, and the training
//! loader (EXIF orientation, resize, crop, flip, colour augmentation, alpha mask): Ok or Err,
//! never a panic, an abort or an allocation past what the header allows.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use sdbooth_data::{load_sample, prepare_datasets, DatasetOptions, SampleContext};

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch();
    let folder = dir.join(format!("image{}", std::process::id())).join("1_sks");
    if std::fs::create_dir_all(&folder).is_err() {
        return;
    }
    let mut k = common::Knobs { bytes: data };
    let knobs = k.u8();
    let bit = |n: u8| knobs & (1 << n) != 0;
    let opts = DatasetOptions {
        train_data_dir: folder.parent().map(|p| p.display().to_string()),
        resolution: Some("64".into()),
        enable_bucket: bit(0),
        bucket_no_upscale: bit(1),
        min_bucket_reso: 64,
        max_bucket_reso: 256,
        flip_aug: bit(2),
        color_aug: bit(3),
        random_crop: bit(4),
        alpha_mask: bit(5),
        ignore_exif_orientation: bit(6),
        face_crop_aug_range: bit(7).then(|| "1.0,2.0".into()),
        ..Default::default()
    };
    let name = ["x.png", "x.jpg", "x.webp", "x.bmp"][k.u8() as usize % 4];
    for old in ["x.png", "x.jpg", "x.webp", "x.bmp"] {
        let _ = std::fs::remove_file(folder.join(old));
    }
    if std::fs::write(folder.join(name), k.rest()).is_err() {
        return;
    }
    let Ok(group) = prepare_datasets(None, &opts, std::path::Path::new("/")) else { return };
    let ctx = SampleContext { seed: 3, epoch: 1, step: 0, max_train_steps: 1 };
    let _ = load_sample(&group, 0, 0, 0, &ctx);
});
