//! Learning-rate schedules as kohya's `get_scheduler_fix` builds them from transformers'
//! `get_scheduler` (LambdaLR multipliers of each group's base learning rate).
//!
//! `multiplier(k)` is the factor after `k` scheduler steps: the optimizer update number `k`
//! (0-based) uses it, and kohya's log at global step `k` (1-based, logged after
//! `lr_scheduler.step()`) shows `multiplier(k)`.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// A step count given as kohya's `int_or_float`: a value < 1 (or "N%") is a ratio of the total
/// steps, truncated toward zero as Python's `int()`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum StepsOrRatio {
    Steps(u64),
    Ratio(f64),
}

impl StepsOrRatio {
    pub fn resolve(self, total: u64) -> u64 {
        match self {
            StepsOrRatio::Steps(n) => n,
            StepsOrRatio::Ratio(r) => (r * total as f64) as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    InverseSqrt,
    CosineWithMinLr,
    WarmupStableDecay,
    /// kohya's `adafactor` (transformers' AdafactorSchedule): the factor stays 1 and Adafactor with
    /// `relative_step=True` computes its own step size; valid with that optimizer only.
    Adafactor,
}

impl SchedulerKind {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_restarts" => Self::CosineWithRestarts,
            "polynomial" => Self::Polynomial,
            "inverse_sqrt" => Self::InverseSqrt,
            "cosine_with_min_lr" => Self::CosineWithMinLr,
            "warmup_stable_decay" => Self::WarmupStableDecay,
            // kohya rewrites the name to "adafactor:<initial lr>" internally; accept that too.
            n if n == "adafactor" || n.starts_with("adafactor:") => Self::Adafactor,
            // transformers' schedulers that kohya accepts and sdbooth has not built.
            "piecewise_constant" | "reduce_lr_on_plateau" => {
                return Err(TrainError::Config(format!("--lr_scheduler {name} is not supported yet")))
            }
            _ => return Err(TrainError::UnknownScheduler(name.to_string())),
        })
    }
}

/// kohya's scheduler flags, with its defaults in `Default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedulerArgs {
    pub lr_scheduler: String,
    pub lr_warmup_steps: StepsOrRatio,
    pub lr_decay_steps: StepsOrRatio,
    pub lr_scheduler_num_cycles: u64,
    pub lr_scheduler_power: f64,
    pub lr_scheduler_timescale: Option<u64>,
    pub lr_scheduler_min_lr_ratio: Option<f64>,
}

