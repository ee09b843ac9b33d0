//! `sdbooth bench`: times the training step with `train`'s flags and writes JSON.

use anyhow::Context;
use sdbooth_train::args::TrainArgs;
use sdbooth_train::plan::TrainPlan;

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct BenchArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first (allocations, caches).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    crate::logging::init(&args.train.logging)?;
    args.train.check_supported().map_err(sdbooth_train::TrainError::Refused)?;
    let plan = TrainPlan::resolve(&args.train)?;
    let report = sdbooth_train::bench::bench(&plan, args.steps, args.warmup)?;
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.train.run.json {
        sdbooth_checkpoint::atomic_write_bytes(std::path::Path::new(path), json.as_bytes())
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
