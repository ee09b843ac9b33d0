//! kohya's sample prompts: one prompt a line with `--n` (negative prompt), `--w`/`--h` (size),
//! `--d` (seed), `--l` (CFG scale), `--s` (steps) options, as train_util.line_to_prompt_dict
//! reads them; plus the `.toml`/`.json` forms (`prompt`, `negative_prompt`, `width`, ...).

use std::path::Path;

use sdbooth_models::vae::{check_image_side_limit, check_image_size_before_loading};
use sdbooth_models::ModelError;
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
    /// The 1-based line of a text prompt file (TOML/JSON prompts are named by their number).
    #[serde(skip)]
    pub line: Option<usize>,
}

impl PromptSpec {
    /// Where this prompt is, for messages: `file:line` (text files) or `file: prompt N`.
    pub fn location(&self, file: &Path, index: usize) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", file.display()),
            None => format!("{}: prompt {}", file.display(), index + 1),
        }
    }

    /// The size this prompt asks for: its own `--w`/`--h`, else `default`.
    pub fn size_or(&self, default: (usize, usize)) -> (usize, usize) {
        (self.width.unwrap_or(default.0), self.height.unwrap_or(default.1))
    }
}

/// kohya's size of a training sample whose prompt has no `--w`/`--h`.
pub const KOHYA_SAMPLE_SIZE: (usize, usize) = (512, 512);

/// kohya's size of a training sample (train_util.sample_image_inference): each side rounded
/// down to a multiple of 8, and at least 64. Training samples take any size this way; `generate`
/// refuses sizes the VAE cannot make instead, as diffusers' pipeline does.
pub fn kohya_sample_size((width, height): (usize, usize)) -> (usize, usize) {
    ((width - width % 8).max(64), (height - height % 8).max(64))
}

/// Refuses the first prompt whose size (its own, else `default`) the VAE cannot make, or that
/// is too large to make, naming its file and line, before any model is loaded (`generate`).
pub fn check_prompt_sizes(file: &Path, specs: &[PromptSpec], default: (usize, usize)) -> Result<(), String> {
    check_each_prompt_size(file, specs, default, check_image_size_before_loading)
}

/// Refuses the first training-sample prompt whose size is too large to make, naming its file and
/// line, before any model is loaded. Other sizes are rounded as kohya does ([`kohya_sample_size`]),
/// and the rounded size is the one checked.
pub fn check_sample_prompt_sizes(
    file: &Path,
    specs: &[PromptSpec],
    default: (usize, usize),
) -> Result<(), String> {
    check_each_prompt_size(file, specs, default, |w, h| {
        let (w, h) = kohya_sample_size((w, h));
        check_image_side_limit(w, h)
    })
}

fn check_each_prompt_size(
    file: &Path,
    specs: &[PromptSpec],
    default: (usize, usize),
    check: impl Fn(usize, usize) -> Result<(), ModelError>,
) -> Result<(), String> {
    for (i, spec) in specs.iter().enumerate() {
        let (w, h) = spec.size_or(default);
        if let Err(e) = check(w, h) {
            return Err(format!("{} (--w {w} --h {h}): {e}", spec.location(file, i)));
        }
    }
    Ok(())
}

/// A note for each training sample whose size kohya's rounding changes, naming its line.
pub fn rounding_notes(file: &Path, specs: &[PromptSpec], default: (usize, usize)) -> Vec<String> {
    let mut notes = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let asked = spec.size_or(default);
        let made = kohya_sample_size(asked);
        if made != asked {
            notes.push(format!(
                "{}: the sample is made at {}x{}, not {}x{} (rounded down to a multiple of 8, at \
                 least 64, as kohya does)",
                spec.location(file, i),
                made.0,
                made.1,
                asked.0,
                asked.1
            ));
        }
    }
    notes
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
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptSpec>, String> {
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
        _ => Ok(text
            .lines()
            .enumerate()
            .filter_map(|(i, line)| {
                parse_prompt_line(line).map(|spec| PromptSpec { line: Some(i + 1), ..spec })
            })
            .collect()),
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
    fn sizes_are_checked_and_rounded_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.txt");
        assert!(std::fs::write(&file, "# sizes\na --w 72\n\nb --w 70 --h 64\n").is_ok());
        let specs = read_prompt_file(&file).unwrap_or_default();
        assert_eq!(specs.iter().map(|s| s.line).collect::<Vec<_>>(), vec![Some(2), Some(4)]);
        assert_eq!(check_prompt_sizes(&file, &specs[..1], (512, 512)), Ok(()));
        let err = check_prompt_sizes(&file, &specs, (512, 512)).err().unwrap_or_default();
        assert!(err.starts_with(&format!("{}:4 (--w 70 --h 64): ", file.display())), "{err}");
        // The default size is checked too; a prompt without --w/--h takes it.
        let err = check_prompt_sizes(&file, &specs[..1], (512, 20)).err().unwrap_or_default();
        assert!(err.contains(":2 (--w 72 --h 20)"), "{err}");
        assert_eq!(kohya_sample_size((70, 8)), (64, 64));
        assert_eq!(kohya_sample_size((72, 520)), (72, 520));
        let notes = rounding_notes(&file, &specs, (512, 512));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("p.txt:4: the sample is made at 64x64, not 70x64"), "{notes:?}");
        let json = PromptSpec { prompt: "c".into(), width: Some(9), ..Default::default() };
        assert!(check_prompt_sizes(&file, &[json], (512, 512)).is_err_and(|e| e.contains(": prompt 1 ")));
    }

    #[test]
    fn sizes_too_large_to_make_are_refused_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.txt");
        assert!(std::fs::write(&file, "a --w 4096 --h 4096\nb --w 100000\n").is_ok());
        let specs = read_prompt_file(&file).unwrap_or_default();
        assert_eq!(check_prompt_sizes(&file, &specs[..1], (512, 512)), Ok(()));
        assert_eq!(check_sample_prompt_sizes(&file, &specs[..1], (512, 512)), Ok(()));
        for err in [
            check_prompt_sizes(&file, &specs, (512, 512)).err().unwrap_or_default(),
            check_sample_prompt_sizes(&file, &specs, (512, 512)).err().unwrap_or_default(),
        ] {
            assert!(err.contains("p.txt:2 (--w 100000 --h 512): "), "{err}");
            assert!(err.contains("at most 8192 pixels"), "{err}");
        }
        // Training samples check the size kohya's rounding makes: 8199 becomes 8192.
        let spec = PromptSpec { prompt: "c".into(), width: Some(8199), ..Default::default() };
        assert_eq!(check_sample_prompt_sizes(&file, std::slice::from_ref(&spec), (512, 512)), Ok(()));
        assert!(check_prompt_sizes(&file, &[spec], (512, 512)).is_err());
        // The default size is checked as well.
        assert!(check_sample_prompt_sizes(&file, &specs[..1], (512, 9000)).is_ok());
        let spec = PromptSpec { prompt: "d".into(), ..Default::default() };
        assert!(check_sample_prompt_sizes(&file, &[spec], (512, 9000)).is_err());
    }

    #[test]
    fn bad_numbers_keep_defaults() {
        let p = parse_prompt_line("a cat --w wide --s 10").unwrap();
        assert_eq!((p.width, p.steps), (None, Some(10)));
    }
}