impl Default for LrSchedulerArgs {
    fn default() -> Self {
        LrSchedulerArgs {
            lr_scheduler: "constant".into(),
            lr_warmup_steps: StepsOrRatio::Steps(0),
            lr_decay_steps: StepsOrRatio::Steps(0),
            lr_scheduler_num_cycles: 1,
            lr_scheduler_power: 1.0,
            lr_scheduler_timescale: None,
            lr_scheduler_min_lr_ratio: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: SchedulerKind,
    pub total: u64,
    pub warmup: u64,
    pub decay: u64,
    pub stable: i64,
    pub num_cycles: f64,
    pub power: f64,
    pub min_lr_ratio: f64,
    pub timescale: u64,
    /// Polynomial: transformers' lr_end (1e-7) over the optimizer's default lr.
    pub poly_end_ratio: f64,
}

impl LrSchedule {
    /// `total_steps` is kohya's max_train_steps × processes; `base_lr` is the optimizer's default
    /// (--learning_rate), which the polynomial schedule needs.
    pub fn new(args: &LrSchedulerArgs, total_steps: u64, base_lr: f64) -> Result<Self> {
        let kind = SchedulerKind::parse(&args.lr_scheduler)?;
        let warmup = args.lr_warmup_steps.resolve(total_steps);
        let decay = args.lr_decay_steps.resolve(total_steps);
        if matches!(kind, SchedulerKind::Constant | SchedulerKind::Adafactor) && warmup != 0 {
            return Err(TrainError::Config(format!(
                "--lr_scheduler {} does not take warmup: set --lr_warmup_steps to 0 (kohya: \"does not require \
                 `num_warmup_steps`\")",
                args.lr_scheduler
            )));
        }
        let min_lr_ratio = match kind {
            SchedulerKind::CosineWithMinLr => args.lr_scheduler_min_lr_ratio.ok_or_else(|| {
                TrainError::Config("cosine_with_min_lr needs --lr_scheduler_min_lr_ratio".into())
            })?,
            _ => args.lr_scheduler_min_lr_ratio.unwrap_or(0.0),
        };
        let lr_end = 1e-7;
        if kind == SchedulerKind::Polynomial && base_lr <= lr_end {
            return Err(TrainError::Config(format!(
                "--lr_scheduler polynomial: --learning_rate {base_lr} must be larger than its end value {lr_end}"
            )));
        }
        let num_cycles = match kind {
            // kohya passes num_cycles / 2 to these two (a half cosine per cycle).
            SchedulerKind::CosineWithMinLr | SchedulerKind::WarmupStableDecay => {
                args.lr_scheduler_num_cycles as f64 / 2.0
            }
            SchedulerKind::Cosine => 0.5,
            _ => args.lr_scheduler_num_cycles as f64,
        };
        Ok(LrSchedule {
            kind,
            total: total_steps,
            warmup,
            decay,
            stable: total_steps as i64 - warmup as i64 - decay as i64,
            num_cycles,
            power: args.lr_scheduler_power,
            min_lr_ratio,
            timescale: args.lr_scheduler_timescale.unwrap_or(if warmup > 0 { warmup } else { 10_000 }),
            poly_end_ratio: lr_end / base_lr,
        })
    }

    /// The LambdaLR factor after `step` scheduler steps.
    pub fn multiplier(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let warm = || s / w.max(1.0);
        use SchedulerKind::*;
        match self.kind {
            Constant | Adafactor => 1.0,
            ConstantWithWarmup => {
                if step < self.warmup {
                    warm()
                } else {
                    1.0
                }
            }
            Linear => {
                if step < self.warmup {
                    return warm();
                }
                (0f64).max((t - s) / (t - w).max(1.0))
            }
            Cosine | CosineWithRestarts | CosineWithMinLr => {
                if step < self.warmup {
                    return warm();
                }
                let progress = (s - w) / (t - w).max(1.0);
                match self.kind {
                    CosineWithRestarts => {
                        if progress >= 1.0 {
                            return 0.0;
                        }
                        let f =
                            0.5 * (1.0 + (std::f64::consts::PI * ((self.num_cycles * progress) % 1.0)).cos());
                        f.max(0.0)
                    }
                    _ => {
                        let f = 0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos());
                        let f = if self.kind == CosineWithMinLr {
                            f * (1.0 - self.min_lr_ratio) + self.min_lr_ratio
                        } else {
                            f
                        };
                        f.max(0.0)
                    }
                }
            }
            Polynomial => {
                if step < self.warmup {
                    return warm();
                }
                if step > self.total {
                    return self.poly_end_ratio;
                }
                // transformers works in absolute rates: (lr_init - lr_end) * pct^power + lr_end.
                let range = 1.0 - self.poly_end_ratio;
                let pct = 1.0 - (s - w) / (t - w);
                range * pct.powf(self.power) + self.poly_end_ratio
            }
            InverseSqrt => {
                if step < self.warmup {
                    return warm();
                }
                let ts = self.timescale as f64;
                let shift = ts - w;
                1.0 / ((s + shift) / ts).sqrt()
            }
            WarmupStableDecay => {
                let m = self.min_lr_ratio;
                if step < self.warmup {
                    return (warm() * (1.0 - m) + m).max(0.0);
                }
                let stable_end = self.warmup as i64 + self.stable;
                if (step as i64) < stable_end {
                    return 1.0;
                }
                if (step as i64) < stable_end + self.decay as i64 {
                    let progress = (step as i64 - stable_end) as f64 / (self.decay as f64).max(1.0);
                    let f = 0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos());
                    return (f * (1.0 - m) + m).max(0.0);
                }
                m
            }
        }
    }

    /// The learning rate of a group with base rate `base_lr` after `step` scheduler steps.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.multiplier(step)
    }
}
