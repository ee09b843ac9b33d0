//! Value types of `sdbooth train` flags whose values kohya restricts to a set of choices, and
//! kohya's "int or float" step counts. clap's value names and serde's names are the same strings
//! (kohya's), so a config file written by `--output_config` reads back through the same parser.

use std::fmt;
use std::str::FromStr;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// `--mixed_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum MixedPrecision {
    #[default]
    No,
    Fp16,
    Bf16,
}

/// `--save_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum SavePrecision {
    Float,
    Fp16,
    Bf16,
}

/// `--save_model_as`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SaveModelAs {
    Ckpt,
    Safetensors,
    Diffusers,
    DiffusersSafetensors,
}

/// `--log_with`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum LogWith {
    Tensorboard,
    Wandb,
    All,
}

/// `--loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum LossType {
    L1,
    #[default]
    L2,
    Huber,
    SmoothL1,
}

/// `--huber_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum HuberSchedule {
    Constant,
    Exponential,
    #[default]
    Snr,
}

/// `--console_log_level` (kohya spells the levels in capitals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[value(rename_all = "UPPERCASE")]
pub enum ConsoleLogLevel {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

/// `--sample_sampler`: kohya's sampler names, `k_` aliases included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SampleSampler {
    #[default]
    Ddim,
    Pndm,
    Lms,
    Euler,
    EulerA,
    Heun,
    #[serde(rename = "dpm_2")]
    #[value(name = "dpm_2")]
    Dpm2,
    #[serde(rename = "dpm_2_a")]
    #[value(name = "dpm_2_a")]
    Dpm2A,
    Dpmsolver,
    #[serde(rename = "dpmsolver++")]
    #[value(name = "dpmsolver++")]
    DpmsolverPp,
    Dpmsingle,
    KLms,
    KEuler,
    KEulerA,
    #[serde(rename = "k_dpm_2")]
    #[value(name = "k_dpm_2")]
    KDpm2,
    #[serde(rename = "k_dpm_2_a")]
    #[value(name = "k_dpm_2_a")]
    KDpm2A,
}

/// kohya's `int_or_float` for `--lr_warmup_steps`/`--lr_decay_steps`: "100" is a step count,
/// "0.1" (below 1) or "10%" is a ratio of the total steps. Like kohya, "1.5" is an error: a value
/// of 1 or more must be a whole number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StepsOrRatio {
    Steps(u64),
    Ratio(f64),
}

impl Default for StepsOrRatio {
    fn default() -> Self {
        StepsOrRatio::Steps(0)
    }
}

impl StepsOrRatio {
    /// The number of steps for a run of `total_steps` (kohya rounds a ratio down: int(r * total)).
    pub fn resolve(self, total_steps: u64) -> u64 {
        match self {
            StepsOrRatio::Steps(n) => n,
            StepsOrRatio::Ratio(r) => (r * total_steps as f64) as u64,
        }
    }
}

impl FromStr for StepsOrRatio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(pct) = s.strip_suffix('%') {
            let p: f64 = pct.parse().map_err(|_| format!("'{s}' is not a valid percentage"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("'{s}' is not a percentage between 0% and 100%"));
            }
            return Ok(StepsOrRatio::Ratio(p / 100.0));
        }
        let v: f64 = s.parse().map_err(|_| format!("'{s}' is not an int or float"))?;
        if v >= 1.0 {
            s.parse::<u64>().map(StepsOrRatio::Steps).map_err(|_| {
                format!("'{s}' is not an int or float below 1 (values of 1 or more are step counts)")
            })
        } else if v == 0.0 {
            // "0" is kohya's default and means no warmup; as a step count it compares equal
            // to the default, so it does not count as "set".
            Ok(StepsOrRatio::Steps(0))
        } else if v > 0.0 {
            Ok(StepsOrRatio::Ratio(v))
        } else {
            Err(format!("'{s}' is negative"))
        }
    }
}

impl fmt::Display for StepsOrRatio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepsOrRatio::Steps(n) => write!(f, "{n}"),
            StepsOrRatio::Ratio(r) => write!(f, "{r}"),
        }
    }
}

