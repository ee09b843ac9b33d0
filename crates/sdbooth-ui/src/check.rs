//! From the form to a command line, and the checks before a run, all by the CLI itself:
//! clap's parser and the supported-flags table of `TrainArgs` (what `sdbooth train` calls), the
//! dry run (`sdbooth train ... --dry_run --json FILE`, a child process) and the `--config_file`
//! TOML (`sdbooth train ... --config_file FILE --output_config`, a child process).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use sdbooth_train::args::TrainArgs;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dataset::{self, DatasetFolders};
use crate::flags;

/// The Set-up page's request.
#[derive(Debug, Clone, Deserialize)]
pub struct SetupRequest {
    /// Flag name → value, kohya's names.
    #[serde(default)]
    pub flags: serde_json::Map<String, Value>,
    /// Instance/reg folders: the UI writes a dataset TOML from them (instead of `dataset_config`).
    #[serde(default)]
    pub dataset_folders: Option<DatasetFolders>,
    /// Sample prompts (kohya's prompt-file format), written to `prompts.txt` for `--sample_prompts`.
    #[serde(default)]
    pub sample_prompts: String,
}

/// A command line ready to run.
#[derive(Debug, Clone, Serialize)]
pub struct Prepared {
    pub argv: Vec<String>,
    /// Where the child runs: the dataset TOML's folder (kohya resolves `image_dir` from the
    /// working directory, and the README runs from the TOML's folder), else the UI's.
    pub cwd: PathBuf,
    pub output_dir: PathBuf,
    pub output_name: String,
    /// `cd DIR && sdbooth train ...`, copyable.
    pub command: String,
}

/// Flags whose value is a path: a relative one is taken from the UI's working directory and
/// passed on absolute, since the child may run elsewhere.
const PATH_FLAGS: &[&str] = &[
    "pretrained_model_name_or_path",
    "dataset_config",
    "train_data_dir",
    "reg_data_dir",
    "output_dir",
    "logging_dir",
    "sample_prompts",
    "vae",
    "resume",
    "tokenizer_cache_dir",
];

fn flag_str(flags: &serde_json::Map<String, Value>, name: &str) -> String {
    match flags.get(name) {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// Builds the command line of a request. `run_dir` is the run's folder: the default output
/// folder and where `prompts.txt` goes.
pub fn prepare(req: &SetupRequest, ui_cwd: &Path, run_dir: &Path) -> Result<Prepared, String> {
    let mut values = req.flags.clone();
    if let Some(folders) = req.dataset_folders.as_ref().filter(|f| !f.instance_dir.trim().is_empty()) {
        if !flag_str(&values, "dataset_config").is_empty() {
            return Err("choose either a dataset TOML or instance/regularization folders, not both".into());
        }
        let toml = dataset::write_beside(folders, ui_cwd)?;
        values.insert("dataset_config".into(), Value::String(toml.display().to_string()));
    }
    if !req.sample_prompts.trim().is_empty() {
        std::fs::create_dir_all(run_dir).map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let path = run_dir.join("prompts.txt");
        crate::runs::write_atomic(&path, req.sample_prompts.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        values.insert("sample_prompts".into(), Value::String(path.display().to_string()));
    }
    for name in PATH_FLAGS {
        let v = flag_str(&values, name);
        if v.is_empty() || v.starts_with("builtin:") || Path::new(&v).is_absolute() {
            continue;
        }
        // An `org/name` model id that is not a path stays an id (the HF cache resolves it).
        let abs = ui_cwd.join(&v);
        if *name != "pretrained_model_name_or_path" || abs.exists() {
            values.insert(name.to_string(), Value::String(abs.display().to_string()));
        }
    }
    if flag_str(&values, "output_dir").is_empty() {
        values.insert("output_dir".into(), Value::String(run_dir.display().to_string()));
    }
    if flag_str(&values, "output_name").is_empty() {
        values.insert("output_name".into(), Value::String("model".into()));
    }
    let output_dir = PathBuf::from(flag_str(&values, "output_dir"));
    let output_name = flag_str(&values, "output_name");
    let dataset_config = flag_str(&values, "dataset_config");
    let cwd = match Path::new(&dataset_config).parent() {
        Some(dir) if !dataset_config.is_empty() => dir.to_path_buf(),
        _ => ui_cwd.to_path_buf(),
    };
    let argv = flags::command_line(&values)?;
    let mut words = vec!["sdbooth".to_string(), "train".to_string()];
    words.extend(argv.iter().cloned());
    let command =
        format!("cd {} && {}", flags::shell_line(&[cwd.display().to_string()]), flags::shell_line(&words));
    Ok(Prepared { argv, cwd, output_dir, output_name, command })
}

/// The checks of a prepared command line.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    /// clap's message for a value it does not accept (nothing else ran then).
    pub parse_error: Option<String>,
    /// Flags `sdbooth train` refuses, with its messages.
    pub refusals: Vec<String>,
    /// Flags it accepts and ignores, with its warnings.
    pub warnings: Vec<String>,
    /// The dry run's JSON report (subsets, repeats, reg balance, buckets, steps, skipped files).
    pub dry_run: Option<Value>,
    /// What the dry run printed on stderr (its errors: bad files with reasons, bad TOML keys).
    pub dry_run_messages: Vec<String>,
    pub dry_run_ok: bool,
    /// The `--config_file` TOML the CLI writes for these flags.
    pub config_toml: Option<String>,
    /// Whether a run of these flags can start.
    pub ok: bool,
}

/// Parses with the CLI's parser and asks `TrainArgs` which flags training refuses.
pub fn validate(argv: &[String]) -> CheckReport {
    let args = match TrainArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            return CheckReport {
                parse_error: Some(e.render().to_string().trim().to_string()),
                ..Default::default()
            }
        }
    };
    CheckReport {
        refusals: args.check_supported().err().unwrap_or_default(),
        warnings: args.ignored_flag_warnings().unwrap_or_default(),
        ..Default::default()
    }
}

