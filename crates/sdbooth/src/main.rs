//! The `sdbooth` binary: flags and wiring only; the work happens in the library crates.

mod convert_cmd;
mod inspect_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Train a model (kohya train_db.py flags).
    Train(Box<train_cmd::TrainCommand>),
    /// Convert a model between SD single-file (.safetensors/.ckpt) and Diffusers formats.
    Convert(convert_cmd::ConvertArgs),
    /// Print a model's architecture, version, parameter counts, dtypes and metadata.
    Inspect(inspect_cmd::InspectArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train_cmd::run(*args),
        Command::Convert(args) => convert_cmd::run(args),
        Command::Inspect(args) => inspect_cmd::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
