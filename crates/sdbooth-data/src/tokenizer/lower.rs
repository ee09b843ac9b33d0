//! Python 3.11's `str.lower()`, which transformers applies after ftfy. Rust's `to_lowercase` has
//! newer Unicode tables (it lowers ~55 capitals assigned after Unicode 14 that Python leaves), so
//! the mapping and the Final_Sigma rule's properties come from Python itself
//! (assets/python_lower.txt, written by tools/tokenizer/make_tables.py).

use std::collections::HashMap;

use super::TokenizerError;

const TABLE: &str = include_str!("../../assets/python_lower.txt");
const CAPITAL_SIGMA: char = '\u{3A3}';

pub(crate) struct PythonLower {
    mapping: HashMap<char, Vec<char>>,
    /// Sorted, disjoint inclusive ranges.
    ignorable: Vec<(u32, u32)>,
    cased: Vec<(u32, u32)>,
}

fn bad(what: &str) -> TokenizerError {
    TokenizerError::Vocabulary(format!("lower-case table: {what}"))
}

fn parse_ranges(line: &str) -> Result<Vec<(u32, u32)>, TokenizerError> {
    line.split(' ')
        .map(|r| {
            let (a, b) = r.split_once('-').ok_or_else(|| bad("range"))?;
            let a = u32::from_str_radix(a, 16).map_err(|_| bad("range start"))?;
            let b = u32::from_str_radix(b, 16).map_err(|_| bad("range end"))?;
            Ok((a, b))
        })
        .collect()
}

fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let c = u32::from(c);
    match ranges.binary_search_by(|&(a, _)| a.cmp(&c)) {
        Ok(_) => true,
        Err(0) => false,
        Err(i) => ranges[i - 1].1 >= c,
    }
}

impl PythonLower {
    pub(crate) fn new() -> Result<Self, TokenizerError> {
        let mut lines = TABLE.lines().filter(|l| !l.starts_with('#'));
        let ignorable = parse_ranges(lines.next().ok_or_else(|| bad("ignorable line"))?)?;
        let cased = parse_ranges(lines.next().ok_or_else(|| bad("cased line"))?)?;
        let mut mapping = HashMap::new();
        for line in lines {
            let (from, to) = line.split_once('\t').ok_or_else(|| bad("mapping line"))?;
            let hex = |h: &str| u32::from_str_radix(h, 16).ok().and_then(char::from_u32);
            let from = hex(from).ok_or_else(|| bad("mapping key"))?;
            let to =
                to.split(' ').map(hex).collect::<Option<Vec<char>>>().ok_or_else(|| bad("mapping value"))?;
            mapping.insert(from, to);
        }
        Ok(Self { mapping, ignorable, cased })
    }

    pub(crate) fn lower(&self, text: &str) -> String {
        if text.is_ascii() {
            return text.to_ascii_lowercase();
        }
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::with_capacity(text.len());
        for (i, &c) in chars.iter().enumerate() {
            if c == CAPITAL_SIGMA {
                out.push(if self.final_sigma(&chars, i) { 'ς' } else { 'σ' });
            } else if let Some(to) = self.mapping.get(&c) {
                out.extend(to);
            } else {
                out.push(c);
            }
        }
        out
    }

    /// CPython's `handle_capital_sigma`: final when a cased char precedes (skipping
    /// case-ignorable ones) and none follows.
    fn final_sigma(&self, chars: &[char], i: usize) -> bool {
        let ignorable = |c: char| in_ranges(&self.ignorable, c);
        let before = chars[..i].iter().rev().copied().find(|&c| !ignorable(c));
        if !before.is_some_and(|c| in_ranges(&self.cased, c)) {
            return false;
        }
        let after = chars[i + 1..].iter().copied().find(|&c| !ignorable(c));
        !after.is_some_and(|c| in_ranges(&self.cased, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_lower() -> Result<(), TokenizerError> {
        let l = PythonLower::new()?;
        assert_eq!(l.lower("ΟΔΟΣ ΣΟΦΙΑΣ."), "οδος σοφιας.");
        assert_eq!(l.lower("Σ"), "σ");
        assert_eq!(l.lower("İSTANBUL"), "i\u{307}stanbul");
        assert_eq!(l.lower("ẞ ǅ"), "ß ǆ");
        // U+1C89 (Unicode 16) is not a capital for Python 3.11.
        assert_eq!(l.lower("\u{1C89}"), "\u{1C89}");
        Ok(())
    }
}
