//! `--resume` and the flags of the new command line: each flag that changes training either
//! applies from the resumed step (said so) or is refused with the saved value named; none is
//! silently overridden by the state.
//!
//! - optimizer type and `--optimizer_args`: the saved moments belong to the saved optimizer;
//!   refused when they differ.
//! - `--full_bf16`: the saved weights' dtype; refused when it differs.
//! - the model architecture: every saved tensor's shape must match (an SD1 state on an SD2 model;
//!   `saving::load_state`).
//! - `--learning_rate`, `--learning_rate_te`, the schedule flags: apply from the resumed step.

use std::path::Path;

use candle_core::DType;

use super::setup::Model;
use crate::error::{Result, TrainError};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::plan::TrainPlan;
use crate::update::Part;

fn refuse(dir: &Path, message: String) -> TrainError {
    TrainError::state(dir, format!("--resume: {message}"))
}

/// Refuses a saved optimizer this command line cannot continue.
pub(super) fn check_optimizer(dir: &Path, saved: &OptimizerConfig, plan: &TrainPlan) -> Result<()> {
    let given = &plan.optimizer.config;
    if saved.kind != given.kind {
        return Err(refuse(
            dir,
            format!(
                "the state was trained with --optimizer_type {}, not {} (its optimizer moments are {}'s); \
                 drop the flag to continue, or start a new run",
                saved.kind.name(),
                given.kind.name(),
                saved.kind.name()
            ),
        ));
    }
    // The stochastic-rounding seed comes from --seed, which resume keeps as saved.
    let comparable = OptimizerConfig { rounding_seed: saved.rounding_seed, ..given.clone() };
    if !same_settings(&comparable, saved) {
        return Err(refuse(
            dir,
            format!(
                "--optimizer_args differ from the saved optimizer's settings ({saved:?}); give the same \
                 --optimizer_args to continue, or start a new run"
            ),
        ));
    }
    Ok(())
}

/// Refuses saved weights whose dtype (`--full_bf16`) differs from this run's (their shapes are
/// checked against the model when they are read: `saving::load_state`).
pub(super) fn check_weight_dtype(dir: &Path, model: &Model, plan: &TrainPlan) -> Result<()> {
    let wanted = plan.precision.weight_dtype;
    let saved = model.unet_params.iter().map(|(_, v)| v.dtype()).find(|d| *d != wanted);
    let Some(saved) = saved else { return Ok(()) };
    let setting = |d: DType| if d == DType::BF16 { "with --full_bf16" } else { "without --full_bf16" };
    Err(refuse(
        dir,
        format!(
            "the state holds {saved:?} weights (trained {}); this run is {}: use the same setting to \
             continue",
            setting(saved),
            setting(wanted)
        ),
    ))
}

/// The learning rates of this command line replace the saved ones (the schedule is a function of
/// the step and comes from the flags too); a change is said.
pub(super) fn apply_learning_rates(optimizer: &mut Optimizer, plan: &TrainPlan, step: u64) {
    for g in &mut optimizer.groups {
        let (flag, lr) = if g.name == Part::Unet.group_name() {
            ("--learning_rate", plan.optimizer.learning_rate)
        } else if g.name == Part::TextEncoder.group_name() {
            ("--learning_rate_te", plan.optimizer.learning_rate_te)
        } else {
            continue;
        };
        if g.lr != lr {
            tracing::info!("--resume: {flag} {lr} applies from step {step} (the saved run used {})", g.lr);
            g.lr = lr;
        }
    }
}

/// Equal settings, numbers within 1e-12 relative (the saved ones went through JSON text).
fn same_settings(a: &OptimizerConfig, b: &OptimizerConfig) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => close(&a, &b),
        _ => false,
    }
}

fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (a, b) {
        (J::Number(x), J::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
            _ => x == y,
        },
        (J::Array(x), J::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| close(x, y)),
        (J::Object(x), J::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}
