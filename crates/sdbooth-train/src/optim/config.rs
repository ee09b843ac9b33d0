//! Optimizer selection and hyper-parameters, parsed from kohya's `--optimizer_type` and
//! `--optimizer_args key=value …` (values are Python literals: `0.01`, `True`, `None`,
//! `0.9,0.999`, `(0.9, 0.999)`).

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimizerKind {
    AdamW,
    AdamW8bit,
    Lion,
    SGDNesterov,
    Adafactor,
}

impl OptimizerKind {
    /// kohya's name matching: case-insensitive; empty means AdamW.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "" | "adamw" => Ok(Self::AdamW),
            "adamw8bit" => Ok(Self::AdamW8bit),
            "lion" => Ok(Self::Lion),
            "sgdnesterov" => Ok(Self::SGDNesterov),
            "adafactor" => Ok(Self::Adafactor),
            _ => Err(TrainError::UnknownOptimizer(name.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "AdamW",
            Self::AdamW8bit => "AdamW8bit",
            Self::Lion => "Lion",
            Self::SGDNesterov => "SGDNesterov",
            Self::Adafactor => "Adafactor",
        }
    }
}

/// Every hyper-parameter of the supported optimizers; `OptimizerConfig::new` fills the defaults of
/// the library kohya uses for each kind (torch, bitsandbytes, lion-pytorch, transformers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// SGD momentum (kohya sets 0.9 when `momentum` is not given).
    pub momentum: f64,
    /// bitsandbytes keeps tensors smaller than this in 32-bit state.
    pub min_8bit_size: usize,
    /// Adafactor: `eps=(eps1, eps2)`.
    pub adafactor_eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    pub beta1: Option<f64>,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
    /// Seed of the stochastic-rounding streams used when weights are bf16 (`--full_bf16`).
    pub rounding_seed: u64,
}

impl OptimizerConfig {
    pub fn new(kind: OptimizerKind) -> Self {
        let (betas, weight_decay) = match kind {
            // torch.optim.AdamW and bnb.optim.AdamW8bit both default weight_decay to 1e-2.
            OptimizerKind::AdamW | OptimizerKind::AdamW8bit => ((0.9, 0.999), 1e-2),
            OptimizerKind::Lion => ((0.9, 0.99), 0.0),
            _ => ((0.9, 0.999), 0.0),
        };
        OptimizerConfig {
            kind,
            betas,
            eps: 1e-8,
            weight_decay,
            momentum: 0.9,
            min_8bit_size: 4096,
            adafactor_eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            scale_parameter: true,
            // kohya: "relative_step" defaults to True when not given.
            relative_step: true,
            warmup_init: false,
            rounding_seed: 0,
        }
    }

