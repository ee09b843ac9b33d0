//! The DreamBooth training loop with kohya's options: objective, optimizers, LR schedules, saving,
//! resume and logging.

pub mod args;
pub mod bench;
pub mod device;
pub mod error;
pub mod logs;
pub mod loss;
pub mod lr;
pub mod noise;
pub mod optim;
pub mod plan;
mod square_sum;
pub mod state;
pub mod trainer;
pub mod update;

pub use error::{Result, TrainError};
