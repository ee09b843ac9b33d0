//! The train flags the form shows, read from `TrainArgs`' clap command (the definitions
//! `sdbooth train` parses with), so a flag added to the CLI appears in the UI with its group, help
//! and default; and the form's values turned back into a `sdbooth train` command line.

use sdbooth_train::args::TrainArgs;
use serde::Serialize;
use serde_json::Value;

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagKind {
    /// `--flag` alone.
    Switch,
    /// `--flag=value`.
    Value,
    /// `--flag a b c` (e.g. `--optimizer_args`); the form takes them space-separated.
    List,
}

/// One flag as the form shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FlagInfo {
    pub name: String,
    /// The `train --help` group.
    pub group: String,
    pub help: String,
    /// kohya's default as typed on a command line ("" when the flag has none).
    pub default: String,
    pub kind: FlagKind,
    /// The values clap accepts, when it lists them.
    pub choices: Vec<String>,
    pub value_name: String,
}

/// Groups the UI sets itself (`--dry_run`, `--config_file`, ...) or that training refuses in
/// every case: not in the form.
const GROUPS_NOT_SHOWN: &[&str] = &["Run", "Refused (out of scope)"];

/// Every flag of `sdbooth train`, in `--help` order, without the groups in [`GROUPS_NOT_SHOWN`]
/// and without hidden aliases.
pub fn flag_schema() -> Vec<FlagInfo> {
    let cmd = TrainArgs::command("train");
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| {
            let name = a.get_long()?.to_string();
            let group = a.get_help_heading().unwrap_or("Other").to_string();
            if GROUPS_NOT_SHOWN.contains(&group.as_str()) {
                return None;
            }
            let kind = if matches!(a.get_action(), clap::ArgAction::SetTrue) {
                FlagKind::Switch
            } else if a.get_num_args().is_some_and(|n| n.max_values() > 1) {
                FlagKind::List
            } else {
                FlagKind::Value
            };
            let default =
                a.get_default_values().iter().map(|v| v.to_string_lossy()).collect::<Vec<_>>().join(" ");
            let default = if kind == FlagKind::Switch { String::new() } else { default };
            Some(FlagInfo {
                name,
                group,
                help: a.get_help().map(|h| h.to_string()).unwrap_or_default(),
                default,
                kind,
                choices: a.get_possible_values().iter().map(|v| v.get_name().to_string()).collect(),
                value_name: a
                    .get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// A named set of flag values the form can apply.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Preset {
    pub name: &'static str,
    pub description: &'static str,
    pub flags: &'static [(&'static str, &'static str)],
}

/// The presets of the Set-up page. Switches are "true".
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "Low memory (the seed's recipe)",
        description: "kohya's DreamBooth guide for small GPUs: AdamW8bit, fp16, cached latents, gradient \
                      checkpointing, lr 1e-6, 1600 steps, prior loss weight 1.0",
        flags: &[
            ("optimizer_type", "AdamW8bit"),
            ("mixed_precision", "fp16"),
            ("cache_latents", "true"),
            ("gradient_checkpointing", "true"),
            ("learning_rate", "1e-6"),
            ("max_train_steps", "1600"),
            ("prior_loss_weight", "1.0"),
            ("train_batch_size", "1"),
            ("save_model_as", "safetensors"),
        ],
    },
    Preset {
        name: "Large GPU",
        description: "24 GB or more: AdamW in bf16, batch 4 without gradient checkpointing, cached latents, \
                      lr 1e-6, 1600 steps, a state every 400 steps",
        flags: &[
            ("optimizer_type", "AdamW"),
            ("mixed_precision", "bf16"),
            ("cache_latents", "true"),
            ("gradient_checkpointing", "false"),
            ("learning_rate", "1e-6"),
            ("max_train_steps", "1600"),
            ("prior_loss_weight", "1.0"),
            ("train_batch_size", "4"),
            ("save_model_as", "safetensors"),
            ("save_every_n_steps", "400"),
            ("save_state", "true"),
        ],
    },
    Preset {
        name: "CPU overnight",
        description: "No GPU: f32 AdamW, cached latents, gradient checkpointing, 800 steps at lr 1e-6, \
                      a model and a resumable state every 100 steps",
        flags: &[
            ("optimizer_type", "AdamW"),
            ("mixed_precision", "no"),
            ("cache_latents", "true"),
            ("gradient_checkpointing", "true"),
            ("learning_rate", "1e-6"),
            ("max_train_steps", "800"),
            ("prior_loss_weight", "1.0"),
            ("train_batch_size", "1"),
            ("save_model_as", "safetensors"),
            ("save_every_n_steps", "100"),
            ("save_state", "true"),
            ("max_data_loader_n_workers", "2"),
        ],
    },
];

/// Flags the UI sets itself: refused when they come from the form.
const SET_BY_THE_UI: &[&str] = &["dry_run", "json", "config_file", "output_config", "debug_dataset"];

/// The form's values (flag name → string, number, bool, or list) as `sdbooth train` arguments,
/// in the order of the schema. Empty values and switches set to false are left out, so the
/// flag keeps its default. An unknown flag is an error naming it.
pub fn command_line(values: &serde_json::Map<String, Value>) -> Result<Vec<String>, String> {
    let schema = flag_schema();
    for name in values.keys() {
        if SET_BY_THE_UI.contains(&name.as_str()) {
            return Err(format!("--{name} is set by the UI itself, not in the form"));
        }
        if !schema.iter().any(|f| &f.name == name) {
            return Err(format!("--{name} is not a flag of `sdbooth train`"));
        }
    }
    let mut argv = Vec::new();
    for flag in &schema {
        let Some(value) = values.get(&flag.name) else { continue };
        let text = match value {
            Value::Null => continue,
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.trim().to_string(),
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" "),
            Value::Object(_) => return Err(format!("--{}: a value, not an object", flag.name)),
        };
        match flag.kind {
            FlagKind::Switch => match text.as_str() {
                "true" => argv.push(format!("--{}", flag.name)),
                "false" | "" => {}
                other => return Err(format!("--{} is a switch: true or false, not {other:?}", flag.name)),
            },
            FlagKind::Value if text.is_empty() => {}
            // `=` keeps a value that starts with '-' (e.g. `--stop_text_encoder_training=-1`) a value.
            FlagKind::Value => argv.push(format!("--{}={text}", flag.name)),
            FlagKind::List => {
                let items: Vec<&str> = text.split_whitespace().collect();
                if !items.is_empty() {
                    argv.push(format!("--{}", flag.name));
                    argv.extend(items.iter().map(|s| s.to_string()));
                }
            }
        }
    }
    Ok(argv)
}

