//! The optimizer update: the one path the trainer, `sdbooth bench` and the parity tests take
//! from parameter gradients to changed weights.
//!
//! A micro-step hands every gradient to a [`GradSink`]. Two sinks exist:
//! - [`GradAccumulator`] sums gradients over micro-batches; [`apply_accumulated`] then handles the
//!   fp16 loss scale (an overflow skips the step), clips the global gradient norm over everything
//!   trained (accelerate's `clip_grad_norm_`) and steps every parameter;
//! - [`FusedUpdate`] (`--fused_backward_pass`) steps each parameter as soon as its gradient is
//!   final, clipping that tensor on its own as kohya's fused path does.
//!
//! Both measure gradients with [`sum_of_squares`] and clip with [`clip_coef`].

use std::collections::BTreeMap;

use candle_core::{CpuStorage, DType, Storage, Tensor, Var};
use rayon::prelude::*;
use sdbooth_models::ParamStore;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::lr::LrSchedule;
use crate::optim::{with_f32, Optimizer};
use crate::square_sum::host_square_sum;

/// A trained part of the model.
///
/// The declaration order is the order gradients are visited in (and so the order the global norm
/// is summed in): text encoder first, as when the keys were sorted by name. Changing it changes
/// the last bits of the clipping factor, and so the trained weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    TextEncoder,
    Unet,
}

impl Part {
    /// The name of this part's parameter group in the optimizer (and its saved state file).
    pub fn group_name(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::TextEncoder => "text_encoder",
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.group_name())
    }
}

/// The weights being trained, by part.
#[derive(Clone, Copy)]
pub struct TrainedParams<'a> {
    pub unet: &'a ParamStore,
    pub text_encoder: &'a ParamStore,
}

impl<'a> TrainedParams<'a> {
    pub fn var(&self, part: Part, name: &str) -> Result<&'a Var> {
        let store = match part {
            Part::Unet => self.unet,
            Part::TextEncoder => self.text_encoder,
        };
        store.var(name).map_err(|e| TrainError::param(name, e.to_string()))
    }
}

/// The learning rate of each part at one step (0 for a part no longer trained).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearningRates {
    pub unet: f64,
    pub text_encoder: f64,
}

impl LearningRates {
    /// The scheduled rates of the optimizer's groups after `step` updates.
    pub fn at_step(optimizer: &Optimizer, schedule: &LrSchedule, step: u64) -> Self {
        let of = |part: Part| {
            optimizer
                .groups
                .iter()
                .find(|g| g.name == part.group_name())
                .map_or(0.0, |g| schedule.lr(g.lr, step))
        };
        LearningRates { unet: of(Part::Unet), text_encoder: of(Part::TextEncoder) }
    }

    pub fn of(&self, part: Part) -> f64 {
        match part {
            Part::Unet => self.unet,
            Part::TextEncoder => self.text_encoder,
        }
    }
}

/// Where a micro-step puts each parameter gradient.
pub trait GradSink {
    fn add(&mut self, part: Part, name: &str, grad: &Tensor) -> Result<()>;

    /// The final gradients of one block of a model, in order: [`GradSink::add`] for each.
    fn add_block(&mut self, part: Part, grads: &[(String, Tensor)]) -> Result<()> {
        for (name, grad) in grads {
            self.add(part, name, grad)?;
        }
        Ok(())
    }
}

