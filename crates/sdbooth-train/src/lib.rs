//! The DreamBooth training loop with kohya's options: objective, optimizers, LR schedules, saving,
//! resume and logging.

pub mod args;
