//! Dataset TOML errors (file, line, key, "did you mean"), fallback order, loading samples and
//! the deterministic sampler, on examples/toy and small temporary layouts.

use std::fs;
use std::path::{Path, PathBuf};

use sdbooth_data::{
    load_batch, load_dataset_config, prepare_datasets, DataError, DatasetOptions, DryRunReport,
    SampleContext, Sampler,
};

fn toy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy")
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("dataset.toml");
    fs::write(&p, text).expect("write toml");
    p
}

#[test]
fn unknown_key_names_file_line_and_nearest_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let p = write(
        tmp.path(),
        "[general]\nenable_bucket = true\n\n[[datasets]]\nresolution = 512\nbatch_szie = 2\n",
    );
    let err = load_dataset_config(&p, &DatasetOptions::default(), tmp.path()).expect_err("unknown key");
    let msg = err.to_string();
    assert!(matches!(err, DataError::ConfigUnknownKey { line: 6, .. }), "{msg}");
    assert!(
        msg.contains("dataset.toml:6")
            && msg.contains("batch_szie")
            && msg.contains("did you mean `batch_size`"),
        "{msg}"
    );
}

#[test]
fn wrong_type_wrong_level_missing_image_dir_and_syntax() {
    let tmp = tempfile::tempdir().expect("tmp");
    let o = DatasetOptions::default();
    let p = write(tmp.path(), "[general]\nflip_aug = \"yes\"\n");
    let msg = load_dataset_config(&p, &o, tmp.path()).expect_err("type").to_string();
    assert!(msg.contains(":2:") && msg.contains("flip_aug") && msg.contains("boolean"), "{msg}");

    let p = write(tmp.path(), "[general]\nalpha_mask = true\n");
    let msg = load_dataset_config(&p, &o, tmp.path()).expect_err("level").to_string();
    assert!(msg.contains("alpha_mask") && msg.contains("[[datasets.subsets]]"), "{msg}");

    let p = write(tmp.path(), "[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  num_repeats = 3\n");
    let msg = load_dataset_config(&p, &o, tmp.path()).expect_err("missing").to_string();
    assert!(msg.contains("image_dir") && msg.contains(":3:"), "{msg}");

    let p = write(tmp.path(), "[general]\nresolution = \n");
    let err = load_dataset_config(&p, &o, tmp.path()).expect_err("syntax");
    assert!(matches!(err, DataError::ConfigSyntax { line: 2, .. }), "{err}");

    let p = write(
        tmp.path(),
        "[general]\nresolution = 512\nenable_bucket = true\nbucket_reso_steps = 32\n[[datasets]]\n",
    );
    let msg = load_dataset_config(&p, &o, tmp.path()).expect_err("steps").to_string();
    assert!(msg.contains("bucket_reso_steps") && msg.contains("64"), "{msg}");
}

#[test]
fn fallback_order_subset_dataset_general_cli_default() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(tmp.path().join("a")).expect("mkdir");
    let p = write(
        tmp.path(),
        "[general]\nflip_aug = true\nkeep_tokens = 1\ncolor_aug = true\n\n[[datasets]]\nresolution = [768, 512]\n\
         keep_tokens = 2\n  [[datasets.subsets]]\n  image_dir = \"a\"\n  keep_tokens = 3\n  caption_extension = \"txt\"\n\
         \n  [[datasets.subsets]]\n  image_dir = \"a2\"\n  color_aug = false\n",
    );
    let o = DatasetOptions { shuffle_caption: true, train_batch_size: 4, ..Default::default() };
    let spec = load_dataset_config(&p, &o, tmp.path()).expect("loads");
    let ds = &spec.datasets[0];
    assert_eq!(ds.resolution, (768, 512));
    assert_eq!(ds.batch_size, 4, "command line");
    assert_eq!(ds.min_bucket_reso, 256, "default");
    let (a, b) = (&ds.subsets[0], &ds.subsets[1]);
    assert_eq!((a.caption.keep_tokens, b.caption.keep_tokens), (3, 2), "subset, then dataset");
    assert!(a.flip_aug && a.color_aug && !b.color_aug, "general, subset override");
    assert!(a.caption.shuffle_caption, "command line");
    assert_eq!(a.caption_extension, ".txt", "kohya adds the dot");
}

#[test]
fn image_dir_beside_the_toml_is_used_with_a_note() {
    let tmp = tempfile::tempdir().expect("tmp");
    let p = toy().join("dataset.toml");
    let spec = load_dataset_config(&p, &DatasetOptions::default(), tmp.path()).expect("loads");
    assert!(spec.datasets[0].subsets[0].image_dir.ends_with("examples/toy/instance"));
    assert!(spec.notes.iter().any(|n| n.contains("beside the TOML")), "{:?}", spec.notes);
}

#[test]
fn legacy_requires_resolution_and_skips_unnumbered_folders() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(tmp.path().join("t/notes")).expect("mkdir");
    fs::create_dir_all(tmp.path().join("t/2_sks dog")).expect("mkdir");
    image::RgbImage::new(256, 256).save(tmp.path().join("t/2_sks dog/x.png")).expect("png");
    let o = DatasetOptions { train_data_dir: Some("t".into()), ..Default::default() };
    let err = prepare_datasets(None, &o, tmp.path()).expect_err("no resolution");
    assert!(err.to_string().contains("--resolution"), "{err}");
    let o = DatasetOptions { resolution: Some("256".into()), ..o };
    let g = prepare_datasets(None, &o, tmp.path()).expect("ok");
    assert_eq!(g.datasets[0].images[0].caption, "sks dog");
    assert_eq!(g.datasets[0].num_train_images, 2);
    assert!(g.notes.iter().any(|n| n.contains("notes")), "{:?}", g.notes);
}

