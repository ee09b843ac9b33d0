//! ftfy's `fix_encoding` (6.3.1): repairs mojibake, text that was UTF-8 decoded with a one-byte
//! codec (`cafÃ©` → `café`). It matters for parity beyond broken text: ftfy's heuristic also fires
//! on rare but real juxtapositions (an accented capital before `§`, currency after an accented
//! letter), and then decodes them.
//!
//! The detection regexes and the one-byte code pages are generated from ftfy itself by
//! tools/tokenizer/make_tables.py (assets/ftfy_mojibake.txt); the control flow is ftfy's
//! `_fix_encoding_one_step_and_explain`.

use std::collections::HashMap;

use regex::bytes::Regex as BytesRegex;
use regex::Regex;

use super::clean::fix_c1_controls;
use super::TokenizerError;

const TABLES: &str = include_str!("../../assets/ftfy_mojibake.txt");

/// One of ftfy's CHARMAP_ENCODINGS: which byte each encodable char becomes.
struct Charmap {
    name: String,
    encode: HashMap<char, u8>,
}

pub(crate) struct Mojibake {
    badness: Regex,
    /// ftfy's UTF8_DETECTOR_RE without its lookbehind, anchored at the start of the haystack.
    detector: Regex,
    /// The lookbehind's class: a match may not start right after one of these chars.
    continuation_strict: Regex,
    charmaps: Vec<Charmap>,
    altered_utf8: BytesRegex,
    lossy_utf8: BytesRegex,
}

fn err(what: &str) -> TokenizerError {
    TokenizerError::Vocabulary(format!("ftfy tables: {what}"))
}

impl Mojibake {
    pub(crate) fn new() -> Result<Self, TokenizerError> {
        let mut lines = TABLES.lines();
        let mut next = |what: &str| lines.next().ok_or_else(|| err(what));
        let compile = |p: &str, what: &str| Regex::new(p).map_err(|e| err(&format!("{what}: {e}")));
        let badness = compile(next("badness")?, "badness")?;
        let detector = compile(&format!(r"\A(?:{})", next("detector")?), "detector")?;
        let continuation_strict = compile(next("continuation")?, "continuation")?;
        let mut charmaps = Vec::new();
        for line in lines {
            let (name, hex) = line.split_once('\t').ok_or_else(|| err("charmap line"))?;
            let decode = hex
                .split(' ')
                .map(|h| u32::from_str_radix(h, 16).ok().and_then(char::from_u32))
                .collect::<Option<Vec<char>>>()
                .ok_or_else(|| err("charmap value"))?;
            if decode.len() != 256 {
                return Err(err("charmap length"));
            }
            let encode = decode.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
            charmaps.push(Charmap { name: name.to_string(), encode });
        }
        let bytes = |p: &str| BytesRegex::new(p).map_err(|e| err(&format!("byte regex: {e}")));
        // ftfy.chardata.ALTERED_UTF8_RE: UTF-8 sequences whose 0xA0 byte became a space.
        let altered_utf8 = bytes(concat!(
            r"(?-u)[\xc2\xc3\xc5\xce\xd0\xd9] ",
            r"|[\xe2\xe3] [\x80-\x84\x86-\x9f\xa1-\xbf]",
            r"|[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf] ",
            r"|\xf0 [\x80-\xbf][\x80-\xbf]",
            r"|\xf0[\x80-\xbf] [\x80-\xbf]",
            r"|\xf0[\x80-\xbf][\x80-\xbf] ",
        ))?;
        // ftfy.chardata.LOSSY_UTF8_RE: sequences that lost bytes (0x1A stands for a lost byte).
        let lossy_utf8 = bytes(concat!(
            r"(?-u)[\xc2-\xdf]\x1a",
            r"|[\xc2-\xc3]\?",
            r"|\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]",
            r"|\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]",
            r"|[\xe0-\xef][\x1a?][\x1a\x80-\xbf]",
            r"|[\xe0-\xef][\x1a\x80-\xbf][\x1a?]",
            r"|[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]",
            r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]",
            r"|[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]",
            r"|\x1a",
        ))?;
        Ok(Self { badness, detector, continuation_strict, charmaps, altered_utf8, lossy_utf8 })
    }

    fn is_bad(&self, text: &str) -> bool {
        self.badness.is_match(text)
    }

    /// ftfy's `fix_encoding`: one repair step at a time until the text stops changing.
    pub(crate) fn fix_encoding(&self, text: &str) -> String {
        let mut text = text.to_string();
        loop {
            let next = self.one_step(&text);
            if next == text {
                return text;
            }
            text = next;
        }
    }

    fn one_step(&self, text: &str) -> String {
        if text.is_empty() || text.is_ascii() || !self.is_bad(text) {
            return text.to_string();
        }
        let mut latin1_possible = false;
        for cm in &self.charmaps {
            let Some(mut bytes) =
                text.chars().map(|c| cm.encode.get(&c).copied()).collect::<Option<Vec<u8>>>()
            else {
                continue;
            };
            if cm.name == "latin-1" {
                latin1_possible = true;
            }
            if cm.name != "macroman" && self.altered_utf8.is_match(&bytes) {
                bytes = self.restore_byte_a0(&bytes);
            }
            if cm.name.starts_with("sloppy") {
                bytes = self.lossy_utf8.replace_all(&bytes, "\u{FFFD}".as_bytes()).into_owned();
            }
            let decoded = if bytes.contains(&0xED) || bytes.contains(&0xC0) {
                decode_utf8_variants(&bytes)
            } else {
                String::from_utf8(bytes).ok()
            };
            if let Some(fixed) = decoded {
                return fixed;
            }
        }
        let fixed = self.decode_inconsistent_utf8(text);
        if fixed != text {
            return fixed;
        }
        // Latin-1 read as Windows-1252 (strict: its five unassigned bytes fail the decode).
        if latin1_possible {
            let fixed: Option<String> = text.chars().map(strict_cp1252).collect();
            if let Some(fixed) = fixed {
                if fixed != text {
                    return fixed;
                }
            }
        }
        if text.chars().any(|c| ('\u{80}'..='\u{9F}').contains(&c)) {
            return fix_c1_controls(text);
        }
        text.to_string()
    }

    /// ftfy's `restore_byte_a0`: `Ã ` before a word is `à`, then spaces inside otherwise-valid
    /// UTF-8 sequences go back to 0xA0.
    fn restore_byte_a0(&self, bytes: &[u8]) -> Vec<u8> {
        // b"\xc3 (?! |quele|quela|quilo|s )" → b"\xc3\xa0 ", by hand: Rust's regex has no lookahead.
        let mut out = Vec::with_capacity(bytes.len() + 8);
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == 0xC3 && bytes.get(i + 1) == Some(&b' ') {
                let rest = &bytes[i + 2..];
                let excluded =
                    [&b" "[..], b"quele", b"quela", b"quilo", b"s "].iter().any(|p| rest.starts_with(p));
                if !excluded {
                    out.extend_from_slice(b"\xc3\xa0 ");
                    i += 2;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        self.altered_utf8
            .replace_all(&out, |caps: &regex::bytes::Captures<'_>| {
                caps[0].iter().map(|&b| if b == b' ' { 0xA0 } else { b }).collect::<Vec<u8>>()
            })
            .into_owned()
    }

    /// ftfy's `decode_inconsistent_utf8`: runs that look like UTF-8 read as a one-byte codec, inside
    /// otherwise fine text, are fixed on their own when they look bad.
    fn decode_inconsistent_utf8(&self, text: &str) -> String {
        let total = text.chars().count();
        let mut out = String::with_capacity(text.len());
        let mut prev: Option<char> = None;
        let mut pos = 0;
        while pos < text.len() {
            let after_continuation = prev.is_some_and(|c| {
                let mut buf = [0u8; 4];
                self.continuation_strict.is_match(c.encode_utf8(&mut buf))
            });
            let found = if after_continuation { None } else { self.detector.find(&text[pos..]) };
            match found {
                Some(m) if !m.as_str().is_empty() => {
                    let sub = m.as_str();
                    if sub.chars().count() < total && self.is_bad(sub) {
                        out.push_str(&self.fix_encoding(sub));
                    } else {
                        out.push_str(sub);
                    }
                    prev = sub.chars().last();
                    pos += sub.len();
                }
                _ => {
                    let Some(c) = text[pos..].chars().next() else { break };
                    out.push(c);
                    prev = Some(c);
                    pos += c.len_utf8();
                }
            }
        }
        out
    }
}

