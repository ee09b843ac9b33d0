//! kohya's `--console_log_level` / `--console_log_file` / `--console_log_simple`: every message
//! of `train` and `bench` goes through `tracing` to stderr or that file. RUST_LOG wins when set.
//! `ui` has no such flags: its messages go to stderr at the default level ([`init_default`]).

use std::io::IsTerminal as _;

use anyhow::Context;
use sdbooth_train::args::types::ConsoleLogLevel;
use sdbooth_train::args::LoggingArgs;

/// The subscriber of the commands without logging flags: stderr, info level.
pub fn init_default() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn init(flags: &LoggingArgs) -> anyhow::Result<()> {
    let level = match flags.console_log_level {
        Some(ConsoleLogLevel::Debug) => "debug",
        Some(ConsoleLogLevel::Warning) => "warn",
        Some(ConsoleLogLevel::Error | ConsoleLogLevel::Critical) => "error",
        Some(ConsoleLogLevel::Info) | None => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(!flags.console_log_simple);
    let result = match &flags.console_log_file {
        Some(file) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .with_context(|| format!("cannot open --console_log_file {file}"))?;
            builder.with_ansi(false).with_writer(std::sync::Mutex::new(f)).try_init()
        }
        // Colour codes only on a terminal: a log redirected to a file stays plain text.
        None => builder.with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).try_init(),
    };
    // A second init (tests calling run twice) keeps the first subscriber; that is fine.
    let _ = result;
    Ok(())
}
