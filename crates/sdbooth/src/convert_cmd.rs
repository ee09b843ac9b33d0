//! `sdbooth convert` (owned by the checkpoint work, issue 4).

#[derive(clap::Args)]
pub struct ConvertArgs {}

pub fn run(_args: ConvertArgs) -> anyhow::Result<()> {
    anyhow::bail!("sdbooth convert is not supported yet")
}
