//! kohya's `--config_file` and `--output_config` (train_util.read_config_from_file):
//!
//! - `--config_file X` reads `X` (".toml" is appended when missing). Sections are flattened one
//!   level (`[training] learning_rate = 1e-6` is `learning_rate`). A value from the file replaces
//!   kohya's default; a flag given on the command line wins over the file.
//! - `--config_file X --output_config` writes the flags that differ from the defaults to X and
//!   exits; it refuses to overwrite an existing X, as kohya does.
//!
//! Differences from kohya, on purpose: file values go through the same parser as command-line
//! values (kohya stores them unchecked), unknown keys are errors naming the nearest flag (kohya
//! keeps them silently), and `--output_config` without `--config_file` is an error (kohya then
//! ignores it and trains).

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, FromArgMatches};

use super::{ArgsError, FlagMap, TrainArgs};

/// What `resolve_config_file` did.
#[derive(Debug)]
pub enum ConfigOutcome {
    /// Go on with these flags (the file's values merged in, if a file was given).
    Run(Box<TrainArgs>),
    /// `--output_config`: the config file was written; the command should exit.
    Wrote(PathBuf),
}

/// Keys kohya leaves out of a written config: the config options themselves and the WandB key
/// (a secret). Ours add the dry-run switches, `--device` and `--allow_tf32`, which describe one
/// invocation on one machine, not a training setup.
const NOT_WRITTEN: &[&str] =
    &["config_file", "output_config", "wandb_api_key", "dry_run", "json", "device", "allow_tf32"];

/// kohya's rule for the file name.
pub fn config_path(name: &str) -> PathBuf {
    if name.ends_with(".toml") {
        PathBuf::from(name)
    } else {
        PathBuf::from(format!("{name}.toml"))
    }
}

/// Applies `--config_file`/`--output_config` to flags parsed from `matches` (the matches tell
/// which flags were typed on the command line).
pub fn resolve_config_file(args: TrainArgs, matches: &ArgMatches) -> Result<ConfigOutcome, ArgsError> {
    let Some(name) = args.run.config_file.clone() else {
        if args.run.output_config {
            return Err(ArgsError::Usage(
                "--output_config needs --config_file FILE: the file to write the flags to".into(),
            ));
        }
        return Ok(ConfigOutcome::Run(Box::new(args)));
    };
    let path = config_path(&name);
    if args.run.output_config {
        write_config(&args, &path)?;
        return Ok(ConfigOutcome::Wrote(path));
    }
    let merged = read_config(args, matches, &path)?;
    Ok(ConfigOutcome::Run(Box::new(merged)))
}

fn file_error(path: &Path, message: impl Into<String>) -> ArgsError {
    ArgsError::ConfigFile { path: path.display().to_string(), message: message.into() }
}

/// Writes the flags that differ from kohya's defaults, one TOML section per `--help` group.
pub fn write_config(args: &TrainArgs, path: &Path) -> Result<(), ArgsError> {
    if path.exists() {
        return Err(file_error(path, "already exists; not overwriting it (choose another --config_file)"));
    }
    let defaults = TrainArgs::defaults()?.to_flag_map()?;
    let groups: [(&str, serde_json::Result<serde_json::Value>); 12] = [
        ("run", serde_json::to_value(&args.run)),
        ("model", serde_json::to_value(&args.model)),
        ("dataset", serde_json::to_value(&args.dataset)),
        ("training", serde_json::to_value(&args.training)),
        ("loss", serde_json::to_value(&args.loss)),
        ("optimizer", serde_json::to_value(&args.optimizer)),
        ("memory", serde_json::to_value(&args.memory)),
        ("saving", serde_json::to_value(&args.saving)),
        ("metadata", serde_json::to_value(&args.metadata)),
        ("sampling", serde_json::to_value(&args.sampling)),
        ("logging", serde_json::to_value(&args.logging)),
        ("out_of_scope", serde_json::to_value(&args.out_of_scope)),
    ];
    let mut doc = toml::Table::new();
    for (section, value) in groups {
        let value = value.map_err(|e| ArgsError::Internal(format!("cannot serialize [{section}]: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(ArgsError::Internal(format!("[{section}] is not a map")));
        };
        let mut table = toml::Table::new();
        for (key, v) in map {
            if v.is_null() || NOT_WRITTEN.contains(&key.as_str()) || defaults.get(&key) == Some(&v) {
                continue;
            }
            let tv = toml::Value::try_from(&v)
                .map_err(|e| ArgsError::Internal(format!("cannot write {key} as TOML: {e}")))?;
            table.insert(key, tv);
        }
        if !table.is_empty() {
            doc.insert(section.to_string(), toml::Value::Table(table));
        }
    }
    let text = toml::to_string(&doc).map_err(|e| ArgsError::Internal(format!("cannot format TOML: {e}")))?;
    let header = "# sdbooth train flags (kohya --config_file format): flags that differ from the defaults.\n";
    write_atomic(path, &format!("{header}{text}")).map_err(|e| file_error(path, format!("cannot write: {e}")))
}

/// Temp file in the same folder, fsync, rename: an interrupted write never leaves half a file.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// 1-based line of `key = ...` in the TOML text, for error messages.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix(key).or_else(|| {
                l.strip_prefix('"').and_then(|r| r.strip_prefix(key)).and_then(|r| r.strip_prefix('"'))
            });
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// Edit distance, for "did you mean".
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn nearest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (levenshtein(key, c), c))
        .filter(|(d, _)| *d <= 3.max(key.len() / 3))
        .min()
        .map(|(_, c)| c)
}

