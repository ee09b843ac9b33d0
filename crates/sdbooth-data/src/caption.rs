//! Per-step caption processing, in kohya's order (BaseDataset.process_caption): prefix/suffix,
//! dropout, wildcards or first line, keep_tokens(_separator), token warmup, shuffle, tag
//! dropout, secondary separator. Randomness comes from the caller's seeded stream.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::config::CaptionOptions;

/// Where training is, for the epoch/step dependent parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptionContext {
    /// 1-based epoch, as kohya's dataset.current_epoch during training.
    pub epoch: u64,
    /// Global optimisation step (kohya's current_step).
    pub step: u64,
    pub max_train_steps: u64,
}

/// Python's `list[:n]` for a possibly negative n.
fn py_prefix<T>(v: &mut Vec<T>, n: i64) {
    let len = v.len() as i64;
    let keep = if n < 0 { (len + n).max(0) } else { n.min(len) };
    v.truncate(keep as usize);
}

/// Replaces `{a|b|c}` with one choice; `{{` and `}}` stand for literal braces.
fn expand_wildcards(caption: &str, rng: &mut impl Rng) -> String {
    // Private-use placeholders instead of kohya's "⦅": they cannot clash with user text.
    const L: char = '\u{F0001}';
    const R: char = '\u{F0002}';
    let escaped = caption.replace("{{", &L.to_string()).replace("}}", &R.to_string());
    let chars: Vec<char> = escaped.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '{' {
            if let Some(off) = chars[i + 1..].iter().position(|c| *c == '}') {
                if off > 0 {
                    let inner: String = chars[i + 1..i + 1 + off].iter().collect();
                    let opts: Vec<&str> = inner.split('|').collect();
                    out.push_str(opts[rng.gen_range(0..opts.len())]);
                    i += off + 2;
                    continue;
                }
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out.replace(L, "{").replace(R, "}")
}

fn split_strip(s: &str, sep: &str) -> Vec<String> {
    s.split(sep).map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
}

/// The caption for one sample at one step.
pub fn process_caption(o: &CaptionOptions, caption: &str, ctx: CaptionContext, rng: &mut impl Rng) -> String {
    let mut caption = caption.to_string();
    if let Some(p) = o.caption_prefix.as_deref().filter(|p| !p.is_empty()) {
        caption = format!("{p} {caption}");
    }
    if let Some(s) = o.caption_suffix.as_deref().filter(|s| !s.is_empty()) {
        caption = format!("{caption} {s}");
    }
    let mut drop = o.caption_dropout_rate > 0.0 && rng.gen::<f64>() < o.caption_dropout_rate;
    drop = drop
        || (o.caption_dropout_every_n_epochs > 0
            && ctx.epoch.is_multiple_of(o.caption_dropout_every_n_epochs as u64));
    if drop {
        return String::new();
    }
    if o.enable_wildcard {
        if caption.contains('\n') {
            let lines: Vec<&str> = caption.split('\n').collect();
            caption = lines[rng.gen_range(0..lines.len())].to_string();
        }
        caption = expand_wildcards(&caption, rng);
    } else {
        caption = caption.split('\n').next().unwrap_or("").to_string();
    }
    let sep = o.caption_separator.as_str();
    if o.shuffle_caption || o.token_warmup_step > 0.0 || o.caption_tag_dropout_rate > 0.0 {
        let mut fixed: Vec<String> = Vec::new();
        let mut flex: Vec<String>;
        let mut fixed_suffix: Vec<String> = Vec::new();
        match o.keep_tokens_separator.as_deref().filter(|k| !k.is_empty() && caption.contains(*k)) {
            Some(k) => {
                let (fixed_part, mut flex_part) = caption.split_once(k).unwrap_or((&caption, ""));
                if let Some((f, suffix)) = flex_part.split_once(k) {
                    fixed_suffix = split_strip(suffix, sep);
                    flex_part = f;
                }
                fixed = split_strip(fixed_part, sep);
                flex = split_strip(flex_part, sep);
            }
            None => {
                let tokens: Vec<String> = caption.trim().split(sep).map(|t| t.trim().to_string()).collect();
                flex = tokens.clone();
                if o.keep_tokens > 0 {
                    fixed = tokens.iter().take(o.keep_tokens).cloned().collect();
                    flex = tokens.into_iter().skip(o.keep_tokens).collect();
                }
            }
        }
        // token_warmup_step < 1 means a fraction of max_train_steps (kohya rewrites it once).
        let warm = if o.token_warmup_step < 1.0 {
            (o.token_warmup_step * ctx.max_train_steps as f64).floor()
        } else {
            o.token_warmup_step
        };
        if warm != 0.0 && (ctx.step as f64) < warm {
            let per = (flex.len() as f64 - o.token_warmup_min as f64) / warm;
            let n = (ctx.step as f64 * per).floor() as i64 + o.token_warmup_min as i64;
            py_prefix(&mut flex, n);
        }
        if o.shuffle_caption {
            flex.shuffle(rng);
        }
        if o.caption_tag_dropout_rate > 0.0 {
            flex.retain(|_| rng.gen::<f64>() >= o.caption_tag_dropout_rate);
        }
        fixed.extend(flex);
        fixed.extend(fixed_suffix);
        caption = fixed.join(", ");
    }
    if let Some(s2) = o.secondary_separator.as_deref().filter(|s| !s.is_empty()) {
        caption = caption.replace(s2, sep);
    }
    caption
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ctx() -> CaptionContext {
        CaptionContext { epoch: 1, step: 0, max_train_steps: 100 }
    }

    #[test]
    fn keep_tokens_stay_first_and_rest_is_permuted() {
        let o = CaptionOptions { shuffle_caption: true, keep_tokens: 2, ..Default::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let c = process_caption(&o, "sks dog, photo, a, b, c, d", ctx(), &mut rng);
            assert!(c.starts_with("sks dog, photo, "), "{c}");
            let mut rest: Vec<&str> = c["sks dog, photo, ".len()..].split(", ").collect();
            seen.insert(rest.join(","));
            rest.sort();
            assert_eq!(rest, vec!["a", "b", "c", "d"]);
        }
        assert!(seen.len() > 5, "shuffle should produce many orders, got {}", seen.len());
    }

    #[test]
    fn keep_tokens_separator_with_suffix_part() {
        let o = CaptionOptions {
            shuffle_caption: true,
            keep_tokens_separator: Some("|||".into()),
            ..Default::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let c = process_caption(&o, "sks, dog ||| a, b ||| end, tail", ctx(), &mut rng);
        assert!(c.starts_with("sks, dog, "), "{c}");
        assert!(c.ends_with(", end, tail"), "{c}");
    }

    #[test]
    fn first_line_only_and_prefix_suffix_and_secondary() {
        let o = CaptionOptions {
            caption_prefix: Some("pre".into()),
            caption_suffix: Some("post".into()),
            secondary_separator: Some(";;;".into()),
            ..Default::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        // kohya adds the suffix before taking the first line, so it is lost on multi-line text.
        assert_eq!(process_caption(&o, "a;;;b\nsecond", ctx(), &mut rng), "pre a,b");
        assert_eq!(process_caption(&o, "a;;;b", ctx(), &mut rng), "pre a,b post");
    }

    #[test]
    fn wildcards_pick_options_and_keep_escaped_braces() {
        let o = CaptionOptions { enable_wildcard: true, ..Default::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let c = process_caption(&o, "a {red|blue} {{x}} dog", ctx(), &mut rng);
            assert!(c == "a red {x} dog" || c == "a blue {x} dog", "{c}");
            seen.insert(c);
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn dropout_every_n_epochs_and_rate() {
        let o = CaptionOptions { caption_dropout_every_n_epochs: 2, ..Default::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        assert_eq!(process_caption(&o, "x", CaptionContext { epoch: 1, ..ctx() }, &mut rng), "x");
        assert_eq!(process_caption(&o, "x", CaptionContext { epoch: 2, ..ctx() }, &mut rng), "");
        let o = CaptionOptions { caption_dropout_rate: 0.5, ..Default::default() };
        let dropped = (0..400).filter(|_| process_caption(&o, "x", ctx(), &mut rng).is_empty()).count();
        assert!((150..250).contains(&dropped), "{dropped}");
    }

    #[test]
    fn token_warmup_grows_with_step() {
        let o = CaptionOptions { token_warmup_min: 1, token_warmup_step: 10.0, ..Default::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let at = |step, rng: &mut rand_chacha::ChaCha8Rng| {
            process_caption(&o, "a, b, c, d, e", CaptionContext { step, ..ctx() }, rng)
        };
        assert_eq!(at(0, &mut rng), "a");
        assert_eq!(at(5, &mut rng), "a, b, c");
        assert_eq!(at(10, &mut rng), "a, b, c, d, e");
    }

    #[test]
    fn tag_dropout_never_drops_kept_tokens() {
        let o = CaptionOptions { caption_tag_dropout_rate: 1.0, keep_tokens: 1, ..Default::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        assert_eq!(process_caption(&o, "sks dog, a, b", ctx(), &mut rng), "sks dog");
    }
}