    /// Parses kohya's `--optimizer_args` for `kind`. Unknown keys are errors: a silently ignored
    /// typo would train with other settings than the user asked for.
    pub fn from_args(kind: OptimizerKind, args: &[String]) -> Result<Self> {
        let mut c = Self::new(kind);
        for arg in args {
            let err =
                |reason: &str| TrainError::OptimizerArg { arg: arg.clone(), reason: reason.to_string() };
            let (key, value) = arg.split_once('=').ok_or_else(|| err("expected key=value"))?;
            let v = PyLiteral::parse(value.trim()).map_err(|r| err(&r))?;
            let key = key.trim();
            let num = |v: &PyLiteral| v.as_f64().ok_or_else(|| err("expected a number"));
            let boolean = |v: &PyLiteral| v.as_bool().ok_or_else(|| err("expected True or False"));
            let pair = |v: &PyLiteral| match v {
                PyLiteral::Tuple(items) if items.len() == 2 => Ok((num(&items[0])?, num(&items[1])?)),
                _ => Err(err("expected two numbers, e.g. 0.9,0.999")),
            };
            match (kind, key) {
                (_, "weight_decay") => c.weight_decay = num(&v)?,
                (OptimizerKind::Adafactor, "eps") => {
                    c.adafactor_eps = match &v {
                        PyLiteral::Tuple(items) if items.len() == 2 => {
                            (items[0].as_f64().unwrap_or(1e-30), num(&items[1])?)
                        }
                        _ => return Err(err("expected eps=(eps1, eps2)")),
                    }
                }
                (OptimizerKind::Adafactor, "clip_threshold") => c.clip_threshold = num(&v)?,
                (OptimizerKind::Adafactor, "decay_rate") => c.decay_rate = num(&v)?,
                (OptimizerKind::Adafactor, "beta1") => {
                    c.beta1 = if matches!(v, PyLiteral::None) { None } else { Some(num(&v)?) }
                }
                (OptimizerKind::Adafactor, "scale_parameter") => c.scale_parameter = boolean(&v)?,
                (OptimizerKind::Adafactor, "relative_step") => c.relative_step = boolean(&v)?,
                (OptimizerKind::Adafactor, "warmup_init") => c.warmup_init = boolean(&v)?,
                (OptimizerKind::SGDNesterov, "momentum") => c.momentum = num(&v)?,
                (OptimizerKind::SGDNesterov, "dampening") => {
                    if num(&v)? != 0.0 {
                        return Err(err("Nesterov momentum requires dampening=0 (as torch)"));
                    }
                }
                (OptimizerKind::SGDNesterov, "nesterov") => {
                    if !boolean(&v)? {
                        return Err(err("SGDNesterov is always Nesterov"));
                    }
                }
                (OptimizerKind::AdamW | OptimizerKind::AdamW8bit | OptimizerKind::Lion, "betas") => {
                    c.betas = pair(&v)?
                }
                (OptimizerKind::AdamW | OptimizerKind::AdamW8bit, "eps") => c.eps = num(&v)?,
                (OptimizerKind::AdamW | OptimizerKind::AdamW8bit, "amsgrad") => {
                    if boolean(&v)? {
                        return Err(err("amsgrad is not supported"));
                    }
                }
                (OptimizerKind::AdamW8bit, "min_8bit_size") => {
                    let n = num(&v)?;
                    if n < 0.0 || n.fract() != 0.0 {
                        return Err(err("expected a non-negative integer"));
                    }
                    c.min_8bit_size = n as usize;
                }
                // bitsandbytes options that do not change the math of a single-process run.
                (OptimizerKind::AdamW8bit, "percentile_clipping") if num(&v)? == 100.0 => {}
                (OptimizerKind::AdamW8bit, "block_wise") if boolean(&v)? => {}
                (OptimizerKind::AdamW8bit, "is_paged") => {}
                (OptimizerKind::Lion, "use_triton") => {}
                _ => return Err(err(&format!("unknown or unsupported option for {}", kind.name()))),
            }
        }
        // kohya: warmup_init=True turns relative_step on.
        if kind == OptimizerKind::Adafactor && c.warmup_init {
            c.relative_step = true;
        }
        if kind == OptimizerKind::SGDNesterov && c.momentum <= 0.0 {
            return Err(TrainError::Config(
                "--optimizer_type SGDNesterov needs momentum > 0 (--optimizer_args momentum=…)".into(),
            ));
        }
        Ok(c)
    }
}

/// The subset of Python literals that `ast.literal_eval` accepts in kohya's optimizer args.
#[derive(Debug, Clone, PartialEq)]
pub enum PyLiteral {
    Num(f64),
    Bool(bool),
    None,
    Str(String),
    Tuple(Vec<PyLiteral>),
}

impl PyLiteral {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let inner = s
            .strip_prefix('(')
            .and_then(|x| x.strip_suffix(')'))
            .or_else(|| s.strip_prefix('[').and_then(|x| x.strip_suffix(']')));
        if let Some(inner) = inner {
            return Ok(PyLiteral::Tuple(
                inner
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(Self::scalar)
                    .collect::<Result<_, _>>()?,
            ));
        }
        if s.contains(',') {
            return Ok(PyLiteral::Tuple(
                s.split(',').filter(|p| !p.trim().is_empty()).map(Self::scalar).collect::<Result<_, _>>()?,
            ));
        }
        Self::scalar(s)
    }

    fn scalar(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        match s {
            "True" => return Ok(PyLiteral::Bool(true)),
            "False" => return Ok(PyLiteral::Bool(false)),
            "None" => return Ok(PyLiteral::None),
            _ => {}
        }
        for q in ['"', '\''] {
            if let Some(v) = s.strip_prefix(q).and_then(|x| x.strip_suffix(q)) {
                return Ok(PyLiteral::Str(v.to_string()));
            }
        }
        s.replace('_', "")
            .parse::<f64>()
            .map(PyLiteral::Num)
            .map_err(|_| format!("not a Python literal: {s:?}"))
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PyLiteral::Num(x) => Some(*x),
            // Python: True == 1, False == 0.
            PyLiteral::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PyLiteral::Bool(b) => Some(*b),
            _ => None,
        }
    }
}
