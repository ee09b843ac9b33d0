//! CLIP's byte-level BPE: the vocabulary built from the embedded merges, the regex pre-tokenizer
//! and the merge loop, as transformers' slow `CLIPTokenizer` runs them.

use std::collections::HashMap;
use std::io::Read;

use regex::Regex;

use super::TokenizerError;

/// The merges file (open_clip's `bpe_simple_vocab_16e6.txt`, first 48,894 merges), gzipped.
const MERGES_GZ: &[u8] = include_bytes!("../../assets/clip_bpe_merges.txt.gz");

/// CLIP's vocabulary is 256 byte symbols, the same with `</w>`, one token per merge, then the two
/// specials: 49,408 ids, so the merge count is fixed.
pub(crate) const N_MERGES: usize = 49152 - 256 - 2;
pub const BOS_ID: u32 = 49406;
pub const EOS_ID: u32 = 49407;
pub const VOCAB_SIZE: usize = 49408;

/// `\p{L}` and `\p{N}` as ranges, as the Python `regex` module transformers uses defines them
/// (written by tools/tokenizer/make_tables.py). Its Unicode tables are newer than Rust regex's:
/// with `\p{L}` from Rust, the ~17,000 letters assigned after Unicode 16 would split words.
const CLASSES: &str = include_str!("../../assets/clip_pretokenizer_classes.txt");

/// The pre-tokenizer of `CLIPTokenizer._tokenize`. Python compiles it with IGNORECASE; the text is
/// already lower case, but case folding still matters in two places, checked over every code point
/// (tests/tokenizer_codepoints.rs):
/// - `'ſ` (long s) is the contraction `'s` for Python's `regex` module, as for Rust's `(?i)`;
/// - U+0345 (combining ypogegrammeni, which folds to ι) matches no alternative in Python, so
///   `findall` drops it. Rust's `(?i)` would fold it into the letter class, so the classes are
///   matched case-sensitively (the same sets for every other code point) and U+0345 is excluded.
fn pretokenizer_pattern() -> Result<String, TokenizerError> {
    let mut lines = CLASSES.lines().filter(|l| !l.starts_with('#'));
    let (Some(letters), Some(numbers)) = (lines.next(), lines.next()) else {
        return Err(TokenizerError::Vocabulary("pre-tokenizer classes are missing".to_string()));
    };
    Ok(format!(
        r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}\x{{345}}]+"
    ))
}

pub(crate) struct BpeModel {
    /// Byte value -> id of its single-byte symbol (ids 0..256; `+256` is the `</w>` form).
    byte_ids: [u32; 256],
    /// (left id, right id) -> (merge rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token strings in id order (byte-encoded form, as in HF's vocab.json), for decoding and tests.
    tokens: Vec<String>,
    pretokenizer: Regex,
}

/// GPT-2/CLIP's reversible byte -> printable char map, in vocabulary order: printable Latin-1
/// bytes first, keeping their own code point, then the rest mapped to U+0100 onwards.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable =
        |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut out: Vec<(u8, char)> = Vec::with_capacity(256);
    for b in 0u32..256 {
        if printable(b) {
            out.push((b as u8, char::from_u32(b).unwrap_or('\u{FFFD}')));
        }
    }
    let mut n = 0u32;
    for b in 0u32..256 {
        if !printable(b) {
            out.push((b as u8, char::from_u32(256 + n).unwrap_or('\u{FFFD}')));
            n += 1;
        }
    }
    out
}

impl BpeModel {
    pub(crate) fn load() -> Result<Self, TokenizerError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(MERGES_GZ)
            .read_to_string(&mut text)
            .map_err(|e| TokenizerError::Vocabulary(format!("cannot decompress the merges: {e}")))?;
        let merge_lines: Vec<&str> = text.lines().skip(1).take(N_MERGES).collect();
        if merge_lines.len() != N_MERGES {
            return Err(TokenizerError::Vocabulary(format!(
                "{} merges, expected {N_MERGES}",
                merge_lines.len()
            )));
        }

