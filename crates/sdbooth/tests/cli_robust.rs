//! Issue 11, a new user's adversarial pass: bad flags, datasets and outputs are refused with a
//! message naming the flag, key, file or folder, before any model is loaded; never a panic, an
//! abort or an "internal error".

mod common;

use std::path::{Path, PathBuf};

use common::{files_under, mkdir, png, png_size, refused, sdbooth, tempdir, toy_train, write};

/// `instance/` with two 64×64 images and `reg/` with one.
fn small_dataset(root: &Path) {
    for d in ["instance", "reg"] {
        mkdir(&root.join(d));
    }
    png(&root.join("instance/a.png"), 64, 64);
    png(&root.join("instance/b.png"), 64, 64);
    png(&root.join("reg/c.png"), 64, 64);
}

fn dry_run_toml<'a>(toml: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--dry_run", "--dataset_config", toml];
    v.extend(extra);
    v
}

/// Item 9: bucket sizes of 0 (division by zero) and rates out of range, on the command line.
#[test]
fn command_line_dataset_values_are_validated_like_the_toml() {
    let dir = tempdir();
    small_dataset(dir.path());
    mkdir(&dir.path().join("legacy/3_sks"));
    png(&dir.path().join("legacy/3_sks/a.png"), 64, 64);
    let base = ["train", "--dry_run", "--train_data_dir", "legacy", "--resolution", "64", "--enable_bucket"];
    for (flag, value) in [
        ("--min_bucket_reso", "0"),
        ("--bucket_reso_steps", "0"),
        ("--max_bucket_reso", "0"),
        ("--caption_dropout_rate", "5"),
        ("--caption_tag_dropout_rate", "-0.5"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value]);
        let err = refused(dir.path(), &args);
        assert!(err.contains(&format!("{flag}: ")), "{flag} {value}: {err}");
    }
    // A minimum below the step rounded down to 0 and divided by it (found by fuzz/dataset_config).
    let mut args = base.to_vec();
    args.extend(["--bucket_reso_steps", "128", "--min_bucket_reso", "64"]);
    let err = refused(dir.path(), &args);
    assert!(err.contains("--min_bucket_reso: 64 is below bucket_reso_steps 128"), "{err}");
}

/// Item 10: repeat counts that cannot be represented or trained, from the TOML and folder names.
#[test]
fn huge_repeat_counts_are_refused_by_key_and_folder() {
    let dir = tempdir();
    small_dataset(dir.path());
    for n in ["9223372036854775807", "4294967297"] {
        let toml = format!(
            "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"instance\"\nnum_repeats = {n}\n"
        );
        write(&dir.path().join("d.toml"), &toml);
        let err = refused(dir.path(), &dry_run_toml("d.toml", &[]));
        assert!(err.contains("d.toml:5: key `num_repeats`"), "{n}: {err}");
    }
    for n in ["4294967297", "99999999999999999999999"] {
        let folder = dir.path().join(format!("legacy{n}/{n}_sks"));
        mkdir(&folder);
        png(&folder.join("a.png"), 64, 64);
        let data = format!("legacy{n}");
        let err =
            refused(dir.path(), &["train", "--dry_run", "--train_data_dir", &data, "--resolution", "64"]);
        assert!(err.contains(&format!("{n}_sks")) && err.contains("repeats"), "{n}: {err}");
    }
}

/// Item 11: a 1×10,000,000 PNG passes the pixel-count check but its bucket resize would need
/// gigabytes; it is refused from its header size, naming the file.
#[test]
fn an_extreme_aspect_ratio_is_refused_before_resizing() {
    let dir = tempdir();
    let folder = dir.path().join("data/1_sks");
    mkdir(&folder);
    let tall = folder.join("tall.png");
    let img = image::GrayImage::new(1, 10_000_000);
    if let Err(e) = img.save(&tall) {
        panic!("{e}");
    }
    let err = refused(
        dir.path(),
        &["train", "--dry_run", "--train_data_dir", "data", "--resolution", "512", "--enable_bucket"],
    );
    assert!(err.contains("tall.png") && err.contains("GiB"), "{err}");
}

