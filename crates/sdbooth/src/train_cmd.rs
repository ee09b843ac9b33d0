//! `sdbooth train`: kohya's train_db.py flags (sdbooth-train's `TrainArgs`), `--config_file`,
//! the dry run (sdbooth-data's dataset report) and the refusal of unimplemented flags.

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use clap::ArgMatches;
use sdbooth_data::{prepare_datasets, DryRunReport};
use sdbooth_train::args::{resolve_config_file, ConfigOutcome, RefusalKind, TrainArgs};

#[derive(clap::Args)]
pub struct TrainCommand {
    #[command(flatten)]
    pub args: TrainArgs,
}

pub fn run(cmd: TrainCommand, matches: &ArgMatches) -> anyhow::Result<()> {
    let args = match resolve_config_file(cmd.args, matches)? {
        ConfigOutcome::Wrote(path) => {
            eprintln!("wrote the flags to {}", path.display());
            return Ok(());
        }
        ConfigOutcome::Run(args) => *args,
    };
    crate::logging::init(&args.logging)?;
    if let Some(cfg) = &args.run.config_file {
        tracing::info!(
            "flags read from {} (command-line flags win)",
            sdbooth_train::args::config_path(cfg).display()
        );
    }
    for w in args.ignored_flag_warnings()? {
        tracing::warn!("{w}");
    }
    if args.run.json.is_some() && !args.is_dry_run() {
        bail!("--json writes the dry-run report: add --dry_run");
    }
    let refusals = args.refusals()?;
    if args.is_dry_run() {
        // The dry run describes the dataset of any command line, so a flag that training would
        // refuse only for now is a note; a flag that will never work is an error here too.
        let (never, later): (Vec<_>, Vec<_>) =
            refusals.into_iter().partition(|r| r.kind == RefusalKind::OutOfScope);
        if !never.is_empty() {
            bail!("{}", join_messages(never.iter().map(|r| r.message.as_str())));
        }
        if !later.is_empty() {
            let flags: Vec<String> = later.iter().map(|r| format!("--{}", r.flag)).collect();
            tracing::warn!(
                "training (not this dry run) would refuse, as not supported yet: {}",
                flags.join(" ")
            );
        }
        return dry_run(&args);
    }
    if !refusals.is_empty() {
        bail!("{}", join_messages(refusals.iter().map(|r| r.message.as_str())));
    }
    let summary = sdbooth_train::trainer::train(&args)?;
    tracing::info!(
        "trained {} steps ({} epochs), final loss {:.4}, {:.2} s/step; model: {}",
        summary.global_step,
        summary.epochs,
        summary.final_loss,
        summary.mean_step_seconds,
        summary.final_model.display()
    );
    Ok(())
}

fn join_messages<'a>(msgs: impl Iterator<Item = &'a str>) -> String {
    let msgs: Vec<&str> = msgs.collect();
    if msgs.len() == 1 {
        msgs[0].to_string()
    } else {
        format!("{} flags cannot be used:\n  {}", msgs.len(), msgs.join("\n  "))
    }
}

fn dry_run(args: &TrainArgs) -> anyhow::Result<()> {
    let opts = args.dataset_options();
    opts.validate()?;
    // The sample prompts too, as training reads them before loading the model.
    sdbooth_train::plan::SamplePolicy::resolve(&args.sampling)?;
    if args.dataset.dataset_config.is_none() && args.dataset.train_data_dir.is_none() {
        bail!("no dataset: give --dataset_config TOML or --train_data_dir DIR");
    }
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let config = args.dataset.dataset_config.as_deref().map(Path::new);
    let group = prepare_datasets(config, &opts, &cwd)?;
    let report = DryRunReport::new(&group, &opts);
    let mut out = std::io::stdout().lock();
    if let Some(model) = &args.model.pretrained_model_name_or_path {
        writeln!(out, "model: {model} (not loaded by the dry run)")?;
    }
    write!(out, "{}", report.to_text())?;
    if args.run.debug_dataset {
        for (i, d) in report.datasets.iter().enumerate() {
            writeln!(out, "[Dataset {i}] images:")?;
            for im in &d.images {
                writeln!(
                    out,
                    "  {}: {}x{} -> bucket {}x{} (resized {}x{}), repeats {}{}, caption: {}",
                    im.path.display(),
                    im.size.0,
                    im.size.1,
                    im.bucket.0,
                    im.bucket.1,
                    im.resized_size.0,
                    im.resized_size.1,
                    im.num_repeats,
                    if im.is_reg { ", reg" } else { "" },
                    im.caption
                )?;
            }
        }
    }
    if let Some(json) = &args.run.json {
        sdbooth_checkpoint::atomic_write_bytes(Path::new(json), report.to_json().as_bytes())
            .with_context(|| format!("cannot write the dry-run JSON to {json}"))?;
        writeln!(out, "wrote {json}")?;
    }
    Ok(())
}
