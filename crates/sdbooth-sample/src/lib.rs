//! Sampling: inference samplers (kohya's `--sample_sampler` names), image generation and the
//! run report.

pub mod generate;
pub mod prompts;
pub mod report;
pub mod schedulers;
