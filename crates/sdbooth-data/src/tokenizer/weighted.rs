//! `--weighted_captions`: the A1111 attention syntax as kohya parses it
//! (`TokenizeStrategy._get_weighted_input_ids.parse_prompt_attention` in library/strategy_base.py).
//!
//! `(text)` ×1.1, `[text]` ÷1.1, `(text:1.3)` ×1.3, nesting multiplies, `\(` `\)` `\[` `\]` `\\`
//! are literals, unbalanced brackets apply to the end of the caption.

use regex::Regex;

use super::TokenizerError;

/// The zero of every block of ten decimal digits Python's `re` `\d` and `float()` accept
/// (written by tools/tokenizer/make_tables.py from Python 3.11).
const DIGITS: &str = include_str!("../../assets/python_digits.txt");

pub(crate) struct AttentionParser {
    token: Regex,
    digit_zeros: Vec<u32>,
}

/// One piece of a caption and the attention weight it gets.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedSpan {
    pub text: String,
    pub weight: f64,
}

const ROUND_MULTIPLIER: f64 = 1.1;

impl AttentionParser {
    pub(crate) fn new() -> Result<Self, TokenizerError> {
        let bad = |what: String| TokenizerError::Vocabulary(format!("attention parser: {what}"));
        let line =
            DIGITS.lines().find(|l| !l.starts_with('#')).ok_or_else(|| bad("no digit table".into()))?;
        let digit_zeros = line
            .split(' ')
            .map(|h| u32::from_str_radix(h, 16))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        // Python's `\d` (Unicode 14 decimal digits), spelled out: Rust's `\d` has newer tables.
        let digits: String = digit_zeros.iter().map(|z| format!("\\x{{{z:X}}}-\\x{{{:X}}}", z + 9)).collect();
        // kohya's `_re_attention`, alternatives in the same order.
        let pattern =
            format!(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:([+-]?[.{digits}]+)\)|\)|\]|[^\\()\[\]:]+|:");
        let token = Regex::new(&pattern).map_err(|e| bad(e.to_string()))?;
        Ok(Self { token, digit_zeros })
    }

    /// Python's `float()` on what the regex captured (`[+-]?[.\d]+`): digits of any script count
    /// (full-width `１.５` typed with an IME is 1.5). "1.2.3" and "." raise in Python, where kohya
    /// stops; here they are an error.
    fn parse_python_float(&self, s: &str) -> Option<f64> {
        let mut ascii = String::with_capacity(s.len());
        for c in s.chars() {
            let cp = u32::from(c);
            match c {
                '+' | '-' | '.' | '0'..='9' => ascii.push(c),
                _ => {
                    let zero = self.digit_zeros.iter().find(|&&z| (z..=z + 9).contains(&cp))?;
                    ascii.push(char::from(b'0' + (cp - zero) as u8));
                }
            }
        }
        let digits = ascii.trim_start_matches(['+', '-']);
        if !digits.bytes().any(|b| b.is_ascii_digit()) {
            return None;
        }
        ascii.parse::<f64>().ok()
    }

    /// kohya's `parse_prompt_attention`. Weights are f64 products, as Python computes them; the
    /// runs of equal weight are merged.
    pub(crate) fn parse(&self, text: &str) -> Result<Vec<WeightedSpan>, TokenizerError> {
        let mut res: Vec<WeightedSpan> = Vec::new();
        let mut round: Vec<usize> = Vec::new();
        let mut square: Vec<usize> = Vec::new();
        let multiply = |res: &mut Vec<WeightedSpan>, start: usize, m: f64| {
            for span in &mut res[start..] {
                span.weight *= m;
            }
        };

        for caps in self.token.captures_iter(text) {
            let Some(whole) = caps.get(0) else { continue };
            let tok = whole.as_str();
            let weight = caps.get(1).map(|m| m.as_str());
            if let Some(rest) = tok.strip_prefix('\\') {
                // A lone backslash yields an empty piece: kohya drops it from the caption.
                res.push(WeightedSpan { text: rest.to_string(), weight: 1.0 });
            } else if tok == "(" {
                round.push(res.len());
            } else if tok == "[" {
                square.push(res.len());
            } else if let (Some(w), false) = (weight, round.is_empty()) {
                let value = self.parse_python_float(w).ok_or_else(|| TokenizerError::Weight {
                    caption: text.to_string(),
                    weight: w.to_string(),
                })?;
                if let Some(start) = round.pop() {
                    multiply(&mut res, start, value);
                }
            } else if tok == ")" && !round.is_empty() {
                if let Some(start) = round.pop() {
                    multiply(&mut res, start, ROUND_MULTIPLIER);
                }
            } else if tok == "]" && !square.is_empty() {
                if let Some(start) = square.pop() {
                    multiply(&mut res, start, 1.0 / ROUND_MULTIPLIER);
                }
            } else {
                res.push(WeightedSpan { text: tok.to_string(), weight: 1.0 });
            }
        }
        // Unclosed brackets, in the order kohya applies them.
        for &start in &round {
            multiply(&mut res, start, ROUND_MULTIPLIER);
        }
        for &start in &square {
            multiply(&mut res, start, 1.0 / ROUND_MULTIPLIER);
        }
        if res.is_empty() {
            res.push(WeightedSpan { text: String::new(), weight: 1.0 });
        }
        let mut merged: Vec<WeightedSpan> = Vec::with_capacity(res.len());
        for span in res {
            match merged.last_mut() {
                Some(last) if last.weight == span.weight => last.text.push_str(&span.text),
                _ => merged.push(span),
            }
        }
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(p: &AttentionParser, text: &str) -> Vec<(String, f64)> {
        p.parse(text).unwrap_or_default().into_iter().map(|s| (s.text, s.weight)).collect()
    }

    #[test]
    fn kohya_docstring_examples() -> Result<(), TokenizerError> {
        let p = AttentionParser::new()?;
        let s = |t: &str, w: f64| (t.to_string(), w);
        assert_eq!(spans(&p, "normal text"), vec![s("normal text", 1.0)]);
        assert_eq!(
            spans(&p, "an (important) word"),
            vec![s("an ", 1.0), s("important", 1.1), s(" word", 1.0)]
        );
        assert_eq!(spans(&p, "(unbalanced"), vec![s("unbalanced", 1.1)]);
        assert_eq!(spans(&p, r"\(literal\]"), vec![s("(literal]", 1.0)]);
        assert_eq!(spans(&p, "(unnecessary)(parens)"), vec![s("unnecessaryparens", 1.1)]);
        let got = spans(&p, "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).");
        let want = vec![
            s("a ", 1.0),
            s("house", 1.1 * 1.1 * 1.3),
            s(" ", 1.1),
            s("on", 1.1 / 1.1),
            s(" a ", 1.1),
            s("hill", 0.5 * 1.1),
            s(", sun, ", 1.1),
            s("sky", 1.1 * 1.1 * 1.1 * 1.1),
            s(".", 1.1),
        ];
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.0, w.0);
            assert!((g.1 - w.1).abs() < 1e-12, "{g:?} vs {w:?}");
        }
        Ok(())
    }

    #[test]
    fn bad_weight_is_an_error_not_a_panic() -> Result<(), TokenizerError> {
        let p = AttentionParser::new()?;
        assert!(matches!(p.parse("(cat:1.2.3)"), Err(TokenizerError::Weight { .. })));
        assert!(matches!(p.parse("(cat:.)"), Err(TokenizerError::Weight { .. })));
        assert_eq!(spans(&p, "(cat:１.５)"), vec![("cat".to_string(), 1.5)]);
        assert_eq!(spans(&p, "(cat:٢)"), vec![("cat".to_string(), 2.0)]);
        // Without an open bracket the weight is plain text, as in kohya.
        assert_eq!(spans(&p, "cat:1.2.3)"), vec![("cat:1.2.3)".to_string(), 1.0)]);
        Ok(())
    }
}
