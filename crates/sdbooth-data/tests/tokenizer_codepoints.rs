//! Every Unicode code point between two letters, against transformers + ftfy. The reference file
//! is large (1.1M lines), so it is not checked in: tools/tokenizer/all_codepoints.py writes it, and
//! this test runs only when asked:
//! `SDBOOTH_ALL_CODEPOINTS=FILE cargo test -p sdbooth-data --test tokenizer_codepoints -- --ignored`

use sdbooth_data::tokenizer::ClipTokenizer;

#[test]
#[ignore = "needs the file written by tools/tokenizer/all_codepoints.py"]
fn every_code_point_matches() {
    let Ok(path) = std::env::var("SDBOOTH_ALL_CODEPOINTS") else {
        panic!("set SDBOOTH_ALL_CODEPOINTS to the file written by tools/tokenizer/all_codepoints.py")
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let tok = ClipTokenizer::sd1().unwrap_or_else(|e| panic!("{e}"));
    let mut checked = 0;
    let mut bad = Vec::new();
    for line in text.lines() {
        let Some((hex, ids)) = line.split_once('\t') else { continue };
        let Some(c) = u32::from_str_radix(hex, 16).ok().and_then(char::from_u32) else { continue };
        let want: Vec<u32> = ids.split(' ').filter_map(|s| s.parse().ok()).collect();
        let ours = tok.encode(&format!("x{c}y"));
        checked += 1;
        if ours != want {
            bad.push(format!("U+{hex}: ours {ours:?}, python {want:?}"));
        }
    }
    assert!(checked > 1_000_000, "only {checked} code points in {path}");
    assert!(bad.is_empty(), "{} of {checked} code points differ:\n{}", bad.len(), bad.join("\n"));
}
