//! `nesd`: parses the settings, sets up logging, and runs the daemon.
//!
//! Errors end here as one line on stderr and exit code 1; bad usage is clap's exit 2.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser;
use nesd::config::{Cli, Config, Dirs};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                line.push_str(": ");
                line.push_str(&cause.to_string());
            }
            eprintln!("nesd: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::resolve(cli, &Dirs::from_env())?;
    let filter = match &config.log {
        Some(f) => EnvFilter::try_new(f).with_context(|| format!("bad log filter {f:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Colours only on a terminal (not in journald or a log file).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nesd")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(nesd::daemon::run(config))?;
    Ok(())
}
