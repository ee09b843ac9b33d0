//! The `sdbooth` binary: flags and wiring only; the work happens in the library crates.

mod bench_cmd;
mod convert_cmd;
mod generate_cmd;
mod inspect_cmd;
mod logging;
mod selftest_cmd;
mod train_cmd;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sdbooth",
    version,
    about = "DreamBooth training for Stable Diffusion 1.x/2.x, kohya train_db compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Each subcommand's flags are boxed: they are large, and boxing keeps `Command` small
/// whichever subcommand grows (clippy's large_enum_variant).
#[derive(Subcommand)]
enum Command {
    /// Train a model (kohya train_db.py flags).
    Train(Box<train_cmd::TrainCommand>),
    /// Convert a model between SD single-file (.safetensors/.ckpt) and Diffusers formats.
    Convert(Box<convert_cmd::ConvertArgs>),
    /// Print a model's architecture, version, parameter counts, dtypes and metadata.
    Inspect(Box<inspect_cmd::InspectArgs>),
    /// Generate images from a model (kohya's sampler names and prompt-file options).
    Generate(Box<generate_cmd::GenerateArgs>),
    /// Time the training step (train's flags; --steps, --warmup, --json FILE) on any model.
    Bench(Box<bench_cmd::BenchArgs>),
    /// A local web UI: set up, check, run and watch training runs (each one a `train` child).
    Ui(Box<sdbooth_ui::UiArgs>),
    /// Check the ops on a device: forward and gradients against the CPU, with bounds.
    Selftest(Box<selftest_cmd::SelftestArgs>),
}

/// kohya's flags are snake_case; also accept the kebab-case spelling (`--learning-rate`) as a
/// hidden alias, so both styles of command line work without doubling `--help`.
/// `bench` takes train's flags, so it gets the same aliases.
fn with_kebab_aliases(cmd: clap::Command) -> clap::Command {
    let add = |sub: clap::Command| {
        sub.mut_args(|arg| match arg.get_long().filter(|l| l.contains('_')).map(|l| l.replace('_', "-")) {
            Some(kebab) => arg.alias(kebab),
            None => arg,
        })
    };
    cmd.mut_subcommand("train", add).mut_subcommand("bench", add)
}

/// kohya's argparse reads `--learning_rate -1` as the value -1; clap would take `-1` for a flag and
/// answer "unexpected argument". Let every flag that takes a value take a negative number too (the
/// value checks then refuse what cannot train, naming the flag).
fn with_negative_numbers(cmd: clap::Command) -> clap::Command {
    let numbers = |arg: clap::Arg| {
        if arg.get_action().takes_values() {
            arg.allow_negative_numbers(true)
        } else {
            arg
        }
    };
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    names.iter().fold(cmd, |cmd, name| cmd.mut_subcommand(name, |sub| sub.mut_args(numbers)))
}

/// `--device` of the commands without train's logging (generate, selftest): resolves it and
/// prints the choice, and why `auto` fell back to the CPU, on stderr. (train and bench resolve
/// it in their plan and log it.)
pub(crate) fn select_device(
    choice: sdbooth_train::device::DeviceChoice,
) -> anyhow::Result<candle_core::Device> {
    // f32 stays f32 here: --allow_tf32 is a training flag.
    let selected = sdbooth_train::device::select(choice, false)?;
    if let Some(note) = &selected.fallback_note {
        eprintln!("note: {note}");
    }
    eprintln!("device: {}", selected.description);
    Ok(selected.device)
}

fn main() -> std::process::ExitCode {
    // First, while this is the only thread: candle's element-wise workers park soon after each op
    // instead of spinning against the GEMM threads (see sdbooth_ops::threads; an explicit
    // CANDLE_BARRIER_POOL_SPIN_LIMIT wins).
    sdbooth_ops::tune_thread_pools();
    let matches = with_negative_numbers(with_kebab_aliases(Cli::command())).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Training-sized buffers: keep large blocks in the heap instead of fresh mmaps per step
    // (see sdbooth_ops::alloc). The ops would apply it on first use; doing it here makes it
    // visible. SDBOOTH_NO_MALLOC_TUNING=1 leaves malloc alone.
    if matches!(
        cli.command,
        Command::Train(_) | Command::Bench(_) | Command::Generate(_) | Command::Selftest(_)
    ) {
        sdbooth_ops::tune_allocator();
    }
    let result = match cli.command {
        Command::Train(args) => match matches.subcommand_matches("train") {
            Some(train_matches) => train_cmd::run(*args, train_matches),
            None => Err(anyhow::anyhow!("internal error: no matches for the train subcommand")),
        },
        Command::Convert(args) => convert_cmd::run(*args),
        Command::Inspect(args) => inspect_cmd::run(*args),
        Command::Generate(args) => generate_cmd::run(*args),
        Command::Bench(args) => bench_cmd::run(*args),
        Command::Ui(args) => {
            logging::init_default();
            std::env::current_exe()
                .map_err(|e| anyhow::anyhow!("cannot find this program's own path to run training: {e}"))
                .and_then(|exe| sdbooth_ui::run(*args, exe))
        }
        Command::Selftest(args) => selftest_cmd::run(*args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        with_negative_numbers(with_kebab_aliases(Cli::command())).debug_assert();
    }

    #[test]
    fn kebab_case_aliases_parse() {
        let m = with_kebab_aliases(Cli::command()).try_get_matches_from([
            "sdbooth",
            "train",
            "--learning-rate",
            "1e-6",
            "--dry-run",
        ]);
        let cli = m.and_then(|m| Cli::from_arg_matches(&m));
        match cli {
            Ok(Cli { command: Command::Train(t) }) => {
                assert_eq!(t.args.optimizer.learning_rate, 1e-6);
                assert!(t.args.run.dry_run);
            }
            Ok(_) => panic!("parsed as another subcommand"),
            Err(e) => panic!("{e}"),
        }
    }
}
