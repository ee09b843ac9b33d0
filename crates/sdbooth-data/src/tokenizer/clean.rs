//! CLIP's text cleaning: `ftfy.fix_text` (6.3.1, default settings) followed by transformers'
//! `whitespace_clean` and `str.lower()`.
//!
//! ftfy's steps, in its order, and what we do with each:
//! - HTML entities (`&amp;`, `&#8217;`, …), only in lines before the first `<` of the text: done.
//! - mojibake repair (`fix_encoding`: text decoded in the wrong codec, e.g. `cafÃ©`): see
//!   `mojibake.rs`.
//! - C1 control characters read as Windows-1252, Latin ligatures (`ﬁ` → `fi`), full-/half-width
//!   forms (`ＡＢＣ！` → `ABC!`), curly quotes → straight, line breaks, ANSI terminal escapes,
//!   invisible control characters, NFC: done.
//! - lone UTF-16 surrogates: cannot occur in a Rust `str`.
//!
//! ftfy repeats the whole list until the text stops changing; so do we.

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::html::HtmlEntities;
use super::lower::PythonLower;
use super::mojibake::Mojibake;
use super::TokenizerError;

/// Everything ftfy's fixers need, built once (regexes and tables) when the tokenizer loads.
pub(crate) struct TextCleaner {
    html: HtmlEntities,
    mojibake: Mojibake,
    lower: PythonLower,
    /// ANSI escapes such as `ESC[1;31m`. Python's `\d` is any Unicode decimal digit, as Rust's is.
    terminal_escape: Regex,
}

impl TextCleaner {
    pub(crate) fn new() -> Result<Self, TokenizerError> {
        let terminal_escape = Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]")
            .map_err(|e| TokenizerError::Vocabulary(format!("terminal escape regex: {e}")))?;
        Ok(Self {
            html: HtmlEntities::new()?,
            mojibake: Mojibake::new()?,
            lower: PythonLower::new()?,
            terminal_escape,
        })
    }

    /// `ftfy.fix_text` with default settings. ftfy cuts text into segments at each `\n` (and every
    /// 1,000,000 chars; no caption is that long).
    pub(crate) fn fix_text(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        // `unescape_html="auto"`: once a segment contains '<' the text is taken for HTML, and no
        // later segment is unescaped either (ftfy replaces its config for the rest of the loop).
        let mut unescape = true;
        for segment in text.split_inclusive('\n') {
            if unescape && segment.contains('<') {
                unescape = false;
            }
            out.push_str(&self.fix_segment(segment, unescape));
        }
        out
    }

    fn fix_segment(&self, segment: &str, unescape: bool) -> String {
        let mut text = segment.to_string();
        loop {
            let orig = text.clone();
            if unescape {
                text = self.html.unescape(&text);
            }
            text = self.mojibake.fix_encoding(&text);
            text = fix_c1_controls(&text);
            text = fix_latin_ligatures(&text);
            text = fix_character_width(&text);
            text = text.chars().map(uncurl).collect();
            text = fix_line_breaks(&text);
            text = self.terminal_escape.replace_all(&text, "").into_owned();
            text.retain(|c| !is_removed_control(c));
            text = text.nfc().collect();
            if text == orig {
                return text;
            }
        }
    }
}

/// C1 controls (U+0080–U+009F) are almost always Windows-1252 bytes read as Latin-1: ftfy decodes
/// them with its "sloppy" Windows-1252, where the five unassigned bytes stay as they are.
pub(crate) fn fix_c1_controls(text: &str) -> String {
    text.chars()
        .map(|c| if ('\u{80}'..='\u{9F}').contains(&c) { sloppy_cp1252(c as u8) } else { c })
        .collect()
}

/// Windows-1252 for bytes 0x80–0x9F; ftfy's "sloppy" variant maps the undefined ones to Latin-1.
pub(crate) fn sloppy_cp1252(b: u8) -> char {
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8D}', 'Ž', '\u{8F}',
        '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9D}', 'ž', 'Ÿ',
    ];
    if (0x80..0xA0).contains(&b) {
        HIGH[(b - 0x80) as usize]
    } else {
        b as char
    }
}

