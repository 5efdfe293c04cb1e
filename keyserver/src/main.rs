//! `nes-keyserver`: parses the command line, sets up logging, runs the library, and
//! turns the outcome into an exit code: 0 ok, 1 an error the user can fix (one line on
//! stderr says what and how), 2 bad usage (clap).

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use nes_keyserver::cli::{Cli, Command, LogFormat};
use nes_keyserver::config::ServeConfig;
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nes-keyserver: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen(args) => {
            let key = nes_keyserver::keygen::run(&args, &mut std::io::stdout().lock())?;
            eprintln!(
                "nes-keyserver: wrote {} (private, mode 0600) and {}; fingerprint sha256:{}",
                args.out.display(),
                nes_keyserver::keygen::public_path(&args.out).display(),
                key.public_key().fingerprint()
            );
            Ok(())
        }
        Command::Serve(args) => {
            let config = ServeConfig::resolve(*args)?;
            init_logging(config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("nes-keyserver")
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(nes_keyserver::server::serve(config))?;
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The error and its causes on one line. Our errors already name their cause in their
/// message, so a cause is appended only when the line does not say it yet.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line.replace(['\n', '\r'], " ")
}
