//! The parts of a run besides the training step: logging, saving, sampling and validation. Each
//! is a [`RunPart`]; the loop calls every part, in order, at the same moments, so the loop
//! itself stays the training step.
//!
//! Order matters and is fixed by [`super::train_checked`]: the step log first (a step is logged
//! before anything can fail after it), then saving (which also stops the run on Ctrl-C), then
//! samples and validation.

use crate::error::Result;
use crate::logs::{
    JsonlWriter, StepRecord, TensorBoardWriter, TAG_LOSS, TAG_LOSS_EPOCH, TAG_LR_TEXT_ENCODER, TAG_LR_UNET,
};
use crate::update::LearningRates;

use super::Trainer;

/// The TensorBoard writer of the run (`--logging_dir`), shared by the parts that log scalars.
pub(super) type Board = Option<TensorBoardWriter>;

/// One part of a run, called by the loop. Parts read the trainer; only the loop changes it.
pub(super) trait RunPart {
    /// Before the first step this process runs (step 0, or the step a resumed run starts at).
    fn at_start(&mut self, _t: &Trainer<'_>, _board: &mut Board) -> Result<()> {
        Ok(())
    }
    /// After each optimizer step; `record` describes it.
    fn after_step(&mut self, _t: &Trainer<'_>, _record: &StepRecord, _board: &mut Board) -> Result<()> {
        Ok(())
    }
    /// When epoch `epoch` has ended (its last step is done; the next epoch's first batch is not
    /// drawn yet, or the run is over).
    fn at_epoch_end(&mut self, _t: &Trainer<'_>, _epoch: u64, _board: &mut Board) -> Result<()> {
        Ok(())
    }
    /// After the last step and the last epoch end.
    fn at_end(&mut self, _t: &Trainer<'_>, _epoch: u64, _board: &mut Board) -> Result<()> {
        Ok(())
    }
}

/// The step log: `{output_name}.jsonl` in the output folder and the TensorBoard scalars kohya
/// logs (loss, learning rates, epoch loss) with step time and peak memory.
pub(super) struct StepLog {
    jsonl: JsonlWriter,
}

impl StepLog {
    pub fn new(t: &Trainer<'_>) -> Result<Self> {
        let path = t.output.dir.join(format!("{}.jsonl", t.output.log_stem()));
        Ok(StepLog { jsonl: JsonlWriter::append(&path)? })
    }
}

impl RunPart for StepLog {
    fn after_step(&mut self, t: &Trainer<'_>, r: &StepRecord, board: &mut Board) -> Result<()> {
        if let Some(tb) = board {
            // kohya logs after its scheduler step: `lr/*` at step N is the rate of step N + 1 (the
            // JSONL record keeps the rate step N used).
            let next = LearningRates::at_step(&t.optimizer, &t.lr_schedule, t.state.global_step);
            let mut scalars = vec![(TAG_LOSS, r.loss), (TAG_LR_UNET, next.unet as f32)];
            if r.lr_text_encoder.is_some() {
                scalars.push((TAG_LR_TEXT_ENCODER, next.text_encoder as f32));
            }
            scalars.push(("sdbooth/step_seconds", r.step_seconds as f32));
            if let Some(rss) = r.peak_rss_bytes {
                scalars.push(("sdbooth/peak_rss_gib", (rss as f64 / (1u64 << 30) as f64) as f32));
            }
            tb.add_scalars(&scalars, r.step as i64)?;
        }
        self.jsonl.write(r)
    }

    fn at_epoch_end(&mut self, t: &Trainer<'_>, epoch: u64, board: &mut Board) -> Result<()> {
        if let Some(tb) = board {
            tb.add_scalar(TAG_LOSS_EPOCH, t.state.loss_recorder.moving_average() as f32, epoch as i64)?;
        }
        Ok(())
    }
}