fn fix_latin_ligatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match latin_ligature(c) {
            Some(parts) => out.extend(parts),
            None => out.push(c),
        }
    }
    out
}

/// ftfy's LIGATURES table: Latin typographic ligatures and legacy digraphs, not `æ`/`œ`.
fn latin_ligature(c: char) -> Option<&'static [char]> {
    Some(match c {
        'Ĳ' => &['I', 'J'],
        'ĳ' => &['i', 'j'],
        'ŉ' => &['ʼ', 'n'],
        'Ǳ' => &['D', 'Z'],
        'ǲ' => &['D', 'z'],
        'ǳ' => &['d', 'z'],
        'Ǆ' => &['D', 'Ž'],
        'ǅ' => &['D', 'ž'],
        'ǆ' => &['d', 'ž'],
        'Ǉ' => &['L', 'J'],
        'ǈ' => &['L', 'j'],
        'ǉ' => &['l', 'j'],
        'Ǌ' => &['N', 'J'],
        'ǋ' => &['N', 'j'],
        'ǌ' => &['n', 'j'],
        'ﬀ' => &['f', 'f'],
        'ﬁ' => &['f', 'i'],
        'ﬂ' => &['f', 'l'],
        'ﬃ' => &['f', 'f', 'i'],
        'ﬄ' => &['f', 'f', 'l'],
        'ﬅ' => &['ſ', 't'],
        'ﬆ' => &['s', 't'],
        _ => return None,
    })
}

/// ftfy's WIDTH_MAP: every char of the Halfwidth and Fullwidth Forms block (U+FF01–U+FFEF) is
/// replaced by its NFKC form, and the ideographic space U+3000 by a plain space.
fn fix_character_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{FF01}'..='\u{FFEF}' => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
    out
}

fn uncurl(c: char) -> char {
    match c {
        '\u{02BC}' | '\u{2018}'..='\u{201B}' => '\'',
        '\u{201C}'..='\u{201F}' => '"',
        _ => c,
    }
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

/// ftfy's CONTROL_CHARS: controls other than tab/newline/CR/form feed, bidi format controls
/// U+206A–U+206F, the BOM, and interlinear annotation marks U+FFF9–U+FFFC.
fn is_removed_control(c: char) -> bool {
    matches!(c,
        '\u{00}'..='\u{08}' | '\u{0B}' | '\u{0E}'..='\u{1F}' | '\u{7F}'
        | '\u{206A}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}')
}

impl TextCleaner {
    /// `whitespace_clean(ftfy.fix_text(text)).lower()`, the whole cleaning of `CLIPTokenizer`.
    pub(crate) fn clean(&self, text: &str) -> String {
        self.lower.lower(&whitespace_clean(&self.fix_text(text)))
    }
}

/// transformers' `whitespace_clean`: runs of `regex`'s `\s` (Unicode White_Space, as Rust's
/// `char::is_whitespace`) become one space; then strip.
pub(crate) fn whitespace_clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = true;
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_fixes() -> Result<(), TokenizerError> {
        let c = TextCleaner::new()?;
        assert_eq!(c.fix_text("“curly” ‘q’"), "\"curly\" 'q'");
        assert_eq!(c.fix_text("ＡＢＣ！\u{3000}ﬁne"), "ABC! fine");
        assert_eq!(c.fix_text("a &amp;amp; b"), "a & b");
        assert_eq!(c.fix_text("<b> &amp;"), "<b> &amp;");
        // HTML is recognised per text, not per line: the second line is not unescaped either.
        assert_eq!(c.fix_text("<i>\n&amp;"), "<i>\n&amp;");
        assert_eq!(c.fix_text("x\u{1b}[1;31my"), "xy");
        assert_eq!(c.fix_text("e\u{301}"), "é");
        Ok(())
    }

    #[test]
    fn whitespace_is_collapsed_and_stripped() {
        assert_eq!(whitespace_clean("  A\t\u{a0} B\n"), "A B");
        assert_eq!(whitespace_clean("\u{2003}"), "");
    }
}
