//! `sdbooth ui`: a local web app, served from the binary itself, that sets up, checks, runs and
//! watches `sdbooth train` runs.
//!
//! The UI never trains in its own process: every check and run is a child process of the same
//! binary (`sdbooth train ...`), so a UI crash never kills a run and a run started from the CLI
//! looks the same. What it shows comes from the run's files: the JSON-lines log
//! (`<output_dir>/<output_name>.jsonl`), samples, checkpoints, states and `report.html`.
//!
//! - auth.rs: the access token, the Host check (DNS rebinding) and POST-only state changes.
//! - flags.rs: the flag list from `TrainArgs`' clap command, presets, flags → command line.
//! - check.rs: the dry run and the `--config_file` TOML, both by the CLI itself.
//! - runs.rs / queue.rs: run folders in the workdir, the one-at-a-time queue, stop and resume.
//! - watch.rs: a run's progress read from its files, streamed by server-sent events.
//! - api.rs: the HTTP routes; assets/: the page (plain HTML, CSS, JS; no CDN, no build step).

mod api;
mod auth;
mod check;
mod dataset;
mod flags;
mod models;
mod queue;
mod runs;
mod watch;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

pub use flags::{flag_schema, FlagInfo, FlagKind, PRESETS};

/// `sdbooth ui` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct UiArgs {
    /// Address to listen on. Anything but loopback exposes the UI (and training) to the network:
    /// it must be given explicitly and prints a warning.
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Port to listen on (0: any free port; the printed URL has the real one).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Print the URL but do not open a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// Folder of the runs started from the UI (created when missing).
    #[arg(long, value_name = "DIR", default_value = "sdbooth-runs")]
    pub workdir: PathBuf,
}

/// What every request handler shares.
pub(crate) struct AppState {
    pub token: String,
    pub port: u16,
    /// The `sdbooth` binary that runs checks and training (this process's own executable).
    pub exe: PathBuf,
    pub workdir: PathBuf,
    /// The folder relative paths typed in the form are resolved from.
    pub cwd: PathBuf,
    pub queue: queue::Queue,
}

/// Starts the server and serves until Ctrl-C. `exe` is the `sdbooth` binary to run children of.
pub fn run(args: UiArgs, exe: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, exe))
}

async fn serve(args: UiArgs, exe: PathBuf) -> anyhow::Result<()> {
    let host = args.host.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, args.port))
        .await
        .with_context(|| format!("cannot listen on {host}:{}", args.port))?;
    let port = listener.local_addr().context("no local address")?.port();
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("cannot create the workdir {}", args.workdir.display()))?;
    let workdir = std::fs::canonicalize(&args.workdir)
        .with_context(|| format!("cannot resolve the workdir {}", args.workdir.display()))?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let token = auth::new_token();
    let queue = queue::Queue::new(exe.clone(), workdir.clone());
    let state = Arc::new(AppState { token: token.clone(), port, exe, workdir: workdir.clone(), cwd, queue });
    queue::start_scheduler(state.clone());

    let url_host = match host {
        IpAddr::V6(h) => format!("[{h}]"),
        IpAddr::V4(h) => h.to_string(),
    };
    let url = format!("http://{url_host}:{port}/?token={token}");
    if !host.is_loopback() {
        tracing::warn!(
            "listening on {host}, not loopback: anyone who can reach this machine and has the token \
             can start training and read files the UI can read. Use --host 127.0.0.1 unless you mean it."
        );
    }
    println!("sdbooth ui: runs in {}", workdir.display());
    println!("open {url}");
    println!("(Ctrl-C stops the UI; runs it started go on and show up when it is started again)");
    if !args.no_browser {
        open_browser(&url);
    }
    let app = api::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("the HTTP server failed")
}

/// `xdg-open` (Linux) / `open` (macOS); a failure only means the user opens the URL by hand.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
    let spawned = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        // Reaped on a thread so it leaves no zombie behind.
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(e) => tracing::warn!("could not open a browser ({opener}: {e}); open the URL above by hand"),
    }
}