/// The squared L2 norm of one gradient, returned as f64 for accumulation. Every norm and overflow
/// check of the update goes through here or through [`sums_of_squares`].
pub fn sum_of_squares(grad: &Tensor) -> Result<f64> {
    if let Some(sum) = host_square_sum_of(grad)? {
        return Ok(f64::from(sum));
    }
    Ok(grad_square_sum(grad)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The squared L2 norm of one gradient as a scalar tensor on its device, in f32 (the sum is taken
/// in the gradient's dtype).
fn grad_square_sum(grad: &Tensor) -> Result<Tensor> {
    Ok(grad.sqr()?.sum_all()?.to_dtype(DType::F32)?)
}

/// The same sum computed on the host in one read of a CPU gradient, with candle's bits for f32
/// (`square_sum`); `None` on other devices and CPUs. bf16/f16 gradients (`--full_bf16`'s fused
/// update) are widened to f32 first and squared and summed in f32: candle sums them in their
/// own dtype, one scalar addition at a time, where a bf16 running sum stops growing after a few
/// hundred similar values (and the pass took ~20 % of a `--full_bf16` step's CPU time).
fn host_square_sum_of(grad: &Tensor) -> Result<Option<f32>> {
    if !grad.device().is_cpu() || !matches!(grad.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Ok(None);
    }
    // Contiguous storage is read in place, whatever its dtype (no widened copy).
    {
        let (storage, layout) = grad.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((s, e))) = (&*storage, layout.contiguous_offsets()) {
            match cpu {
                CpuStorage::F32(v) => return Ok(host_square_sum(&v[s..e])),
                CpuStorage::BF16(v) => return Ok(host_square_sum(&v[s..e])),
                CpuStorage::F16(v) => return Ok(host_square_sum(&v[s..e])),
                _ => {}
            }
        }
    }
    with_f32(grad, host_square_sum)
}

/// [`sum_of_squares`] of every gradient (all on one device). CPU gradients are summed in parallel,
/// one task per gradient (each sum keeps its own order, so the results do not depend on the
/// threads); on a GPU, with one transfer of the scalars to the host instead of one per gradient.
pub fn sums_of_squares<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<Vec<f64>> {
    let grads: Vec<&Tensor> = grads.into_iter().collect();
    if grads.first().is_some_and(|g| g.device().is_cpu()) {
        return grads.par_iter().with_max_len(1).map(|g| sum_of_squares(g)).collect();
    }
    let sums = grads.into_iter().map(grad_square_sum).collect::<Result<Vec<Tensor>>>()?;
    if sums.is_empty() {
        return Ok(Vec::new());
    }
    Ok(Tensor::stack(&sums, 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The factor torch's `clip_grad_norm_(max_norm)` multiplies the gradients by:
/// min(1, max_norm / (total_norm + 1e-6)). `max_norm <= 0` disables clipping (kohya's 0.0).
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    let c = (max_norm as f32) / (total_norm as f32 + 1e-6);
    c.min(1.0)
}

/// Sums gradients over the micro-batches of one update, keyed by (part, name).
#[derive(Default)]
pub struct GradAccumulator {
    pub grads: BTreeMap<(Part, String), Tensor>,
}

impl GradSink for GradAccumulator {
    fn add(&mut self, part: Part, name: &str, grad: &Tensor) -> Result<()> {
        let grad = grad.to_dtype(DType::F32)?;
        let key = (part, name.to_string());
        let sum = match self.grads.remove(&key) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        self.grads.insert(key, sum);
        Ok(())
    }
}

/// `--fused_backward_pass`: each gradient updates its parameter at once (no gradient buffer);
/// `--max_grad_norm` clips each tensor on its own, as kohya's fused path does.
pub struct FusedUpdate<'a> {
    pub optimizer: &'a mut Optimizer,
    pub params: TrainedParams<'a>,
    pub lrs: LearningRates,
    pub max_norm: f64,
}

impl FusedUpdate<'_> {
    /// Steps one parameter, its gradient clipped by its own squared norm `square_sum` (when
    /// clipping is on).
    fn step(&mut self, part: Part, name: &str, grad: &Tensor, square_sum: Option<f64>) -> Result<()> {
        let var = self.params.var(part, name)?;
        let coef = match square_sum {
            Some(s) if self.max_norm > 0.0 => clip_coef(s.sqrt(), self.max_norm),
            _ => 1.0,
        };
        self.optimizer.step_param_scaled(name, var, grad, self.lrs.of(part), coef)
    }
}

impl GradSink for FusedUpdate<'_> {
    fn add(&mut self, part: Part, name: &str, grad: &Tensor) -> Result<()> {
        let square_sum = if self.max_norm > 0.0 { Some(sum_of_squares(grad)?) } else { None };
        self.step(part, name, grad, square_sum)
    }

    /// The norms of a block's gradients first, all at once ([`sums_of_squares`]: in parallel on
    /// the CPU, one transfer on a GPU; each the same value as [`GradSink::add`] computes), then
    /// the steps in order.
    fn add_block(&mut self, part: Part, grads: &[(String, Tensor)]) -> Result<()> {
        let square_sums: Vec<Option<f64>> = if self.max_norm > 0.0 {
            sums_of_squares(grads.iter().map(|(_, g)| g))?.into_iter().map(Some).collect()
        } else {
            vec![None; grads.len()]
        };
        for ((name, grad), square_sum) in grads.iter().zip(square_sums) {
            self.step(part, name, grad, square_sum)?;
        }
        Ok(())
    }
}

/// fp16's dynamic loss scale (torch.cuda.amp.GradScaler's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    scale: f64,
    good_steps: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale { scale: 65536.0, good_steps: 0 }
    }
}

