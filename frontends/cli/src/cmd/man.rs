//! `nes man [--dir DIR]`: man pages for `nes` and every command (`nes.1`,
//! `nes-send.1`, ...), generated from the flag definitions.

use crate::error::{user, CliError};
use clap::CommandFactory;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the pages (created if missing).
    #[arg(short = 'd', long, default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
}

pub fn run(args: Args) -> Result<(), CliError> {
    std::fs::create_dir_all(&args.dir).map_err(|e| user(format!("{}: {e}", args.dir.display())))?;
    let command = crate::Cli::command();
    clap_mangen::generate_to(command, &args.dir)
        .map_err(|e| user(format!("{}: {e}", args.dir.display())))?;
    let mut pages: Vec<_> = std::fs::read_dir(&args.dir)
        .map_err(|e| user(format!("{}: {e}", args.dir.display())))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".1") && (n == "nes.1" || n.starts_with("nes-")))
        .collect();
    pages.sort();
    crate::output::print_line(&format!(
        "wrote {} man pages to {}: {}",
        pages.len(),
        args.dir.display(),
        pages.join(" ")
    ))
}
