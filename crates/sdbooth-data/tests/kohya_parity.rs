//! Bucket parity: kohya's own dataset code (tools/kohya_dataset/make_fixtures.py) decided each
//! image's bucket, the bucket counts, the reg balancing and the batches per epoch for these
//! image sets; sdbooth-data must decide the same.

use std::path::{Path, PathBuf};

use sdbooth_data::{prepare_datasets, step_plan, DatasetOptions};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pair(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap_or(0) as u32, v[1].as_u64().unwrap_or(0) as u32)
}

fn check_case(name: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kohya_dataset").join(name);
    let text = std::fs::read_to_string(fixture.join("kohya.json")).expect("fixture json");
    let k: Value = serde_json::from_str(&text).expect("fixture parses");
    let case_dir = repo_root().join(k["case_dir"].as_str().expect("case_dir"));
    let opts: DatasetOptions = serde_json::from_value(k["options"].clone()).expect("options");
    let config = k["config"].as_str().map(|c| case_dir.join(c));
    let group = prepare_datasets(config.as_deref(), &opts, &case_dir)
        .unwrap_or_else(|e| panic!("{name}: building the dataset failed: {e}"));

    let kd = k["datasets"].as_array().expect("datasets");
    assert_eq!(group.datasets.len(), kd.len(), "{name}: dataset count");
    for (di, (ours, theirs)) in group.datasets.iter().zip(kd).enumerate() {
        let mut imgs: Vec<_> = ours
            .images
            .iter()
            .map(|i| {
                let rel = i.path.strip_prefix(&case_dir).unwrap_or(&i.path).to_string_lossy().into_owned();
                (rel, i)
            })
            .collect();
        imgs.sort_by(|a, b| a.0.cmp(&b.0));
        let ki = theirs["images"].as_array().expect("images");
        let our_paths: Vec<&str> = imgs.iter().map(|(p, _)| p.as_str()).collect();
        let their_paths: Vec<&str> = ki.iter().map(|i| i["path"].as_str().unwrap_or("")).collect();
        assert_eq!(our_paths, their_paths, "{name}[{di}]: registered images");
        for ((path, ours), theirs) in imgs.iter().zip(ki) {
            let ctx = format!("{name}[{di}] {path}");
            assert_eq!(ours.size, pair(&theirs["size"]), "{ctx}: size");
            assert_eq!(ours.bucket, pair(&theirs["bucket"]), "{ctx}: bucket");
            assert_eq!(ours.resized_size, pair(&theirs["resized_size"]), "{ctx}: resized size");
            assert_eq!(
                ours.num_repeats as u64,
                theirs["num_repeats"].as_u64().unwrap_or(0),
                "{ctx}: repeats"
            );
            assert_eq!(ours.is_reg, theirs["is_reg"].as_bool().unwrap_or(false), "{ctx}: is_reg");
            assert_eq!(ours.caption, theirs["caption"].as_str().unwrap_or(""), "{ctx}: caption");
        }
        let our_buckets: Vec<(u32, u32, usize)> = ours
            .buckets
            .iter()
            .filter(|b| !b.items.is_empty())
            .map(|b| (b.reso.0, b.reso.1, b.items.len()))
            .collect();
        let their_buckets: Vec<(u32, u32, usize)> = theirs["buckets"]
            .as_array()
            .expect("buckets")
            .iter()
            .map(|b| {
                (
                    b[0].as_u64().unwrap_or(0) as u32,
                    b[1].as_u64().unwrap_or(0) as u32,
                    b[2].as_u64().unwrap_or(0) as usize,
                )
            })
            .collect();
        assert_eq!(our_buckets, their_buckets, "{name}[{di}]: bucket counts");
        assert_eq!(
            ours.num_train_images,
            theirs["num_train_images"].as_u64().unwrap_or(0),
            "{name}[{di}]: train"
        );
        assert_eq!(ours.num_reg_images, theirs["num_reg_images"].as_u64().unwrap_or(0), "{name}[{di}]: reg");
        assert_eq!(
            ours.batches_per_epoch() as u64,
            theirs["batches_per_epoch"].as_u64().unwrap_or(0),
            "{name}[{di}]: batches"
        );
        let mut counts: Vec<u64> =
            ours.subsets.iter().filter(|s| s.ignored.is_none()).map(|s| s.img_count as u64).collect();
        let mut their_counts: Vec<u64> = theirs["subset_image_counts"]
            .as_array()
            .expect("counts")
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        if k["config"].is_null() {
            // Legacy folders: kohya takes them in filesystem order, we sort them (documented).
            counts.sort();
            their_counts.sort();
        }
        assert_eq!(counts, their_counts, "{name}[{di}]: subset image counts");
    }
    let bpe = group.batches_per_epoch() as u64;
    assert_eq!(bpe, k["batches_per_epoch"].as_u64().unwrap_or(0), "{name}: batches per epoch");
    let plan =
        step_plan(bpe, opts.gradient_accumulation_steps, opts.max_train_steps, opts.max_train_epochs, 1);
    assert_eq!(plan.max_train_steps, k["max_train_steps"].as_u64().unwrap_or(0), "{name}: max_train_steps");
    assert_eq!(plan.num_epochs, k["num_epochs"].as_u64().unwrap_or(0), "{name}: epochs");
}

#[test]
fn parity_toy_example() {
    check_case("toy");
}

#[test]
fn parity_bucket_no_upscale() {
    check_case("bucket_no_upscale");
}

#[test]
fn parity_nonsquare_resolution_768x512() {
    check_case("nonsquare_768x512");
}

#[test]
fn parity_aspect_ratio_ties() {
    check_case("aspect_ties");
}

#[test]
fn parity_more_reg_than_train() {
    check_case("reg_more_than_train");
}

#[test]
fn parity_fewer_reg_than_train() {
    check_case("reg_fewer_than_train");
}

#[test]
fn parity_legacy_folder_layout() {
    check_case("legacy_folders");
}

#[test]
fn parity_two_datasets_in_one_toml() {
    check_case("two_datasets");
}

#[test]
fn parity_validation_split_with_seed() {
    check_case("validation_split_seeded");
}
