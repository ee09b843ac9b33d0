//! Value checks of the flags, done once before anything is loaded: numbers that parse but cannot
//! train (a negative or non-finite learning rate trains backwards or until a NaN loss). The
//! dataset's own flags are checked by sdbooth-data's `DatasetOptions::validate`, the same check
//! its TOML keys get.

use super::types::StepsOrRatio;
use super::{ArgsError, TrainArgs};

/// What is wrong with a value, or None.
type Problem = fn(f64) -> Option<String>;

fn non_negative(v: f64) -> Option<String> {
    sdbooth_data::options::non_negative_problem(v)
}

fn finite(v: f64) -> Option<String> {
    (!v.is_finite()).then(|| format!("must be a finite number, got {v}"))
}

impl TrainArgs {
    /// Refuses flag values that parse but cannot be trained with, naming the flag.
    pub fn check_values(&self) -> Result<(), ArgsError> {
        let o = &self.optimizer;
        let l = &self.loss;
        let d = &self.dataset;
        // Every floating-point flag first: a NaN would also turn into `null` in the flag map.
        let checks: &[(&str, Option<f64>, Problem)] = &[
            ("learning_rate", Some(o.learning_rate), non_negative),
            ("learning_rate_te", o.learning_rate_te, non_negative),
            ("max_grad_norm", Some(o.max_grad_norm), non_negative),
            ("lr_scheduler_power", Some(o.lr_scheduler_power), finite),
            ("lr_scheduler_min_lr_ratio", o.lr_scheduler_min_lr_ratio, non_negative),
            ("lr_warmup_steps", ratio(&o.lr_warmup_steps), non_negative),
            ("lr_decay_steps", ratio(&o.lr_decay_steps), non_negative),
            ("prior_loss_weight", Some(self.training.prior_loss_weight), non_negative),
            ("huber_c", Some(l.huber_c), non_negative),
            ("huber_scale", Some(l.huber_scale), non_negative),
            ("min_snr_gamma", l.min_snr_gamma, non_negative),
            ("v_pred_like_loss", l.v_pred_like_loss, non_negative),
            ("noise_offset", l.noise_offset, non_negative),
            // kohya documents negative values for adaptive_noise_scale.
            ("adaptive_noise_scale", l.adaptive_noise_scale, finite),
            ("multires_noise_discount", Some(l.multires_noise_discount), non_negative),
            ("ip_noise_gamma", l.ip_noise_gamma, non_negative),
            ("caption_dropout_rate", Some(d.caption_dropout_rate), finite),
            ("caption_tag_dropout_rate", Some(d.caption_tag_dropout_rate), finite),
            ("token_warmup_step", Some(d.token_warmup_step), finite),
            ("validation_split", Some(d.validation_split), finite),
        ];
        for &(flag, value, problem) in checks {
            if let Some(message) = value.and_then(problem) {
                return Err(ArgsError::Usage(format!("--{flag}: {message}")));
            }
        }
        self.check_scheduler()?;
        // The dataset flags' ranges (rates within [0, 1], bucket sizes >= 1), as the TOML's.
        self.dataset_options().validate().map_err(|e| ArgsError::Usage(e.to_string()))
    }
}

impl TrainArgs {
    /// The scheduler's name, and kohya's rule for `adafactor`: it only hands Adafactor's own
    /// relative-step size through, so it needs `--optimizer_type AdaFactor` with relative_step.
    fn check_scheduler(&self) -> Result<(), ArgsError> {
        use crate::lr::SchedulerKind;
        let usage = |e: crate::error::TrainError| ArgsError::Usage(e.to_string());
        if SchedulerKind::parse(&self.optimizer.lr_scheduler).map_err(usage)? != SchedulerKind::Adafactor {
            return Ok(());
        }
        let kind = crate::plan::optimizer_kind(self).map_err(usage)?;
        let config =
            crate::optim::OptimizerConfig::from_args(kind, &self.optimizer.optimizer_args).map_err(usage)?;
        if kind != crate::optim::OptimizerKind::Adafactor || !config.relative_step {
            return Err(ArgsError::Usage(format!(
                "--lr_scheduler adafactor needs --optimizer_type AdaFactor with relative_step=True (its \
                 default); the optimizer here is {}{} (kohya refuses this too)",
                kind.name(),
                if kind == crate::optim::OptimizerKind::Adafactor { " with relative_step=False" } else { "" }
            )));
        }
        Ok(())
    }
}

fn ratio(v: &StepsOrRatio) -> Option<f64> {
    match v {
        StepsOrRatio::Ratio(r) => Some(*r),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(flags: &[&str]) -> String {
        match TrainArgs::try_parse_from(flags) {
            Ok(a) => a.check_values().err().map(|e| e.to_string()).unwrap_or_default(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn negative_and_non_finite_values_are_refused_by_flag() {
        for (flag, value) in [
            ("learning_rate", "-1"),
            ("learning_rate", "nan"),
            ("learning_rate", "inf"),
            ("min_snr_gamma", "-5"),
            ("noise_offset", "-0.1"),
            ("max_grad_norm", "-1"),
            ("prior_loss_weight", "-1"),
            ("validation_split", "nan"),
            ("caption_dropout_rate", "5"),
            ("min_bucket_reso", "0"),
            ("bucket_reso_steps", "0"),
        ] {
            let err = error_of(&[&format!("--{flag}={value}")]);
            assert!(err.starts_with(&format!("--{flag}: ")), "--{flag}={value}: {err:?}");
        }
    }

    #[test]
    fn lr_scheduler_names_and_the_adafactor_rule() {
        let err = error_of(&["--lr_scheduler=piecewise_constant"]);
        assert!(err.contains("--lr_scheduler piecewise_constant is not supported yet"), "{err}");
        let err = error_of(&["--lr_scheduler=reduce_lr_on_plateau"]);
        assert!(err.contains("is not supported yet"), "{err}");
        let err = error_of(&["--lr_scheduler=adafactor"]);
        assert!(err.contains("needs --optimizer_type AdaFactor"), "{err}");
        let err = error_of(&[
            "--lr_scheduler=adafactor",
            "--optimizer_type=AdaFactor",
            "--optimizer_args",
            "relative_step=False",
        ]);
        assert!(err.contains("relative_step=False"), "{err}");
        assert_eq!(error_of(&["--lr_scheduler=adafactor", "--optimizer_type=AdaFactor"]), "");
        assert!(error_of(&["--lr_scheduler=cosine_typo"]).contains("unknown LR scheduler"));
    }

    #[test]
    fn kohya_defaults_and_usual_values_pass() {
        assert_eq!(error_of(&[]), "");
        assert_eq!(
            error_of(&["--learning_rate=1e-6", "--noise_offset=0.1", "--adaptive_noise_scale=-0.01"]),
            ""
        );
    }
}