/// `argv` as one line a POSIX shell reads back the same: words with anything but
/// `[A-Za-z0-9_./=:,+-]` are single-quoted.
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain =
                !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "_./=:,+-@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> serde_json::Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        }
    }

    #[test]
    fn schema_comes_from_the_clap_definitions() {
        let s = flag_schema();
        let lr = s.iter().find(|f| f.name == "learning_rate");
        let lr = lr.map(|f| (f.group.as_str(), f.default.as_str(), f.kind));
        assert_eq!(lr, Some(("Optimizer", "0.000002", FlagKind::Value)));
        let ck = s.iter().find(|f| f.name == "cache_latents").map(|f| f.kind);
        assert_eq!(ck, Some(FlagKind::Switch));
        let mp =
            s.iter().find(|f| f.name == "mixed_precision").map(|f| f.choices.clone()).unwrap_or_default();
        assert!(mp.contains(&"fp16".to_string()) && mp.contains(&"bf16".to_string()), "{mp:?}");
        let oa = s.iter().find(|f| f.name == "optimizer_args").map(|f| f.kind);
        assert_eq!(oa, Some(FlagKind::List));
        assert!(!s.iter().any(|f| f.name == "dry_run" || f.group == "Refused (out of scope)"));
    }

    #[test]
    fn form_values_to_a_command_line_that_parses() {
        let argv = command_line(&map(json!({
            "learning_rate": "1e-6",
            "cache_latents": true,
            "gradient_checkpointing": false,
            "optimizer_args": "weight_decay=0.01 betas=0.9,0.999",
            "stop_text_encoder_training": "-1",
            "output_name": "",
            "max_train_steps": 30,
        })));
        let argv = argv.unwrap_or_default();
        assert!(argv.contains(&"--learning_rate=1e-6".to_string()), "{argv:?}");
        assert!(argv.contains(&"--cache_latents".to_string()));
        assert!(!argv.iter().any(|a| a.contains("gradient_checkpointing") || a.contains("output_name")));
        assert!(argv.contains(&"--stop_text_encoder_training=-1".to_string()));
        assert!(argv.contains(&"--max_train_steps=30".to_string()));
        let parsed = TrainArgs::try_parse_from(&argv).map_err(|e| e.to_string());
        let parsed = parsed.map(|a| (a.optimizer.optimizer_args, a.training.stop_text_encoder_training));
        assert_eq!(parsed, Ok((vec!["weight_decay=0.01".into(), "betas=0.9,0.999".into()], Some(-1))));
    }

    #[test]
    fn unknown_and_ui_owned_flags_are_refused() {
        let e = command_line(&map(json!({"learning_rat": "1"}))).err().unwrap_or_default();
        assert!(e.contains("--learning_rat"), "{e}");
        let e = command_line(&map(json!({"dry_run": true}))).err().unwrap_or_default();
        assert!(e.contains("set by the UI"), "{e}");
        let e = command_line(&map(json!({"cache_latents": "yes"}))).err().unwrap_or_default();
        assert!(e.contains("switch"), "{e}");
    }

    #[test]
    fn every_preset_parses() {
        for p in PRESETS {
            let values = p.flags.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
            let argv = command_line(&values).map_err(|e| format!("{}: {e}", p.name));
            let parsed = argv.and_then(|a| {
                TrainArgs::try_parse_from(&a).map(|_| ()).map_err(|e| format!("{}: {e}", p.name))
            });
            assert_eq!(parsed, Ok(()));
        }
        let seed = PRESETS[0].flags;
        for want in [("optimizer_type", "AdamW8bit"), ("learning_rate", "1e-6"), ("max_train_steps", "1600")]
        {
            assert!(seed.contains(&want));
        }
    }

    #[test]
    fn shell_quoting() {
        let line = shell_line(&["--output_name=a b".into(), "--x".into(), "it's".into()]);
        assert_eq!(line, r"'--output_name=a b' --x 'it'\''s'");
    }
}