/// Item 13: values that parse but cannot train are refused by flag, before the dataset or the
/// model is read.
#[test]
fn values_that_cannot_train_are_refused_by_flag() {
    let dir = tempdir();
    for (flag, value) in [
        ("--learning_rate", "-1"),
        ("--learning_rate", "nan"),
        ("--learning_rate", "inf"),
        ("--min_snr_gamma", "-5"),
        ("--noise_offset", "-0.1"),
        ("--max_grad_norm", "-1"),
        ("--prior_loss_weight", "-1"),
        ("--validation_split", "nan"),
        ("--validation_split", "inf"),
    ] {
        let eq = format!("{flag}={value}");
        let err = refused(
            dir.path(),
            &[
                "train",
                "--pretrained_model_name_or_path",
                "builtin:tiny-sd1",
                "--train_data_dir",
                "none",
                &eq,
            ],
        );
        assert!(err.contains(&format!("{flag}: ")), "{eq}: {err}");
    }
    // Item 19: the argparse spelling with a space reads the negative number too.
    let err = refused(dir.path(), &["train", "--learning_rate", "-1", "--train_data_dir", "none"]);
    assert!(err.contains("--learning_rate: must be a finite number >= 0, got -1"), "{err}");
}

/// Item 13: generate commands that would do nothing, or draw NaN images, say so.
#[test]
fn generate_refuses_what_would_make_nothing() {
    let dir = tempdir();
    let base = ["generate", "--ckpt", "builtin:tiny-sd1", "--outdir", "out", "--W", "64", "--H", "64"];
    let mut a = base.to_vec();
    a.extend(["--prompt", "a dog", "--images_per_prompt", "0"]);
    assert!(refused(dir.path(), &a).contains("--images_per_prompt 0"));
    write(&dir.path().join("empty.txt"), "# only a comment\n\n");
    let mut a = base.to_vec();
    a.extend(["--from_file", "empty.txt"]);
    assert!(refused(dir.path(), &a).contains("empty.txt: no prompt"));
    let mut a = base.to_vec();
    a.extend(["--prompt", "a dog", "--scale", "nan"]);
    assert!(refused(dir.path(), &a).contains("--scale NaN"));
    write(&dir.path().join("nan.txt"), "a dog --l nan\n");
    let mut a = base.to_vec();
    a.extend(["--from_file", "nan.txt"]);
    assert!(refused(dir.path(), &a).contains("prompt 1"));
    assert!(!dir.path().join("out").exists(), "generate wrote before refusing");
}

