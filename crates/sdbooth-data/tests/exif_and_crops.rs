//! EXIF orientation (applied, listed, or ignored as kohya), cropping without buckets (random
//! crop, face crop) and flip/colour augmentation keeping sizes and value ranges.

use std::fs;
use std::path::Path;

use sdbooth_data::{load_batch, prepare_datasets, DataError, DatasetOptions, DryRunReport, SampleContext};

/// A JPEG with an EXIF APP1 segment carrying `orientation`.
fn jpeg_with_orientation(path: &Path, w: u32, h: u32, orientation: u16) {
    let mut buf = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_fn(w, h, |x, _| image::Rgb([(x % 256) as u8, 80, 160]))
        .write_to(&mut buf, image::ImageFormat::Jpeg)
        .expect("encode");
    let jpg = buf.into_inner();
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpg[2..]);
    fs::write(path, out).expect("write");
}

fn toml(dir: &Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join("d.toml");
    fs::write(&p, format!("[[datasets]]\n{extra}\n[[datasets.subsets]]\nimage_dir = \"a\"\n")).expect("w");
    p
}

#[test]
fn exif_rotation_is_applied_and_listed_unless_ignored() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(tmp.path().join("a")).expect("mkdir");
    jpeg_with_orientation(&tmp.path().join("a/phone.jpg"), 384, 256, 6); // 6 = rotate 90 clockwise
    let p = toml(
        tmp.path(),
        "resolution = 256\nenable_bucket = true\nmin_bucket_reso = 128\nmax_bucket_reso = 512",
    );
    let o = DatasetOptions::default();
    let g = prepare_datasets(Some(&p), &o, tmp.path()).expect("ok");
    let img = &g.datasets[0].images[0];
    assert_eq!(img.size, (256, 384));
    assert_eq!(img.orientation.as_deref(), Some("Rotate90"));
    assert_eq!(g.rotated.len(), 1);
    assert!(DryRunReport::new(&g, &o).to_text().contains("EXIF orientation applied to 1 image"));
    let batch = g.epoch_batches(1, 1).remove(0);
    let b = load_batch(&g, &batch, 0, &SampleContext { seed: 1, epoch: 1, step: 0, max_train_steps: 1 })
        .expect("ok");
    assert!(b.height > b.width, "portrait after rotation: {}x{}", b.width, b.height);

    let o = DatasetOptions { ignore_exif_orientation: true, ..Default::default() };
    let g = prepare_datasets(Some(&p), &o, tmp.path()).expect("ok");
    assert_eq!(g.datasets[0].images[0].size, (384, 256));
    assert!(g.rotated.is_empty());
}

#[test]
fn without_buckets_large_images_need_random_crop_and_small_ones_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(tmp.path().join("a")).expect("mkdir");
    image::RgbImage::from_pixel(320, 300, image::Rgb([9, 9, 9]))
        .save(tmp.path().join("a/big.png"))
        .expect("png");
    let p = toml(tmp.path(), "resolution = 256");
    let err = prepare_datasets(Some(&p), &DatasetOptions::default(), tmp.path()).expect_err("needs crop");
    assert!(matches!(err, DataError::ImageLoad { .. }) && err.to_string().contains("random_crop"), "{err}");

    let o = DatasetOptions { random_crop: true, color_aug: true, flip_aug: true, ..Default::default() };
    let g = prepare_datasets(Some(&p), &o, tmp.path()).expect("ok with random_crop");
    let batch = g.epoch_batches(3, 1).remove(0);
    for epoch in 1..4 {
        let ctx = SampleContext { seed: 3, epoch, step: 0, max_train_steps: 1 };
        let b = load_batch(&g, &batch, 0, &ctx).expect("loads");
        assert_eq!((b.width, b.height), (256, 256));
        assert!(b.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    image::RgbImage::from_pixel(200, 300, image::Rgb([9, 9, 9]))
        .save(tmp.path().join("a/small.png"))
        .expect("png");
    let err = prepare_datasets(Some(&p), &o, tmp.path()).expect_err("too small");
    assert!(err.to_string().contains("smaller than the resolution"), "{err}");
}

#[test]
fn face_crop_centres_on_the_face_from_the_file_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(tmp.path().join("a")).expect("mkdir");
    // A 512x512 image, face at (400, 100) of size 64: white square there, black elsewhere.
    let img = image::RgbImage::from_fn(512, 512, |x, y| {
        if (368..432).contains(&x) && (68..132).contains(&y) {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    });
    img.save(tmp.path().join("a/me_400_100_64_64.png")).expect("png");
    let p = toml(tmp.path(), "resolution = 128");
    let o = DatasetOptions { face_crop_aug_range: Some("1.0,1.0".into()), ..Default::default() };
    let g = prepare_datasets(Some(&p), &o, tmp.path()).expect("ok");
    let batch = g.epoch_batches(0, 1).remove(0);
    let b = load_batch(&g, &batch, 0, &SampleContext { seed: 0, epoch: 1, step: 0, max_train_steps: 1 })
        .expect("ok");
    assert_eq!((b.width, b.height), (128, 128));
    // range 1.0 asks for scale 2 (face = short side); kohya caps it at 1, so the 128x128 crop is
    // cut around the face at (400, 100) and holds all of it.
    let white = b.pixels[..128 * 128].iter().filter(|v| **v > 0.9).count();
    assert_eq!(white, 64 * 64, "the face should be in the crop, {white} white pixels");
}

#[test]
fn cache_latents_with_color_aug_is_refused_as_kohya_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(tmp.path().join("a")).expect("mkdir");
    image::RgbImage::from_pixel(256, 256, image::Rgb([9, 9, 9]))
        .save(tmp.path().join("a/x.png"))
        .expect("png");
    let p = toml(tmp.path(), "resolution = 256");
    let o = DatasetOptions { cache_latents: true, color_aug: true, ..Default::default() };
    let err = prepare_datasets(Some(&p), &o, tmp.path()).expect_err("refused");
    assert!(err.to_string().contains("cache_latents"), "{err}");
}
