//! `sdbooth inspect FILE_OR_DIR` (owned by the checkpoint work, issue 4). Reads only the tensor
//! index, so it is instant on a 4 GB file and never runs a pickle's code.

#[derive(clap::Args)]
pub struct InspectArgs {
    /// SD .safetensors/.ckpt, Diffusers folder, HF id in the local cache, or builtin:NAME.
    pub path: String,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let report = sdbooth_checkpoint::inspect(&args.path)?;
    // A closed pipe (`sdbooth inspect x | head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), report.to_string().as_bytes());
    if !report.missing.is_empty() {
        anyhow::bail!("{}: {} tensors the architecture needs are missing", args.path, report.missing.len());
    }
    Ok(())
}
