//! kohya's sample prompts: one prompt a line with `--n` (negative prompt), `--w`/`--h` (size),
//! `--d` (seed), `--l` (CFG scale), `--s` (steps) options, as train_util.line_to_prompt_dict
//! reads them; plus the `.toml`/`.json` forms (`prompt`, `negative_prompt`, `width`, ...).

use serde::Deserialize;

/// One image request. `None` fields take the caller's defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PromptSpec {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default, alias = "sample_steps")]
    pub steps: Option<usize>,
}

/// Parses one line of kohya's prompt-file format. Empty lines and `#` comments give `None`.
/// Options kohya does not know are kept in the prompt, as kohya's parser does (it only matches
/// the options it knows).
pub fn parse_prompt_line(line: &str) -> Option<PromptSpec> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut parts = line.split(" --");
    let mut spec =
        PromptSpec { prompt: parts.next().unwrap_or_default().trim().to_string(), ..Default::default() };
    for part in parts {
        let (key, value) = part.split_once(' ').unwrap_or((part, ""));
        let value = value.trim();
        match key.to_ascii_lowercase().as_str() {
            "n" => spec.negative_prompt = Some(value.to_string()),
            "w" => spec.width = value.parse().ok().or(spec.width),
            "h" => spec.height = value.parse().ok().or(spec.height),
            "d" => spec.seed = value.parse().ok().or(spec.seed),
            "l" => spec.scale = value.parse().ok().or(spec.scale),
            "s" => spec.steps = value.parse().ok().or(spec.steps),
            _ => {}
        }
    }
    Some(spec)
}

/// Reads a prompt file: `.toml` (`[[prompt]]` tables), `.json` (a list of objects) or text.
pub fn read_prompt_file(path: &std::path::Path) -> Result<Vec<PromptSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "toml" => {
            #[derive(Deserialize)]
            struct File {
                prompt: Vec<PromptSpec>,
            }
            toml::from_str::<File>(&text).map(|f| f.prompt).map_err(|e| format!("{}: {e}", path.display()))
        }
        "json" => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        _ => Ok(text.lines().filter_map(parse_prompt_line).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_options_are_read() {
        let p = parse_prompt_line(
            "a photo of sks dog --n blurry, low quality --w 512 --h 768 --d 5 --l 7.5 --s 20",
        )
        .unwrap();
        assert_eq!(p.prompt, "a photo of sks dog");
        assert_eq!(p.negative_prompt.as_deref(), Some("blurry, low quality"));
        assert_eq!(
            (p.width, p.height, p.seed, p.scale, p.steps),
            (Some(512), Some(768), Some(5), Some(7.5), Some(20))
        );
        assert!(parse_prompt_line("# comment").is_none());
        assert!(parse_prompt_line("   ").is_none());
    }

    #[test]
    fn bad_numbers_keep_defaults() {
        let p = parse_prompt_line("a cat --w wide --s 10").unwrap();
        assert_eq!((p.width, p.steps), (None, Some(10)));
    }
}
