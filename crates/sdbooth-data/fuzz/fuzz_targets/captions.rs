//! Any bytes as a caption file, read through the dataset path (UTF-8 check, BOM, newlines,
//! wildcards), processed as a training step does (shuffle, keep_tokens, separators, dropout,
//! token warmup, all from fuzzed options), then tokenized by the SD1 and SD2 tokenizers, plain
//! and as a weighted caption (`--weighted_captions`): Ok or Err, never a panic.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sdbooth_data::tokenizer::ClipTokenizer;
use sdbooth_data::{load_sample, prepare_datasets, DatasetOptions, SampleContext};

fn tokenizers() -> &'static (ClipTokenizer, ClipTokenizer) {
    static T: OnceLock<(ClipTokenizer, ClipTokenizer)> = OnceLock::new();
    T.get_or_init(|| {
        (ClipTokenizer::sd1().expect("sd1 tokenizer"), ClipTokenizer::sd2().expect("sd2 tokenizer"))
    })
}

const SEPARATORS: [&str; 4] = [",", "|", " ", ", "];

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch();
    // One image with the fuzzed caption beside it, in a legacy `<repeats>_<class>` folder.
    let folder = dir.join(format!("cap{}", std::process::id())).join("1_sks dog");
    if std::fs::create_dir_all(&folder).is_err()
        || std::fs::copy(dir.join("img/a.png"), folder.join("x.png")).is_err()
    {
        return;
    }
    let mut k = common::Knobs { bytes: data };
    let weighted = k.bool();
    let max_token_length = [None, Some(150), Some(225)][k.u8() as usize % 3];
    let opts = DatasetOptions {
        train_data_dir: folder.parent().map(|p| p.display().to_string()),
        resolution: Some("8".into()),
        shuffle_caption: k.bool(),
        keep_tokens: k.u8() as u32 % 6,
        keep_tokens_separator: if k.bool() { "|||".into() } else { String::new() },
        caption_separator: SEPARATORS[k.u8() as usize % SEPARATORS.len()].into(),
        secondary_separator: k.bool().then(|| ";;;".into()),
        enable_wildcard: k.bool(),
        caption_prefix: k.bool().then(|| "pre, ".into()),
        caption_dropout_every_n_epochs: k.u8() as u32 % 3,
        caption_tag_dropout_rate: (k.u8() % 101) as f64 / 100.0,
        token_warmup_min: k.u8() as u32 % 4,
        token_warmup_step: (k.u8() % 5) as f64,
        weighted_captions: weighted,
        ..Default::default()
    };
    let step = k.u8() as u64;
    if std::fs::write(folder.join("x.caption"), k.rest()).is_err() {
        return;
    }
    let cwd = std::path::Path::new("/");
    let Ok(group) = prepare_datasets(None, &opts, cwd) else { return };
    let ctx = SampleContext { seed: 1, epoch: 1 + step % 3, step, max_train_steps: 4 };
    let Ok(sample) = load_sample(&group, 0, 0, step, &ctx) else { return };
    let (sd1, sd2) = tokenizers();
    for tok in [sd1, sd2] {
        for no_pad in [false, true] {
            let _ = tok.tokenize_for_training(&sample.caption, max_token_length, no_pad);
        }
        if weighted {
            if let Ok(w) = tok.tokenize_weighted(&sample.caption, max_token_length) {
                let _ = w;
            }
        }
    }
});
