//! ftfy's `unescape_html`: `&name;` and `&#NNN;`/`&#xHH;` entities, as ftfy 6.3.1 decodes them.
//! Captions scraped from web pages often carry `&amp;` or `&#39;`.

use std::collections::HashMap;

use regex::Regex;

use super::TokenizerError;

/// `NAME<TAB>HEX HEX...` per entity, written by tools/tokenizer/make_tables.py from ftfy itself
/// (HTML5's names, plus ftfy's upper-cased variants such as `&EACUTE;`).
const ENTITIES_TSV: &str = include_str!("../../assets/ftfy_html_entities.tsv");

pub(crate) struct HtmlEntities {
    named: HashMap<&'static str, String>,
    /// ftfy's HTML_ENTITY_RE: at most 24 alphanumerics, and the `;` is required.
    candidate: Regex,
}

impl HtmlEntities {
    pub(crate) fn new() -> Result<Self, TokenizerError> {
        let bad = |line: &str| TokenizerError::Vocabulary(format!("bad HTML entity line {line:?}"));
        let mut named = HashMap::new();
        for line in ENTITIES_TSV.lines() {
            let (name, hex) = line.split_once('\t').ok_or_else(|| bad(line))?;
            let mut value = String::new();
            for h in hex.split(' ') {
                let c = u32::from_str_radix(h, 16).ok().and_then(char::from_u32).ok_or_else(|| bad(line))?;
                value.push(c);
            }
            named.insert(name, value);
        }
        let candidate = Regex::new(r"&#?[0-9A-Za-z]{1,24};")
            .map_err(|e| TokenizerError::Vocabulary(format!("HTML entity regex: {e}")))?;
        Ok(Self { named, candidate })
    }

    pub(crate) fn unescape(&self, text: &str) -> String {
        if !text.contains('&') {
            return text.to_string();
        }
        self.candidate
            .replace_all(text, |caps: &regex::Captures<'_>| {
                let whole = &caps[0];
                let body = &whole[1..whole.len() - 1];
                if let Some(v) = self.named.get(body) {
                    return v.clone();
                }
                match body.strip_prefix('#').and_then(numeric_charref) {
                    Some(decoded) => decoded,
                    None => whole.to_string(),
                }
            })
            .into_owned()
    }
}

/// ftfy hands `&#…;` to Python's `html.unescape` and keeps the result only when no `;` is left,
/// i.e. when the whole body was a number: decimal digits, or `x`/`X` and hex digits.
fn numeric_charref(body: &str) -> Option<String> {
    let num: u64 = if let Some(hex) = body.strip_prefix(['x', 'X']) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        // Saturate: Python's int has no limit, and anything past U+10FFFF decodes the same way.
        hex.bytes().fold(0u64, |n, b| {
            n.saturating_mul(16).saturating_add((b as char).to_digit(16).unwrap_or(0) as u64)
        })
    } else {
        if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        body.bytes().fold(0u64, |n, b| n.saturating_mul(10).saturating_add((b - b'0') as u64))
    };
    let decoded = charref(num);
    // `&#59;` decodes to ';', which ftfy takes for a failed decode and leaves as written.
    if decoded.contains(';') {
        None
    } else {
        Some(decoded)
    }
}

/// Python's `html._replace_charref` for a numeric reference (the HTML5 rules for invalid ones).
fn charref(num: u64) -> String {
    let replacement = match num {
        0x00 => Some('\u{FFFD}'),
        0x0D => Some('\r'),
        0x80..=0x9F => Some(super::clean::sloppy_cp1252(num as u8)),
        _ => None,
    };
    if let Some(c) = replacement {
        return c.to_string();
    }
    if (0xD800..=0xDFFF).contains(&num) || num > 0x10FFFF {
        return '\u{FFFD}'.to_string();
    }
    let invalid =
        matches!(num, 0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0xFDD0..=0xFDEF) || (num & 0xFFFE) == 0xFFFE;
    if invalid {
        return String::new();
    }
    char::from_u32(num as u32).map(String::from).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities() -> Result<(), TokenizerError> {
        let h = HtmlEntities::new()?;
        assert_eq!(h.unescape("a &amp; b &lt;3 &EACUTE;t&eacute;"), "a & b <3 Été");
        assert_eq!(h.unescape("&#39;x&#x27;&#X41;"), "'x'A");
        // Not entities for ftfy: no semicolon, unknown name, mixed body, ';' result, too long.
        assert_eq!(h.unescape("&amp &bogus; &#12ab; &#59;"), "&amp &bogus; &#12ab; &#59;");
        assert_eq!(h.unescape("&#0;&#1;&#128;&#99999999999999;"), "\u{FFFD}€\u{FFFD}");
        Ok(())
    }
}
