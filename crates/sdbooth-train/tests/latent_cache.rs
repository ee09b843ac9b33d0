//! `--cache_latents_to_disk`: the same latents as the in-memory cache (so the same training),
//! reused on the next run, re-encoded when the image changes.

use std::path::Path;

use sdbooth_train::args::TrainArgs;
use sdbooth_train::trainer::train_checked;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else if !p.to_string_lossy().ends_with(".sdbooth-latents.safetensors") {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

fn run(toml: &Path, out: &Path, extra: &[&str]) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<String> = [
        "--pretrained_model_name_or_path",
        "builtin:tiny-sd1",
        "--save_model_as",
        "safetensors",
        "--seed",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(
        ["--max_train_steps", "3", "--output_name", "m", "--learning_rate", "1e-4"]
            .iter()
            .map(|s| s.to_string()),
    );
    v.extend(["--dataset_config".to_string(), toml.display().to_string()]);
    v.extend(["--output_dir".to_string(), out.display().to_string()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    train_checked(&TrainArgs::try_parse_from(v).unwrap()).expect("trains");
    let map = candle_core::safetensors::load(out.join("m.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut t: Vec<(String, Vec<f32>)> =
        map.into_iter().map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap())).collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn disk_cache_matches_memory_cache_and_is_invalidated_by_a_changed_image() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("toy");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy"), &data);
    let toml = data.join("dataset.toml");
    let memory = run(&toml, &dir.path().join("a"), &["--cache_latents"]);
    let first = run(&toml, &dir.path().join("b"), &["--cache_latents_to_disk", "--vae_batch_size", "3"]);
    let cache_file = data.join("instance/sks_01.png.sdbooth-latents.safetensors");
    assert!(cache_file.is_file(), "no cache file beside the image");
    let written = std::fs::metadata(&cache_file).unwrap().modified().unwrap();
    let second = run(&toml, &dir.path().join("c"), &["--cache_latents_to_disk"]);
    assert!(memory == first && first == second, "disk-cached training differs from memory-cached");
    assert_eq!(
        std::fs::metadata(&cache_file).unwrap().modified().unwrap(),
        written,
        "a valid cache was rewritten"
    );

    // Touching the image (new modification time) invalidates its entry.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let img = data.join("instance/sks_01.png");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, bytes).unwrap();
    run(&toml, &dir.path().join("d"), &["--cache_latents_to_disk"]);
    assert_ne!(
        std::fs::metadata(&cache_file).unwrap().modified().unwrap(),
        written,
        "stale cache was reused"
    );
}

/// A bit flipped in a cached latent (disk corruption) is caught by the stored checksum and the
/// latent is encoded again, even with --skip_cache_check: training matches the in-memory cache.
#[test]
fn a_bit_flipped_disk_cache_is_encoded_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("toy");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy"), &data);
    let toml = data.join("dataset.toml");
    let memory = run(&toml, &dir.path().join("a"), &["--cache_latents"]);
    run(&toml, &dir.path().join("b"), &["--cache_latents_to_disk"]);
    let cache_file = data.join("instance/sks_01.png.sdbooth-latents.safetensors");
    let mut bytes = std::fs::read(&cache_file).unwrap();
    // The latent payload is the end of the file; flip the exponent's top bit of its last float.
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&cache_file, &bytes).unwrap();
    let again = run(&toml, &dir.path().join("c"), &["--cache_latents_to_disk", "--skip_cache_check"]);
    assert!(memory == again, "training used the damaged latent");
    assert_ne!(std::fs::read(&cache_file).unwrap(), bytes, "the damaged cache file was not rewritten");
}
