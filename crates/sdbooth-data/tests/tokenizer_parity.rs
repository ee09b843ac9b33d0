//! Parity with kohya's tokenization: ids written by tools/tokenizer/make_goldens.py from
//! transformers' slow CLIPTokenizer + ftfy 6.3.1, laid out by kohya's own window code, for 1,160
//! captions. Every id must match, for SD1 and SD2, every max_token_length, --no_token_padding and
//! --weighted_captions.

use std::io::Read;

use sdbooth_data::tokenizer::{ClipTokenizer, TokenizerError, Windows};
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/parity.json.gz");

fn load() -> Value {
    let file = std::fs::File::open(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect()).unwrap_or_default()
}

fn windows(v: &Value) -> Windows {
    v.as_array().map(|a| a.iter().map(ids).collect()).unwrap_or_default()
}

fn weights(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|row| {
                    row.as_array()
                        .map(|r| r.iter().filter_map(Value::as_f64).map(|x| x as f32).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn max_len(key: &str) -> Option<usize> {
    key.trim_start_matches('w').parse().ok()
}

/// Compares every case for one variant; returns the mismatches (text, what, ours, theirs).
fn check(tok: &ClipTokenizer, variant: &str, doc: &Value) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut bad = Vec::new();
    let cases = doc["cases"].as_array().cloned().unwrap_or_default();
    assert!(cases.len() >= 1000, "corpus has {} captions", cases.len());
    for case in &cases {
        let text = case["text"].as_str().unwrap_or_default();
        let want = &case[variant];
        let mut reported = false;
        let mut compare = |what: &str, ours: String, theirs: String| {
            checked += 1;
            // One report per caption: the first layout that differs, shortened.
            if ours != theirs && !std::mem::replace(&mut reported, true) {
                let cut = |s: String| s.chars().take(240).collect::<String>();
                bad.push(format!("{text:?} [{what}]\n  ours:   {}\n  kohya:  {}", cut(ours), cut(theirs)));
            }
        };
        compare("encode", format!("{:?}", tok.encode(text)), format!("{:?}", ids(&want["encode"])));
        let nopad = tok.tokenize_for_training(text, None, true).map(|w| w.concat());
        compare("no_token_padding", format!("{nopad:?}"), format!("{:?}", Ok::<_, ()>(ids(&want["nopad"]))));
        for key in ["None", "150", "225"] {
            let ours = tok.tokenize_for_training(text, max_len(key), false);
            compare(key, format!("{ours:?}"), format!("{:?}", Ok::<_, ()>(windows(&want[key]))));
            let wkey = format!("w{key}");
            let Some(w) = want.get(&wkey) else { continue };
            let ours = tok.tokenize_weighted(text, max_len(key));
            if w.is_null() {
                let ok = matches!(ours, Err(TokenizerError::Weight { .. }));
                compare(&wkey, format!("weight error: {ok}"), "weight error: true".to_string());
            } else {
                let ours = ours.map(|o| (o.ids, o.weights));
                let theirs = (windows(&w["ids"]), weights(&w["weights"]));
                compare(&wkey, format!("{ours:?}"), format!("{:?}", Ok::<_, ()>(theirs)));
            }
        }
    }
    (checked, bad)
}

fn run(variant: &str, tok: Result<ClipTokenizer, TokenizerError>) {
    let tok = tok.unwrap_or_else(|e| panic!("tokenizer: {e}"));
    let doc = load();
    let (checked, bad) = check(&tok, variant, &doc);
    assert!(checked > 5000, "only {checked} comparisons");
    assert!(
        bad.is_empty(),
        "{variant}: {} captions differ from kohya ({checked} comparisons); first ones:\n{}",
        bad.len(),
        bad.iter().take(15).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn sd1_matches_kohya_on_every_caption() {
    run("sd1", ClipTokenizer::sd1());
}

#[test]
fn sd2_matches_kohya_on_every_caption() {
    run("sd2", ClipTokenizer::sd2());
}

/// Mojibake (text decoded with the wrong codec) that ftfy repairs before tokenizing.
#[test]
fn mojibake_is_repaired_as_ftfy_does() {
    let tok = ClipTokenizer::sd1().unwrap_or_else(|e| panic!("tokenizer: {e}"));
    let doc = load();
    let cases = doc["mojibake"].as_array().cloned().unwrap_or_default();
    assert!(cases.len() >= 15);
    let bad: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let text = c["text"].as_str().unwrap_or_default();
            let (ours, theirs) = (tok.encode(text), ids(&c["sd1"]));
            (ours != theirs).then(|| format!("{text:?}: ours {ours:?}, ftfy {:?} {theirs:?}", c["fixed"]))
        })
        .collect();
    assert!(bad.is_empty(), "{} of {} differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
}