/// A TOML scalar as a command-line value (None for tables, arrays, booleans and dates).
fn scalar_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        // Rust prints the shortest text that parses back to the same f64.
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// The command-line tokens that a config value stands for, or why it cannot be one.
fn tokens_for(arg: &clap::Arg, key: &str, value: &toml::Value) -> Result<Vec<String>, String> {
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{key}")]),
            toml::Value::Boolean(false) => Ok(vec![]),
            _ => Err(format!("expected true or false, found {}", value.type_str())),
        };
    }
    let multi = matches!(arg.get_action(), ArgAction::Append);
    match value {
        toml::Value::Array(items) if multi => items
            .iter()
            .map(|i| {
                scalar_text(i)
                    .map(|t| format!("--{key}={t}"))
                    .ok_or_else(|| format!("expected strings in the array, found {}", i.type_str()))
            })
            .collect(),
        // A single string is accepted for a list flag: one item.
        _ => scalar_text(value).map(|t| vec![format!("--{key}={t}")]).ok_or_else(|| {
            format!(
                "expected a {}, found {}",
                if multi { "list of strings" } else { "string or number" },
                value.type_str()
            )
        }),
    }
}

/// The first line of a clap error, without clap's "error: " prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid value");
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

fn read_config(args: TrainArgs, matches: &ArgMatches, path: &Path) -> Result<TrainArgs, ArgsError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    let doc: toml::Table =
        text.parse().map_err(|e: toml::de::Error| file_error(path, e.to_string().trim_end()))?;
    // kohya flattens one level of sections; a later key replaces an earlier one.
    let mut flat: Vec<(String, toml::Value)> = Vec::new();
    for (k, v) in doc {
        match v {
            toml::Value::Table(section) => flat.extend(section),
            other => flat.push((k, other)),
        }
    }
    let cmd = TrainArgs::command("config");
    let mut errors = Vec::new();
    let mut tokens = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in &flat {
        let at = |msg: String| match line_of(&text, key) {
            Some(line) => format!("line {line}: {key}: {msg}"),
            None => format!("{key}: {msg}"),
        };
        let Some(arg) = cmd.get_arguments().find(|a| a.get_id().as_str() == key) else {
            let hint = nearest(key, cmd.get_arguments().map(|a| a.get_id().as_str()))
                .map(|n| format!(" (did you mean '{n}'?)"))
                .unwrap_or_default();
            errors.push(at(format!("unknown key{hint}")));
            continue;
        };
        if key == "config_file" || key == "output_config" {
            errors.push(at("only allowed on the command line".into()));
            continue;
        }
        if matches.value_source(key) == Some(ValueSource::CommandLine) {
            continue; // the command line wins
        }
        match tokens_for(arg, key, value) {
            Ok(t) => {
                // Check each key alone, so a bad value is reported with its key and line.
                if let Err(e) = cmd.clone().try_get_matches_from(&t) {
                    errors.push(at(clap_message(&e)));
                    continue;
                }
                tokens.extend(t);
                keys.push(key.clone());
            }
            Err(msg) => errors.push(at(msg)),
        }
    }
    if !errors.is_empty() {
        return Err(file_error(path, errors.join("\n  ")));
    }
    let from_file = cmd
        .try_get_matches_from(&tokens)
        .and_then(|m| TrainArgs::from_arg_matches(&m))
        .map_err(|e| file_error(path, clap_message(&e)))?;
    let file_map = from_file.to_flag_map()?;
    let mut merged: FlagMap = args.to_flag_map()?;
    for key in keys {
        if let Some(v) = file_map.get(&key) {
            merged.insert(key, v.clone());
        }
    }
    TrainArgs::from_flag_map(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a command line the way the binary does, then applies the config file.
    fn run(cli: &[&str]) -> Result<ConfigOutcome, ArgsError> {
        let m = TrainArgs::command("train")
            .try_get_matches_from(cli)
            .map_err(|e| ArgsError::Usage(e.to_string()))?;
        let a = TrainArgs::from_arg_matches(&m).map_err(|e| ArgsError::Usage(e.to_string()))?;
        resolve_config_file(a, &m)
    }

    fn args_of(o: Result<ConfigOutcome, ArgsError>) -> TrainArgs {
        match o {
            Ok(ConfigOutcome::Run(a)) => *a,
            Ok(ConfigOutcome::Wrote(p)) => panic!("unexpected write to {}", p.display()),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn file_values_replace_defaults_and_cli_wins() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let dir = match dir {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let cfg = dir.path().join("cfg.toml");
        let text = "[model]\npretrained_model_name_or_path = \"m.safetensors\"\n\n[training]\nlearning_rate = 1e-6\nmax_train_steps = 400\nxformers = true\nmax_token_length = 225\noptimizer_args = [\"weight_decay=0.01\", \"betas=0.9,0.999\"]\nlr_warmup_steps = 0.1\nseed = 5\n";
        assert!(std::fs::write(&cfg, text).is_ok());
        let cfg_s = cfg.to_string_lossy().to_string();
        // Without the .toml suffix, as kohya allows; --max_train_steps on the command line wins.
        let stem = cfg_s.trim_end_matches(".toml").to_string();
        let a = args_of(run(&["--config_file", &stem, "--max_train_steps=50", "--seed", "9"]));
        assert_eq!(a.optimizer.learning_rate, 1e-6);
        assert_eq!(a.training.max_train_steps, 50);
        assert_eq!(a.training.seed, Some(9));
        assert!(a.memory.xformers);
        assert_eq!(a.model.max_token_length, Some(225));
        assert_eq!(a.model.pretrained_model_name_or_path.as_deref(), Some("m.safetensors"));
        assert_eq!(a.optimizer.optimizer_args, vec!["weight_decay=0.01", "betas=0.9,0.999"]);
        assert_eq!(a.optimizer.lr_warmup_steps, super::super::types::StepsOrRatio::Ratio(0.1));
    }

    #[test]
    fn bad_keys_and_values_name_line_and_key() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let cfg = dir.path().join("bad.toml");
        let text = "learning_rat = 1e-6\nmixed_precision = \"fp32\"\nxformers = \"yes\"\n";
        assert!(std::fs::write(&cfg, text).is_ok());
        let msg = match run(&["--config_file", &cfg.to_string_lossy()]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error"),
        };
        assert!(msg.contains("bad.toml"), "{msg}");
        assert!(msg.contains("line 1: learning_rat: unknown key (did you mean 'learning_rate'?)"), "{msg}");
        assert!(msg.contains("line 2: mixed_precision:") && msg.contains("fp32"), "{msg}");
        assert!(msg.contains("line 3: xformers: expected true or false"), "{msg}");
    }

    #[test]
    fn output_config_round_trips() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let cfg = dir.path().join("out.toml").to_string_lossy().to_string();
        let flags = [
            "--learning_rate=3e-7",
            "--mixed_precision=bf16",
            "--lr_warmup_steps=5%",
            "--optimizer_args",
            "weight_decay=0.01",
            "--save_model_as=diffusers_safetensors",
            "--sample_sampler=dpmsolver++",
            "--stop_text_encoder_training=-1",
            "--gradient_checkpointing",
            "--dry_run",
        ];
        let mut cli = vec!["--config_file", cfg.as_str(), "--output_config"];
        cli.extend(flags);
        match run(&cli) {
            Ok(ConfigOutcome::Wrote(p)) => assert_eq!(p, PathBuf::from(&cfg)),
            other => panic!("expected a write, got {other:?}"),
        }
        let text = std::fs::read_to_string(&cfg).unwrap_or_default();
        let doc: toml::Table = text.parse().unwrap_or_default();
        let lr = doc.get("optimizer").and_then(|o| o.get("learning_rate")).and_then(|v| v.as_float());
        assert_eq!(lr, Some(3e-7), "{text}");
        assert!(!text.contains("dry_run"), "{text}");
        // Writing again refuses to overwrite.
        assert!(run(&cli).is_err());
        // Reading it back gives the same flags as the command line (the dry run switch aside).
        let back = args_of(run(&["--config_file", &cfg]));
        let direct = match TrainArgs::try_parse_from(&flags[..flags.len() - 1]) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let mut back = back;
        back.run.config_file = None;
        assert_eq!(back, direct);
    }

    #[test]
    fn output_config_needs_a_file() {
        assert!(matches!(run(&["--output_config"]), Err(ArgsError::Usage(_))));
    }

    #[test]
    fn missing_file_is_named() {
        let msg = match run(&["--config_file", "/nonexistent/x"]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error"),
        };
        assert!(msg.contains("/nonexistent/x.toml"), "{msg}");
    }

    #[test]
    fn helpers() {
        assert_eq!(line_of("a = 1\n  bb = 2\n\"c\" = 3", "bb"), Some(2));
        assert_eq!(line_of("a = 1\n  bb = 2\n\"c\" = 3", "c"), Some(3));
        assert_eq!(line_of("abc = 1", "ab"), None);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(nearest("xformer", ["xformers", "sdpa"].into_iter()), Some("xformers"));
        assert_eq!(nearest("zzzzzzzz", ["xformers", "sdpa"].into_iter()), None);
        assert_eq!(config_path("a"), PathBuf::from("a.toml"));
        assert_eq!(config_path("a.toml"), PathBuf::from("a.toml"));
    }
}