#[test]
fn toy_batches_load_to_bucket_size_in_range_and_deterministically() {
    let toy = toy();
    let o = DatasetOptions { flip_aug: true, ..Default::default() };
    let g = prepare_datasets(Some(&toy.join("dataset.toml")), &o, &toy).expect("toy builds");
    let report = DryRunReport::new(&g, &o);
    let text = report.to_text();
    assert!(text.contains("bucket 1: resolution (128, 128), count: 72"), "{text}");
    assert!(text.contains("50 train images with repeats"), "{text}");
    assert!(report.to_json().contains("\"bucket\""));
    assert!(g.image_warnings.iter().any(|w| w.path.ends_with("sks_05.png")), "JPEG named .png");

    let mut s = Sampler::new(&g, 42);
    let (epoch, idx, batch) = s.next_batch(&g).expect("a batch");
    assert_eq!((epoch, idx), (1, 0));
    let ctx = SampleContext { seed: 42, epoch, step: 0, max_train_steps: 200 };
    let b = load_batch(&g, &batch, idx, &ctx).expect("loads");
    let reso = g.datasets[0].buckets[batch.bucket].reso;
    assert_eq!((b.width, b.height), reso);
    assert_eq!(b.pixels.len(), 3 * (reso.0 * reso.1) as usize);
    assert!(b.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(b.pixels.iter().any(|v| *v < 0.0) && b.pixels.iter().any(|v| *v > 0.0));
    let again = load_batch(&g, &batch, idx, &ctx).expect("loads");
    assert_eq!(b.pixels, again.pixels, "same seed, same pixels");
    assert!(b.masks.is_none());
}

#[test]
fn sampler_covers_every_item_each_epoch_and_resumes_exactly() {
    let toy = toy();
    let o = DatasetOptions::default();
    let g = prepare_datasets(Some(&toy.join("dataset.toml")), &o, &toy).expect("toy builds");
    let e1 = g.epoch_batches(7, 1);
    assert_eq!(e1.len(), g.batches_per_epoch());
    let mut seen: Vec<usize> = e1.iter().flat_map(|b| b.images.clone()).collect();
    seen.sort();
    let mut want: Vec<usize> = g.datasets[0].buckets.iter().flat_map(|b| b.items.clone()).collect();
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(e1, g.epoch_batches(7, 1));
    assert_ne!(e1, g.epoch_batches(7, 2));
    assert_ne!(e1, g.epoch_batches(8, 1));

    let mut a = Sampler::new(&g, 7);
    for _ in 0..130 {
        a.next_batch(&g);
    }
    let state = a.state();
    assert_eq!((state.epoch, state.next_batch), (2, 30));
    let mut b =
        Sampler::resume(&g, serde_json::from_str(&serde_json::to_string(&state).expect("ser")).expect("de"));
    for _ in 0..50 {
        assert_eq!(a.next_batch(&g), b.next_batch(&g));
    }
}

#[test]
fn alpha_mask_comes_from_the_alpha_channel() {
    let tmp = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(tmp.path().join("a")).expect("mkdir");
    let mut img = image::RgbaImage::from_pixel(256, 256, image::Rgba([200, 10, 10, 255]));
    for y in 0..256 {
        for x in 0..128 {
            img.put_pixel(x, y, image::Rgba([200, 10, 10, 0]));
        }
    }
    img.save(tmp.path().join("a/m.png")).expect("png");
    let p = write(
        tmp.path(),
        "[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = \"a\"\nalpha_mask = true\n",
    );
    let g = prepare_datasets(Some(&p), &DatasetOptions::default(), tmp.path()).expect("ok");
    let batch = g.epoch_batches(0, 1).remove(0);
    let b = load_batch(&g, &batch, 0, &SampleContext { seed: 0, epoch: 1, step: 0, max_train_steps: 1 })
        .expect("ok");
    let m = b.masks.expect("mask");
    assert_eq!(m.len(), 256 * 256);
    assert_eq!((m[0], m[255]), (0.0, 1.0));
}

#[test]
fn inline_tables_and_top_level_slips() {
    let tmp = tempfile::tempdir().expect("tmp");
    let p = write(
        tmp.path(),
        "datasets = [{ resolution = 320, subsets = [{ image_dir = \"x\", num_repeats = 4 }, { image_dir = \"y\", is_reg = true }] }]\n",
    );
    let spec = load_dataset_config(&p, &DatasetOptions::default(), tmp.path()).expect("inline form loads");
    let ds = &spec.datasets[0];
    assert_eq!(ds.resolution, (320, 320));
    assert_eq!((ds.subsets[0].num_repeats, ds.subsets[1].is_reg), (4, true));

    let p = write(tmp.path(), "enable_bucket = true\n");
    let msg =
        load_dataset_config(&p, &DatasetOptions::default(), tmp.path()).expect_err("top level").to_string();
    assert!(msg.contains("[general] enable_bucket"), "{msg}");
}
