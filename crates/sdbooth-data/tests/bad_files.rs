//! The upfront check: every problem in one report, or skipped with skip_bad_images.

use std::fs;
use std::path::Path;

use sdbooth_data::{prepare_datasets, DataError, DatasetOptions};

fn png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30])).save(path).expect("write png");
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A valid small PNG whose header claims 20000 x 20000 pixels.
fn bomb_png(path: &Path) {
    png(path, 8, 8);
    let mut b = fs::read(path).expect("read");
    // IHDR data starts at 16 (8 signature + 4 length + 4 type); CRC covers type + 13 data bytes.
    b[16..20].copy_from_slice(&20000u32.to_be_bytes());
    b[20..24].copy_from_slice(&20000u32.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    fs::write(path, b).expect("write");
}

/// Legacy layout with good images and one file of each bad kind.
fn layout(root: &Path) -> std::path::PathBuf {
    let sub = root.join("train/3_sks dog");
    fs::create_dir_all(&sub).expect("mkdir");
    png(&sub.join("good1.png"), 320, 256);
    png(&sub.join("good2.png"), 256, 320);
    // a JPEG named .png: a warning only
    image::RgbImage::from_pixel(300, 300, image::Rgb([1, 2, 3]))
        .save_with_format(sub.join("jpeg_named.png"), image::ImageFormat::Jpeg)
        .expect("jpeg");
    fs::write(sub.join("empty.png"), b"").expect("empty"); // 1: 0 bytes
    png(&sub.join("trunc.png"), 300, 300);
    let full = fs::read(sub.join("trunc.png")).expect("read");
    fs::write(sub.join("trunc.png"), &full[..full.len() / 2]).expect("truncate"); // 2: truncated
    fs::write(sub.join("notes.jpg"), b"this is text, not a picture").expect("text"); // 3: not an image
    bomb_png(&sub.join("bomb.png")); // 4: decompression bomb
    fs::write(sub.join("._good1.png"), b"\x00\x05\x16\x07AppleDouble").expect("appledouble"); // 5: ._*
    fs::create_dir_all(sub.join("__MACOSX")).expect("macosx"); // 6: __MACOSX
    image::RgbImage::from_pixel(300, 300, image::Rgb([1, 2, 3]))
        .save_with_format(sub.join("cut.jpg"), image::ImageFormat::Jpeg)
        .expect("jpeg");
    let full = fs::read(sub.join("cut.jpg")).expect("read");
    fs::write(sub.join("cut.jpg"), &full[..full.len() - 40]).expect("cut jpeg"); // 7: truncated JPEG
    root.join("train")
}

fn opts(train: &Path) -> DatasetOptions {
    DatasetOptions {
        train_data_dir: Some(train.to_string_lossy().into_owned()),
        resolution: Some("256".into()),
        enable_bucket: true,
        min_bucket_reso: 128,
        max_bucket_reso: 512,
        ..Default::default()
    }
}

#[test]
fn all_bad_files_are_reported_together() {
    let tmp = tempfile::tempdir().expect("tmp");
    let train = layout(tmp.path());
    let err = prepare_datasets(None, &opts(&train), tmp.path()).expect_err("must fail");
    let DataError::BadFiles(bad) = &err else { panic!("wrong error: {err}") };
    let named = |f: &str| bad.0.iter().any(|b| b.path.file_name().is_some_and(|n| n == f));
    for f in ["empty.png", "trunc.png", "notes.jpg", "bomb.png", "._good1.png", "__MACOSX", "cut.jpg"] {
        assert!(named(f), "{f} missing from report:\n{err}");
    }
    assert_eq!(bad.0.len(), 7, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("0 bytes") && text.contains("decompression bomb") && text.contains("not an image"),
        "{text}"
    );
    assert!(!named("good1.png") && !named("jpeg_named.png"), "{text}");
}

#[test]
fn skip_bad_images_trains_on_the_rest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let train = layout(tmp.path());
    let o = DatasetOptions { skip_bad_images: true, ..opts(&train) };
    let g = prepare_datasets(None, &o, tmp.path()).expect("continues");
    let names: Vec<String> = g.datasets[0]
        .images
        .iter()
        .map(|i| i.path.file_name().unwrap_or_default().to_string_lossy().into())
        .collect();
    assert_eq!(names, vec!["good1.png", "good2.png", "jpeg_named.png"]);
    assert_eq!(g.skipped.len(), 7);
    assert_eq!(g.datasets[0].num_train_images, 9);
    assert!(g.image_warnings.iter().any(|w| w.path.ends_with("jpeg_named.png") && w.cause.contains("JPEG")));
}

#[test]
fn missing_dir_and_empty_dataset_are_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let toml = tmp.path().join("d.toml");
    fs::write(&toml, "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = \"nope\"\n")
        .expect("w");
    let err = prepare_datasets(Some(&toml), &DatasetOptions::default(), tmp.path()).expect_err("missing dir");
    assert!(err.to_string().contains("nope") && err.to_string().contains("does not exist"), "{err}");

    fs::create_dir_all(tmp.path().join("empty")).expect("mkdir");
    fs::write(&toml, "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = \"empty\"\n")
        .expect("w");
    let err = prepare_datasets(Some(&toml), &DatasetOptions::default(), tmp.path()).expect_err("empty");
    assert!(matches!(err, DataError::EmptyDataset { .. }), "{err}");
}

#[test]
fn captions_first_line_class_token_fallback_unused_txt_and_empty_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("imgs");
    fs::create_dir_all(&d).expect("mkdir");
    for n in ["a", "b", "c"] {
        png(&d.join(format!("{n}.png")), 256, 256);
    }
    fs::write(d.join("a.caption"), "first line, tags\r\nsecond line\n").expect("w");
    fs::write(d.join("b.txt"), "unused txt caption").expect("w");
    let toml = tmp.path().join("d.toml");
    fs::write(
        &toml,
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = \"imgs\"\nclass_tokens = \"sks dog\"\n",
    )
    .expect("w");
    let g = prepare_datasets(Some(&toml), &DatasetOptions::default(), tmp.path()).expect("ok");
    let caps: Vec<&str> = g.datasets[0].images.iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(caps, vec!["first line, tags", "sks dog", "sks dog"]);
    assert!(g.notes.iter().any(|n| n.contains("NOT used") && n.contains("b.txt")), "{:?}", g.notes);

    fs::write(d.join("c.caption"), "").expect("w");
    let err =
        prepare_datasets(Some(&toml), &DatasetOptions::default(), tmp.path()).expect_err("empty caption");
    assert!(err.to_string().contains("c.caption is empty"), "{err}");
}
