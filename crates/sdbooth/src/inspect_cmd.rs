//! `sdbooth inspect` (owned by the checkpoint work, issue 4).

#[derive(clap::Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("sdbooth inspect is not supported yet")
}