/// A scratch folder for one check, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(workdir: &Path) -> Result<Scratch, String> {
    let dir = workdir.join(".checks").join(crate::auth::new_token());
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(Scratch(dir))
}

async fn run_child(exe: &Path, cwd: &Path, args: &[String]) -> Result<(bool, String), String> {
    let out = tokio::process::Command::new(exe)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Every check of a prepared command line: parse, refusals, dry run, config TOML.
pub async fn check(exe: &Path, workdir: &Path, prepared: &Prepared) -> CheckReport {
    let mut report = validate(&prepared.argv);
    if report.parse_error.is_some() {
        return report;
    }
    let scratch = match scratch(workdir) {
        Ok(s) => s,
        Err(e) => {
            report.dry_run_messages.push(e);
            return report;
        }
    };
    let json = scratch.0.join("dry_run.json");
    let mut args = vec!["train".to_string()];
    args.extend(prepared.argv.iter().cloned());
    args.extend(["--dry_run".to_string(), "--json".to_string(), json.display().to_string()]);
    match run_child(exe, &prepared.cwd, &args).await {
        Ok((ok, stderr)) => {
            report.dry_run_ok = ok;
            report.dry_run_messages =
                stderr.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
            report.dry_run = std::fs::read_to_string(&json).ok().and_then(|t| serde_json::from_str(&t).ok());
        }
        Err(e) => report.dry_run_messages.push(e),
    }
    let toml = scratch.0.join("flags.toml");
    let mut args = vec!["train".to_string()];
    args.extend(prepared.argv.iter().cloned());
    args.extend(["--config_file".to_string(), toml.display().to_string(), "--output_config".to_string()]);
    if let Ok((true, _)) = run_child(exe, &prepared.cwd, &args).await {
        report.config_toml = std::fs::read_to_string(&toml).ok();
    }
    report.ok = report.refusals.is_empty() && report.dry_run_ok && report.dry_run.is_some();
    report
}

/// `max_train_steps` of the dry run's step plan.
pub fn total_steps(report: &CheckReport) -> Option<u64> {
    report.dry_run.as_ref()?.get("steps")?.get("max_train_steps")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prepare_fills_output_and_makes_paths_absolute() {
        let Ok(dir) = tempfile::tempdir() else { return };
        assert!(std::fs::write(dir.path().join("ds.toml"), "").is_ok());
        let req: SetupRequest = serde_json::from_value(json!({
            "flags": {"pretrained_model_name_or_path": "builtin:tiny-sd1", "dataset_config": "ds.toml"},
            "sample_prompts": "a photo of sks dog --s 4"
        }))
        .unwrap_or_else(|_| SetupRequest {
            flags: Default::default(),
            dataset_folders: None,
            sample_prompts: "".into(),
        });
        let run_dir = dir.path().join("runs/r1");
        let p = prepare(&req, dir.path(), &run_dir).map_err(|e| e.to_string());
        let Ok(p) = p else { panic!("{p:?}") };
        let ds = format!("--dataset_config={}", dir.path().join("ds.toml").display());
        assert!(p.argv.contains(&ds), "{:?}", p.argv);
        assert!(p.argv.contains(&"--pretrained_model_name_or_path=builtin:tiny-sd1".to_string()));
        assert_eq!(p.output_dir, run_dir);
        assert_eq!(p.output_name, "model");
        assert_eq!(p.cwd, dir.path());
        assert!(run_dir.join("prompts.txt").is_file());
        assert!(p.command.contains("sdbooth train"));
    }

    #[test]
    fn refusals_use_the_cli_messages() {
        let r = validate(&["--full_fp16".to_string()]);
        assert!(r.refusals.iter().any(|m| m.contains("--full_fp16")), "{r:?}");
        let r = validate(&["--learning_rate=fast".to_string()]);
        assert!(r.parse_error.is_some_and(|e| e.contains("fast")));
    }
}
