//! `sdbooth selftest`: every op's forward and backward on the chosen device against the CPU
//! kernels (on a CPU-only machine: the reference path against the CPU kernels), then every
//! optimizer's device implementation against its CPU kernel, as a table. Exits non-zero when a
//! compared tensor exceeds its bound. See sdbooth_ops::selftest and sdbooth_train::optim::selftest.

use anyhow::bail;
use candle_core::DType;
use sdbooth_ops::selftest;
use sdbooth_train::device::DeviceChoice;

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct SelftestArgs {
    /// Device to test: auto (the first GPU when this binary has CUDA and one is usable, else the
    /// CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceChoice,
    /// Dtypes to test, comma-separated: f32, bf16, f16 [default: all three on a GPU; f32,f16 on
    /// the CPU, where candle has no bf16 matrix product].
    #[arg(long, value_delimiter = ',', value_parser = parse_dtype)]
    pub dtypes: Vec<DType>,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.trim() {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("unknown dtype {other:?}: use f32, bf16 or f16")),
    }
}

pub fn run(args: SelftestArgs) -> anyhow::Result<()> {
    let device = crate::select_device(args.device)?;
    let (tested, baseline) = selftest::paths_for(&device);
    let dtypes = if args.dtypes.is_empty() { selftest::default_dtypes(&device) } else { args.dtypes };
    let mut report = selftest::run(&tested, &baseline, &dtypes);
    report.rows.extend(sdbooth_train::optim::selftest::rows(&device));
    print!("{}", report.table());
    if !report.passed() {
        bail!(
            "selftest failed: {} of {} compared tensors exceed their bounds ({} vs {})",
            report.failures(),
            report.rows.len(),
            report.tested,
            report.baseline
        );
    }
    Ok(())
}
