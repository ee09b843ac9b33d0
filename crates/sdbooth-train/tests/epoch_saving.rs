//! Epoch-wise saving with kohya's names and pruning: every n epochs but the last, which the final
//! save covers; `--save_last_n_epochs` deletes older files; `--save_n_epoch_ratio`.

use std::path::Path;

use sdbooth_train::args::TrainArgs;
use sdbooth_train::trainer::train_checked;

fn dataset(dir: &Path) -> std::path::PathBuf {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    let toml = format!(
        "[general]\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n\n[[datasets]]\nresolution = 128\n\
         batch_size = 1\n\n  [[datasets.subsets]]\n  image_dir = \"{}\"\n  class_tokens = \"sks dog\"\n  num_repeats = 1\n",
        toy.join("instance").display()
    );
    let path = dir.join("dataset.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn files(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    v.sort();
    v
}

fn train(toml: &Path, out: &Path, extra: &[&str]) {
    let mut v: Vec<String> =
        ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--save_model_as", "safetensors"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    v.extend(
        ["--max_train_epochs", "3", "--output_name", "m", "--cache_latents"].iter().map(|s| s.to_string()),
    );
    v.extend(["--dataset_config".to_string(), toml.display().to_string()]);
    v.extend(["--output_dir".to_string(), out.display().to_string()]);
    v.extend(extra.iter().map(|s| s.to_string()));
    train_checked(&TrainArgs::try_parse_from(v).unwrap()).expect("trains");
}

#[test]
fn every_epoch_but_the_last_then_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dataset(dir.path());
    let a = dir.path().join("a");
    train(&toml, &a, &["--save_every_n_epochs", "1"]);
    assert_eq!(files(&a), ["m-000001.safetensors", "m-000002.safetensors", "m.safetensors"]);
    let b = dir.path().join("b");
    train(&toml, &b, &["--save_every_n_epochs", "1", "--save_last_n_epochs", "1"]);
    assert_eq!(files(&b), ["m-000002.safetensors", "m.safetensors"]);
    let c = dir.path().join("c");
    train(&toml, &c, &["--save_n_epoch_ratio", "3"]);
    assert_eq!(files(&c), ["m-000001.safetensors", "m-000002.safetensors", "m.safetensors"]);
}