/// `--max_token_length`: kohya allows 150 or 225 (unset means 75).
pub fn parse_max_token_length(s: &str) -> Result<u32, String> {
    match s.trim() {
        "150" => Ok(150),
        "225" => Ok(225),
        other => Err(format!("'{other}' is not allowed: use 150 or 225 (leave unset for 75)")),
    }
}

/// `--resize_interpolation`: kohya's argparse choices.
pub const RESIZE_INTERPOLATIONS: [&str; 7] =
    ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"];

/// `--dynamo_backend`: kohya's choices (the flag itself is refused; the choices keep old command
/// lines parsing so the refusal message, not a parse error, is what the user sees).
pub const DYNAMO_BACKENDS: [&str; 12] = [
    "eager",
    "aot_eager",
    "inductor",
    "aot_ts_nvfuser",
    "nvprims_nvfuser",
    "cudagraphs",
    "ofi",
    "fx2trt",
    "onnxrt",
    "tensort",
    "ipex",
    "tvm",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// `--output_config` writes serde names and `--config_file` reads them with clap: they must agree.
    fn assert_names_agree<T: ValueEnum + Serialize>() {
        for v in T::value_variants() {
            let clap_name = v.to_possible_value().map(|p| p.get_name().to_string());
            let serde_name = serde_json::to_value(v).ok().and_then(|j| j.as_str().map(str::to_string));
            assert!(clap_name.is_some());
            assert_eq!(clap_name, serde_name);
        }
    }

    #[test]
    fn clap_and_serde_names_agree() {
        assert_names_agree::<MixedPrecision>();
        assert_names_agree::<SavePrecision>();
        assert_names_agree::<SaveModelAs>();
        assert_names_agree::<LogWith>();
        assert_names_agree::<LossType>();
        assert_names_agree::<HuberSchedule>();
        assert_names_agree::<ConsoleLogLevel>();
        assert_names_agree::<SampleSampler>();
        assert_eq!(
            SampleSampler::DpmsolverPp.to_possible_value().map(|p| p.get_name().to_string()),
            Some("dpmsolver++".into())
        );
        assert_eq!(
            SaveModelAs::DiffusersSafetensors.to_possible_value().map(|p| p.get_name().to_string()),
            Some("diffusers_safetensors".into())
        );
    }

    #[test]
    fn steps_or_ratio_follows_kohya() {
        assert_eq!("100".parse::<StepsOrRatio>(), Ok(StepsOrRatio::Steps(100)));
        assert_eq!("1".parse::<StepsOrRatio>(), Ok(StepsOrRatio::Steps(1)));
        assert_eq!("0.1".parse::<StepsOrRatio>(), Ok(StepsOrRatio::Ratio(0.1)));
        assert_eq!("10%".parse::<StepsOrRatio>(), Ok(StepsOrRatio::Ratio(0.1)));
        assert_eq!("0".parse::<StepsOrRatio>(), Ok(StepsOrRatio::Steps(0)));
        assert!("1.5".parse::<StepsOrRatio>().is_err());
        assert!("abc".parse::<StepsOrRatio>().is_err());
        assert!("-3".parse::<StepsOrRatio>().is_err());
        assert_eq!(StepsOrRatio::Ratio(0.1).resolve(1600), 160);
        assert_eq!(StepsOrRatio::Steps(7).resolve(1600), 7);
        // Display must parse back to the same value (the config file round trip relies on it).
        for v in [StepsOrRatio::Steps(250), StepsOrRatio::Ratio(0.05)] {
            assert_eq!(v.to_string().parse::<StepsOrRatio>(), Ok(v));
        }
    }

    #[test]
    fn max_token_length_choices() {
        assert_eq!(parse_max_token_length("150"), Ok(150));
        assert_eq!(parse_max_token_length("225"), Ok(225));
        assert!(parse_max_token_length("75").is_err());
        assert!(parse_max_token_length("300").is_err());
    }
}
