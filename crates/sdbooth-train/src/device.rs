//! Where a run computes: the ONE place that turns the command line into a `candle_core::Device`.
//!
//! Everything a step touches (weights, cached latents, the VAE, the text encoder, noise, masks,
//! optimizer state) is created on, or moved to, the device resolved here, which the plan
//! ([`crate::plan::TrainPlan::device`]) carries. Code elsewhere names `Device::Cpu` only for what
//! must be on the host: reading and writing files.
//!
//! This build computes on the CPU. A `--device` flag (auto, cpu, cuda, cuda:N) and the CUDA probe
//! belong in this file.

use candle_core::Device;

use crate::error::Result;

/// The device of a run.
pub fn resolve_device() -> Result<Device> {
    Ok(Device::Cpu)
}