/// Item 14: kohya's Adafactor recipe trains; the schedulers not built are refused by name.
#[test]
fn lr_scheduler_adafactor_and_unbuilt_schedulers() {
    let dir = tempdir();
    let err =
        refused(dir.path(), &["train", "--lr_scheduler", "piecewise_constant", "--train_data_dir", "x"]);
    assert!(err.contains("--lr_scheduler piecewise_constant is not supported yet"), "{err}");
    let err =
        refused(dir.path(), &["train", "--lr_scheduler", "reduce_lr_on_plateau", "--train_data_dir", "x"]);
    assert!(err.contains("--lr_scheduler reduce_lr_on_plateau is not supported yet"), "{err}");
    let err = refused(dir.path(), &["train", "--lr_scheduler", "adafactor", "--train_data_dir", "x"]);
    assert!(err.contains("needs --optimizer_type AdaFactor"), "{err}");
    let out = dir.path().join("out");
    let o = toy_train(
        &out,
        &[
            "--pretrained_model_name_or_path",
            "builtin:tiny-sd1",
            "--max_train_steps",
            "2",
            "--optimizer_type",
            "AdaFactor",
            "--optimizer_args",
            "scale_parameter=False",
            "relative_step=True",
            "warmup_init=True",
            "--lr_scheduler",
            "adafactor",
            "--learning_rate",
            "0",
            "--max_data_loader_n_workers",
            "100000",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(out.join("m.safetensors").is_file());
}

/// Item 18: a value from a flag is blamed on the flag, not on a line of the TOML; empty datasets
/// say which subset, folder and key; skipped picture formats are mentioned.
#[test]
fn messages_name_the_flag_subset_and_folder() {
    let dir = tempdir();
    small_dataset(dir.path());
    let toml = "[general]\nenable_bucket = true\n\n[[datasets]]\nresolution = 64\nmin_bucket_reso = 64\n\
                max_bucket_reso = 128\n\n  [[datasets.subsets]]\n  image_dir = \"instance\"\n";
    write(&dir.path().join("d.toml"), toml);
    let err = refused(dir.path(), &dry_run_toml("d.toml", &["--validation_split=2"]));
    assert!(err.contains("--validation_split: must be between"), "{err}");
    assert!(!err.contains("d.toml:"), "a flag value was blamed on the TOML: {err}");
    let err = refused(dir.path(), &dry_run_toml("d.toml", &["--caption_separator="]));
    assert!(err.contains("--caption_separator: must not be empty"), "{err}");

    // An empty file, only reg images, num_repeats 0 or -1: each says why.
    write(&dir.path().join("empty.toml"), "# nothing\n");
    let err = refused(dir.path(), &dry_run_toml("empty.toml", &[]));
    assert!(err.contains("empty.toml has no [[datasets]]"), "{err}");
    write(
        &dir.path().join("reg.toml"),
        "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"reg\"\nis_reg = true\n",
    );
    let err = refused(dir.path(), &dry_run_toml("reg.toml", &[]));
    assert!(err.contains("every subset is a regularization subset"), "{err}");
    for n in ["0", "-1"] {
        write(
            &dir.path().join("zero.toml"),
            &format!("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = \"instance\"\nnum_repeats = {n}\n"),
        );
        let err = refused(dir.path(), &dry_run_toml("zero.toml", &[]));
        assert!(err.contains("instance") && err.contains(&format!("key `num_repeats` is {n}")), "{err}");
    }
    // Legacy folders that are all skipped are listed; so are .gif/.tiff files.
    mkdir(&dir.path().join("legacy/sks"));
    mkdir(&dir.path().join("legacy/0_dog"));
    let err =
        refused(dir.path(), &["train", "--dry_run", "--train_data_dir", "legacy", "--resolution", "64"]);
    assert!(err.contains("without a <repeats>_ prefix") && err.contains("sks"), "{err}");
    assert!(err.contains("repeats < 1") && err.contains("0_dog"), "{err}");
    mkdir(&dir.path().join("gifs/2_cat"));
    write(&dir.path().join("gifs/2_cat/a.gif"), "GIF89a");
    write(&dir.path().join("gifs/2_cat/b.tiff"), "II*");
    let err = refused(dir.path(), &["train", "--dry_run", "--train_data_dir", "gifs", "--resolution", "64"]);
    assert!(err.contains("a.gif") && err.contains("b.tiff"), "{err}");
}

/// Item 19: a mistyped flag gets the nearest name.
#[test]
fn mistyped_flags_get_the_nearest_name() {
    let dir = tempdir();
    for (typo, right) in [("--learnig_rate", "--learning_rate"), ("--max_train_step", "--max_train_steps")] {
        let out = sdbooth(dir.path(), &["train", typo, "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(right), "{typo}: {err}");
    }
}

fn builtin_safetensors(dir: &Path) -> PathBuf {
    let out = dir.join("tiny.safetensors");
    let o = sdbooth(dir, &["convert", "builtin:tiny-sd1", "tiny.safetensors"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// Items 7 and 21: convert refuses to overwrite and mismatched extensions; the source path in the
/// metadata is the file name only.
#[test]
fn convert_refuses_overwrites_and_mismatched_names() {
    let dir = tempdir();
    builtin_safetensors(dir.path());
    let err = refused(dir.path(), &["convert", "builtin:tiny-sd1", "tiny.safetensors"]);
    assert!(err.contains("exists; add --overwrite"), "{err}");
    let err =
        refused(dir.path(), &["convert", "builtin:tiny-sd1", "x.safetensors", "--save_model_as", "ckpt"]);
    assert!(err.contains("x.safetensors") && err.contains("Ckpt"), "{err}");
    assert!(!dir.path().join("x.safetensors").exists());
    let err = refused(dir.path(), &["convert", "builtin:tiny-sd1", "y.ckpt", "--save_model_as", "diffusers"]);
    assert!(err.contains("a Diffusers output is a folder") || err.contains("folder name"), "{err}");
    mkdir(&dir.path().join("stuff"));
    write(&dir.path().join("stuff/notes.txt"), "mine");
    let err = refused(dir.path(), &["convert", "builtin:tiny-sd1", "stuff", "--overwrite"]);
    assert!(err.contains("not a Diffusers model"), "{err}");
    assert!(dir.path().join("stuff/notes.txt").is_file());

    // The absolute path of the source stays on this machine: only its file name is recorded.
    let o = sdbooth(dir.path(), &["convert", "tiny.safetensors", "copy.ckpt"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let abs = dir.path().join("copy.ckpt").display().to_string();
    let o = sdbooth(dir.path(), &["convert", &abs, "again.safetensors"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(dir.path().join("again.safetensors")).unwrap_or_default();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap_or_default();
    assert_eq!(header["__metadata__"]["sdbooth.converted_from"], "copy.ckpt", "{header}");
    assert!(!header.to_string().contains(&dir.path().display().to_string()), "absolute path stored");
    let o = sdbooth(dir.path(), &["convert", "copy.ckpt", "again.safetensors", "--overwrite"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Item 5: a Diffusers folder without model_index.json (an interrupted save) is refused.
#[test]
fn a_partial_diffusers_folder_is_refused() {
    let dir = tempdir();
    let o = sdbooth(dir.path(), &["convert", "builtin:tiny-sd1", "tiny", "--save_model_as", "diffusers"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["tiny".to_string()], "temporary folders left behind");
    let o = sdbooth(dir.path(), &["inspect", "tiny"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    if let Err(e) = std::fs::remove_file(dir.path().join("tiny/model_index.json")) {
        panic!("{e}");
    }
    for args in [
        vec!["inspect", "tiny"],
        vec!["generate", "--ckpt", "tiny", "--prompt", "a", "--outdir", "o", "--W", "64", "--H", "64"],
    ] {
        let err = refused(dir.path(), &args);
        assert!(err.contains("model_index.json is missing"), "{args:?}: {err}");
    }
}

/// Item 21: a log redirected to a file has no colour codes.
#[test]
fn redirected_logs_have_no_colour_codes() {
    let dir = tempdir();
    let o = sdbooth(
        dir.path(),
        &["train", "--dry_run", "--tokenizer_cache_dir", "x", "--train_data_dir", "none"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--tokenizer_cache_dir is ignored"), "{err}");
    assert!(!err.contains('\u{1b}'), "ANSI escape in a redirected log: {err:?}");
}

/// The f32 value of every scalar `tag` in a TensorBoard event file, in file order.
fn scalars(events: &[u8], tag: &str) -> Vec<f32> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = events[i..].windows(tag.len()).position(|w| w == tag.as_bytes()) {
        let after = i + at + tag.len();
        // Summary.Value.simple_value: field 2, fixed32 (key 0x15), right after the tag string.
        if events.get(after) == Some(&0x15) && after + 5 <= events.len() {
            let b = [events[after + 1], events[after + 2], events[after + 3], events[after + 4]];
            out.push(f32::from_le_bytes(b));
        }
        i = after;
    }
    out
}

/// Item 20: the average loss counts only the losses seen (step 1's average is its loss), and
/// TensorBoard's `lr/*` at step N is the rate of step N + 1, as kohya logs it.
#[test]
fn average_loss_and_logged_rates_match_kohya() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let logs = dir.path().join("logs");
    let logs_s = logs.display().to_string();
    let o = toy_train(
        &out,
        &[
            "--pretrained_model_name_or_path",
            "builtin:tiny-sd1",
            "--max_train_steps",
            "4",
            "--learning_rate",
            "1e-3",
            "--lr_scheduler",
            "linear",
            "--logging_dir",
            &logs_s,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let jsonl = std::fs::read_to_string(out.join("m.jsonl")).unwrap_or_default();
    let first: serde_json::Value =
        serde_json::from_str(jsonl.lines().next().unwrap_or("{}")).unwrap_or_default();
    assert_eq!(first["avr_loss"], first["loss"], "step 1's average is not its loss: {first}");
    assert!((first["lr_unet"].as_f64().unwrap_or(0.0) - 1e-3).abs() < 1e-12, "{first}");
    let mut files = Vec::new();
    files_under(&logs, &mut files);
    let events = files.iter().find(|p| p.to_string_lossy().contains("tfevents"));
    let bytes = events.map(std::fs::read).and_then(Result::ok).unwrap_or_default();
    let lrs = scalars(&bytes, "lr/unet");
    let expected = [7.5e-4f32, 5e-4, 2.5e-4, 0.0];
    assert_eq!(lrs.len(), 4, "{lrs:?}");
    for (got, want) in lrs.iter().zip(expected) {
        assert!((got - want).abs() < 1e-9, "{lrs:?}");
    }
}

/// Item 2: an output that would replace the base model is refused before training, not after.
#[test]
fn an_output_equal_to_the_base_model_is_refused_before_training() {
    let dir = tempdir();
    let out = dir.path().join("out");
    mkdir(&out);
    let o = sdbooth(&out, &["convert", "builtin:tiny-sd1", "m.safetensors"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let base = out.join("m.safetensors").display().to_string();
    let o = toy_train(&out, &["--pretrained_model_name_or_path", &base, "--max_train_steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("would replace the base model"), "{err}");
    assert!(!out.join("m.jsonl").exists(), "it trained before refusing");
}

/// Item 15: resuming a state that is already at the last step says there is nothing to train.
#[test]
fn resuming_a_finished_state_says_there_is_nothing_left() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let base = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--max_train_steps", "2"];
    let mut a = base.to_vec();
    a.push("--save_state_on_train_end");
    let o = toy_train(&out, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state = out.join("m-state").display().to_string();
    let mut a = base.to_vec();
    a.extend(["--resume", &state]);
    let o = toy_train(&dir.path().join("again"), &a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("nothing left to train"), "{err}");
    assert!(!err.contains("NaN"), "{err}");
}

/// Item 3: an error after steps were trained (here the final save: a folder sits where the model
/// goes) saves a state of those steps first and says where it is.
#[test]
fn an_error_after_training_saves_the_trained_steps() {
    let dir = tempdir();
    let out = dir.path().join("out");
    mkdir(&out.join("m.safetensors"));
    write(&out.join("m.safetensors/keep.txt"), "a folder where the model would go");
    let o =
        toy_train(&out, &["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--max_train_steps", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("the run is saved at step 2 as a state in"), "{err}");
    assert!(out.join("m-step00000002-state/state.json").is_file(), "{err}");
}

/// Item 3, the sampling path: sample images that cannot be written (a file sits where the
/// `sample` folder goes) stop the run after step 1 with a state of that step saved.
#[test]
fn a_failed_sampling_saves_the_trained_steps() {
    let dir = tempdir();
    let out = dir.path().join("out");
    mkdir(&out);
    write(&out.join("sample"), "a file where the sample folder would go");
    let prompts = dir.path().join("prompts.txt");
    write(&prompts, "a photo of sks dog --w 64 --h 64 --s 2\n");
    let prompts = prompts.display().to_string();
    let o = toy_train(
        &out,
        &[
            "--pretrained_model_name_or_path",
            "builtin:tiny-sd1",
            "--max_train_steps",
            "3",
            "--sample_every_n_steps",
            "1",
            "--sample_prompts",
            &prompts,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("sample"), "the error does not name the sample folder: {err}");
    assert!(err.contains("the run is saved at step 1 as a state in"), "{err}");
    assert!(out.join("m-step00000001-state/state.json").is_file(), "{err}");
}

/// Item 6: on --resume, flags that cannot apply to the saved state are refused with the saved
/// value named; the learning rate applies from the resumed step and says so.
#[test]
fn resume_refuses_or_applies_each_changed_flag() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let base = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--learning_rate", "1e-4"];
    let mut a = base.to_vec();
    a.extend(["--max_train_steps", "2", "--save_state_on_train_end"]);
    let o = toy_train(&out, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state = out.join("m-state").display().to_string();
    let resume = |extra: &[&str], to: &str| {
        let mut a = vec!["--max_train_steps", "3", "--resume", &state];
        a.extend(extra);
        let o = toy_train(&dir.path().join(to), &a);
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let mut lion = base.to_vec();
    lion.extend(["--optimizer_type", "Lion"]);
    let (ok, err) = resume(&lion, "lion");
    assert!(!ok && err.contains("--optimizer_type AdamW, not Lion"), "{err}");
    let mut args = base.to_vec();
    args.extend(["--optimizer_args", "weight_decay=0.5"]);
    let (ok, err) = resume(&args, "args");
    assert!(!ok && err.contains("--optimizer_args differ"), "{err}");
    let mut bf16 = base.to_vec();
    bf16.push("--full_bf16");
    let (ok, err) = resume(&bf16, "bf16");
    assert!(!ok && err.contains("without --full_bf16"), "{err}");
    let (ok, err) = resume(&["--pretrained_model_name_or_path", "builtin:tiny-sd2", "--v2"], "sd2");
    assert!(
        !ok && (err.contains("another model architecture") || err.contains("tensors, the model has")),
        "{err}"
    );
    let (ok, err) =
        resume(&["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--learning_rate", "5e-5"], "lr");
    assert!(ok, "{err}");
    assert!(err.contains("--learning_rate 0.00005 applies from step 2 (the saved run used 0.0001)"), "{err}");
}

/// Item 1, `generate`: a size that is not a multiple of 8 (`--W/--H`, or `--w/--h` on a line of
/// the prompt file) is refused before the model is loaded (the model here does not even exist),
/// naming the flag or the file and line; a multiple of 8 that is not one of 64 is generated.
#[test]
fn generate_refuses_sizes_the_vae_cannot_make_before_loading() {
    let dir = tempdir();
    let base = ["generate", "--ckpt", "missing.safetensors", "--outdir", "out"];
    let mut a = base.to_vec();
    a.extend(["--prompt", "a dog", "--W", "70", "--H", "64"]);
    let err = refused(dir.path(), &a);
    assert!(err.contains("--W 70 --H 64: ") && err.contains("multiple of 8"), "{err}");
    write(&dir.path().join("p.txt"), "# sizes\na dog --w 72\nb cat --w 72 --h 60\n");
    let mut a = base.to_vec();
    a.extend(["--from_file", "p.txt"]);
    let err = refused(dir.path(), &a);
    assert!(err.contains("p.txt:3 (--w 72 --h 60): ") && err.contains("multiple of 8"), "{err}");
    assert!(!err.contains("missing.safetensors"), "the model was read first: {err}");
    assert!(!dir.path().join("out").exists(), "generate wrote before refusing");

    let o = sdbooth(
        dir.path(),
        &["generate", "--ckpt", "builtin:tiny-sd1", "--outdir", "out", "--prompt", "a", "--W", "72"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(png_size(&dir.path().join("out/00000-0.png")), (72, 512));
}

/// Item 1, dataset: without buckets every image is cropped to `resolution`, so a resolution that
/// is not a multiple of 8 is refused by its TOML key (or `--resolution`) before the model is
/// loaded; 72 (not a multiple of 64) trains.
#[test]
fn a_dataset_resolution_the_vae_cannot_encode_is_refused_by_key() {
    let dir = tempdir();
    mkdir(&dir.path().join("instance"));
    png(&dir.path().join("instance/a.png"), 72, 72);
    let toml = |reso: &str| {
        format!("[[datasets]]\nresolution = {reso}\n[[datasets.subsets]]\nimage_dir = \"instance\"\n")
    };
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "--pretrained_model_name_or_path", "missing.safetensors"];
        a.extend(["--output_dir", "out", "--max_train_steps", "1"]);
        a.extend(extra);
        refused(dir.path(), &a)
    };
    write(&dir.path().join("d.toml"), &toml("[72, 70]"));
    let toml_err = train(&["--dataset_config", "d.toml"]);
    assert!(toml_err.contains("d.toml:2: key `resolution`"), "{toml_err}");
    assert!(toml_err.contains("72x70 must be a multiple of 8"), "{toml_err}");
    mkdir(&dir.path().join("legacy/1_sks"));
    png(&dir.path().join("legacy/1_sks/a.png"), 80, 80);
    let flag_err = train(&["--train_data_dir", "legacy", "--resolution", "70"]);
    assert!(flag_err.contains("--resolution: 70x70 must be a multiple of 8"), "{flag_err}");
    for err in [toml_err, flag_err] {
        assert!(!err.contains("missing.safetensors"), "the model was read first: {err}");
    }

    write(&dir.path().join("d.toml"), &toml("72"));
    let o = sdbooth(
        dir.path(),
        &[
            "train",
            "--pretrained_model_name_or_path",
            "builtin:tiny-sd1",
            "--dataset_config",
            "d.toml",
            "--output_dir",
            "out",
            "--output_name",
            "m",
            "--save_model_as",
            "safetensors",
            "--max_train_steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.path().join("out/m.safetensors").is_file());
}

/// The stderr of a toy training with samples from `prompts` (sampling at the first step) and a
/// model that does not exist, which must be refused.
fn sampling_run_refused(out: &Path, prompts: &str) -> String {
    let o = toy_train(
        out,
        &[
            "--pretrained_model_name_or_path",
            "missing.safetensors",
            "--sample_at_first",
            "--sample_prompts",
            prompts,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{err}");
    err
}

/// Item 1, training samples: kohya rounds a sample's size down to a multiple of 8 (at least 64),
/// so no size in a `--sample_prompts` file is lost; each rounded one is named by its line before
/// the model is loaded, and 72x64 (a multiple of 8, not of 64) is sampled at that size. A prompt
/// file that cannot be read is refused before loading.
#[test]
fn sample_prompt_sizes_are_checked_before_loading() {
    let dir = tempdir();
    let prompts = dir.path().join("p.txt");
    write(&prompts, "sks dog --w 72 --h 64 --s 2\n\nsks dog --w 70 --h 30 --s 2\n");
    let p = prompts.display().to_string();
    let missing = dir.path().join("none.txt").display().to_string();
    let out = dir.path().join("out");
    let err = sampling_run_refused(&out, &missing);
    assert!(err.contains("--sample_prompts: ") && err.contains("none.txt"), "{err}");
    assert!(!err.contains("missing.safetensors"), "the model was read first: {err}");

    let o = toy_train(
        &out,
        &[
            "--pretrained_model_name_or_path",
            "builtin:tiny-sd1",
            "--max_train_steps",
            "1",
            "--sample_every_n_steps",
            "1",
            "--sample_prompts",
            &p,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("{p}:3: the sample is made at 64x64, not 70x30")), "{err}");
    let mut samples = Vec::new();
    files_under(&out.join("sample"), &mut samples);
    samples.sort();
    let sizes: Vec<(u32, u32)> = samples.iter().map(|s| png_size(s)).collect();
    assert_eq!(sizes, vec![(72, 64), (64, 64)], "{samples:?}");
}

/// Item 1, sizes too large to make: a side above 8192 px (`generate --W/--H`, a `--from_file`
/// line, a `--sample_prompts` line) is refused before the model is loaded (it does not exist
/// here) and before training, naming the flag or the file and line and saying why there is a
/// limit; 4096 px passes the check.
#[test]
fn huge_sample_sizes_are_refused_before_loading() {
    let dir = tempdir();
    let base = ["generate", "--ckpt", "missing.safetensors", "--outdir", "out"];
    let limit = "at most 8192 pixels";
    let mut a = base.to_vec();
    a.extend(["--prompt", "a dog", "--W", "100000", "--H", "100000"]);
    let err = refused(dir.path(), &a);
    assert!(err.contains("--W 100000 --H 100000: ") && err.contains(limit), "{err}");
    assert!(err.contains("VAE decoder"), "the limit says why: {err}");
    write(&dir.path().join("p.txt"), "a dog --w 4096 --h 4096\nb cat --w 512 --h 100000\n");
    let mut a = base.to_vec();
    a.extend(["--from_file", "p.txt"]);
    let err = refused(dir.path(), &a);
    assert!(err.contains("p.txt:2 (--w 512 --h 100000): ") && err.contains(limit), "{err}");
    assert!(!err.contains("missing.safetensors"), "the model was read first: {err}");
    assert!(!dir.path().join("out").exists(), "generate wrote before refusing");

    let prompts = dir.path().join("s.txt");
    write(&prompts, "sks dog --w 4096 --h 4096\n# big\nsks dog --w 100000 --s 2\n");
    let p = prompts.display().to_string();
    let out = dir.path().join("train-out");
    let err = sampling_run_refused(&out, &p);
    assert!(err.contains(&format!("--sample_prompts: {p}:3 (--w 100000 --h 512): ")), "{err}");
    assert!(err.contains(limit) && !err.contains("missing.safetensors"), "{err}");
    assert!(!out.exists(), "training started before refusing");
}