impl LossScale {
    const GROWTH_INTERVAL: u64 = 2000;

    pub fn scale(&self) -> f64 {
        self.scale
    }

    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
    }
}

/// What dLoss is multiplied by in a micro-step: the fp16 loss scale (if any) over the number of
/// micro-batches accumulated into one update.
pub fn grad_multiplier(loss_scale: Option<&LossScale>, accumulation_steps: u64) -> f64 {
    loss_scale.map_or(1.0, LossScale::scale) / accumulation_steps.max(1) as f64
}

/// What [`apply_accumulated`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateOutcome {
    /// Every parameter with a gradient was stepped; the unscaled global norm before clipping.
    Stepped { grad_norm: f64 },
    /// fp16 gradients overflowed: nothing was stepped and the loss scale was halved to this.
    SkippedOverflow { new_scale: f64 },
}

/// The update after accumulation: unscale (fp16; an overflow skips the step), clip the global
/// gradient norm over everything trained (as accelerate's clip_grad_norm_), step every parameter
/// that has a gradient with its part's learning rate. Gradients are only read.
pub fn apply_accumulated(
    optimizer: &mut Optimizer,
    params: TrainedParams<'_>,
    grads: &GradAccumulator,
    lrs: LearningRates,
    max_norm: f64,
    loss_scale: Option<&mut LossScale>,
) -> Result<UpdateOutcome> {
    // The map's fixed order keeps the norm's summation, and so the run, deterministic.
    let squares = sums_of_squares(grads.grads.values())?;
    let mut unscale = 1.0f64;
    if let Some(ls) = loss_scale {
        let finite = squares.iter().all(|s| s.is_finite());
        ls.update(finite);
        if !finite {
            return Ok(UpdateOutcome::SkippedOverflow { new_scale: ls.scale });
        }
        unscale = 1.0 / ls.scale;
    }
    let grad_norm = squares.iter().sum::<f64>().sqrt() * unscale;
    let coef = unscale as f32 * clip_coef(grad_norm, max_norm);
    for ((part, name), grad) in &grads.grads {
        let var = params.var(*part, name)?;
        optimizer.step_param_scaled(name, var, grad, lrs.of(*part), coef)?;
    }
    Ok(UpdateOutcome::Stepped { grad_norm })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A bf16 gradient's squared norm is summed in f32: 100 000 ones give 100 000 (a bf16 running
    /// sum stops at 256).
    #[test]
    fn bf16_gradient_norm_is_summed_in_f32() {
        let ones = Tensor::ones(100_000, DType::BF16, &Device::Cpu).unwrap();
        if square_sum_available() {
            assert_eq!(sum_of_squares(&ones).unwrap(), 100_000.0);
        }
    }

    fn square_sum_available() -> bool {
        host_square_sum(&[1.0f32]).is_some()
    }
}
