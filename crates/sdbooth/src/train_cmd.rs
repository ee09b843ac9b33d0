//! `sdbooth train` (owned by the CLI work, issue 2).

#[derive(clap::Args)]
pub struct TrainCommand {}

pub fn run(_args: TrainCommand) -> anyhow::Result<()> {
    anyhow::bail!("sdbooth train is not supported yet")
}