        let table = bytes_to_unicode();
        let mut byte_ids = [0u32; 256];
        let mut tokens: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        for (i, (b, c)) in table.iter().enumerate() {
            byte_ids[*b as usize] = i as u32;
            tokens.push(c.to_string());
        }
        for (_, c) in &table {
            tokens.push(format!("{c}</w>"));
        }
        let mut parts: Vec<(&str, &str)> = Vec::with_capacity(N_MERGES);
        for line in &merge_lines {
            let (a, b) = line
                .split_once(' ')
                .ok_or_else(|| TokenizerError::Vocabulary(format!("malformed merge line {line:?}")))?;
            parts.push((a, b));
            tokens.push(format!("{a}{b}"));
        }
        tokens.push("<|startoftext|>".to_string());
        tokens.push("<|endoftext|>".to_string());

        // HF's encoder is a dict from these strings; a repeated string would keep its last id.
        let mut ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.insert(t.as_str(), i as u32);
        }
        let mut merges = HashMap::with_capacity(N_MERGES);
        for (rank, (a, b)) in parts.iter().enumerate() {
            // A part that is not a token can never appear in a word, so its merge never fires.
            let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) else { continue };
            let joined = format!("{a}{b}");
            let Some(&merged) = ids.get(joined.as_str()) else { continue };
            merges.insert((ia, ib), (rank as u32, merged));
        }
        let pretokenizer = Regex::new(&pretokenizer_pattern()?)
            .map_err(|e| TokenizerError::Vocabulary(format!("pre-tokenizer regex: {e}")))?;
        Ok(Self { byte_ids, merges, tokens, pretokenizer })
    }

    pub(crate) fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// `CLIPTokenizer.decode` without special tokens: token strings joined, mapped back to bytes,
    /// UTF-8 decoded (invalid bytes become U+FFFD), each `</w>` a space, stripped.
    pub(crate) fn decode(&self, ids: &[u32]) -> String {
        let mut char_to_byte: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, &id) in self.byte_ids.iter().enumerate() {
            if let Some(c) = self.tokens[id as usize].chars().next() {
                char_to_byte.insert(c, b as u8);
            }
        }
        let mut bytes = Vec::new();
        for &id in ids {
            if id == BOS_ID || id == EOS_ID {
                continue;
            }
            let Some(tok) = self.token(id) else { continue };
            bytes.extend(tok.chars().filter_map(|c| char_to_byte.get(&c)));
        }
        String::from_utf8_lossy(&bytes).replace("</w>", " ").trim().to_string()
    }

    pub(crate) fn pretokens<'a>(&'a self, text: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pretokenizer.find_iter(text).map(|m| m.as_str())
    }

    /// BPE of one pre-token, appended to `out`. The merge loop is CLIP's: repeatedly merge every
    /// non-overlapping occurrence (left to right) of the adjacent pair with the lowest rank.
    pub(crate) fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        match word {
            "<|startoftext|>" => return out.push(BOS_ID),
            "<|endoftext|>" => return out.push(EOS_ID),
            _ => {}
        }
        let bytes = word.as_bytes();
        let Some((&last, init)) = bytes.split_last() else { return };
        let mut symbols: Vec<u32> = init.iter().map(|&b| self.byte_ids[b as usize]).collect();
        symbols.push(self.byte_ids[last as usize] + 256);

        let mut next: Vec<u32> = Vec::with_capacity(symbols.len());
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|w| {
                    self.merges.get(&(w[0], w[1])).map(|&(rank, merged)| (rank, w[0], w[1], merged))
                })
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, first, second, merged)) = best else { break };
            next.clear();
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            std::mem::swap(&mut symbols, &mut next);
        }
        out.extend_from_slice(&symbols);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_has_clip_layout() -> Result<(), TokenizerError> {
        let m = BpeModel::load()?;
        assert_eq!(m.tokens.len(), VOCAB_SIZE);
        assert_eq!(m.token(0), Some("!"));
        assert_eq!(m.token(256), Some("!</w>"));
        assert_eq!(m.token(BOS_ID), Some("<|startoftext|>"));
        assert_eq!(m.token(EOS_ID), Some("<|endoftext|>"));
        // Space (byte 0x20) is not printable, so it maps to U+0120 'Ġ'.
        assert_eq!(m.token(m.byte_ids[b' ' as usize]), Some("Ġ"));
        Ok(())
    }

    #[test]
    fn words_merge_to_known_ids() -> Result<(), TokenizerError> {
        let m = BpeModel::load()?;
        let mut out = Vec::new();
        for w in ["hello", "!", "world", "a"] {
            m.encode_word(w, &mut out);
        }
        // Ids from transformers' CLIPTokenizer on the same vocabulary.
        assert_eq!(out, vec![3306, 256, 1002, 320]);
        Ok(())
    }
}