/// Windows-1252 strictly (Python's codec): the five unassigned bytes are errors.
fn strict_cp1252(c: char) -> Option<char> {
    let b = u32::from(c);
    if b > 0xFF {
        return None;
    }
    if matches!(b, 0x81 | 0x8D | 0x8F | 0x90 | 0x9D) {
        return None;
    }
    Some(super::clean::sloppy_cp1252(b as u8))
}

/// ftfy's "utf-8-variants" codec: UTF-8 that also accepts CESU-8 surrogate pairs and Java's
/// `C0 80` for NUL. Anything else invalid is an error, as in Python.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0xC0 && bytes.get(i + 1) == Some(&0x80) {
            out.push_str(std::str::from_utf8(&bytes[start..i]).ok()?);
            out.push('\0');
            i += 2;
            start = i;
            continue;
        }
        let cesu = b == 0xED
            && i + 5 < bytes.len()
            && (0xA0..=0xAF).contains(&bytes[i + 1])
            && (0x80..=0xBF).contains(&bytes[i + 2])
            && bytes[i + 3] == 0xED
            && (0xB0..=0xBF).contains(&bytes[i + 4])
            && (0x80..=0xBF).contains(&bytes[i + 5]);
        if cesu {
            out.push_str(std::str::from_utf8(&bytes[start..i]).ok()?);
            let cp = ((u32::from(bytes[i + 1]) & 0x0F) << 16)
                + ((u32::from(bytes[i + 2]) & 0x3F) << 10)
                + ((u32::from(bytes[i + 4]) & 0x0F) << 6)
                + (u32::from(bytes[i + 5]) & 0x3F)
                + 0x10000;
            out.push(char::from_u32(cp)?);
            i += 6;
            start = i;
            continue;
        }
        i += 1;
    }
    out.push_str(std::str::from_utf8(&bytes[start..]).ok()?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_utf8_read_as_one_byte_codecs() -> Result<(), TokenizerError> {
        let m = Mojibake::new()?;
        assert_eq!(m.fix_encoding("cafÃ©"), "café");
        assert_eq!(m.fix_encoding("Ñ§"), "ѧ");
        assert_eq!(m.fix_encoding("plain text"), "plain text");
        assert_eq!(m.fix_encoding("naïve café"), "naïve café");
        Ok(())
    }

    #[test]
    fn cesu8_pairs_decode() {
        // U+1F600 as a CESU-8 surrogate pair.
        assert_eq!(decode_utf8_variants(b"\xed\xa0\xbd\xed\xb8\x80").as_deref(), Some("\u{1F600}"));
        assert_eq!(decode_utf8_variants(b"a\xc0\x80b").as_deref(), Some("a\0b"));
        assert_eq!(decode_utf8_variants(b"\xed\xa0\xbd"), None);
    }
}
