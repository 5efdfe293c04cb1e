//! `nes version`: this program's version and the running daemon's.
//!
//! Succeeds without a daemon (it then says it is not running): the question is about
//! versions, not about the daemon being up.

use crate::error::CliError;
use crate::output::print_line;
use crate::Ctx;

pub async fn run(ctx: &Ctx) -> Result<(), CliError> {
    print_line(&format!("nes {}", env!("CARGO_PKG_VERSION")))?;
    let daemon = match nes_client::Client::connect(&ctx.socket).await {
        Ok(mut client) => match client.status().await {
            Ok(status) => format!(
                "nesd {} (user {}, socket {})",
                status.version,
                status.user,
                ctx.socket.display()
            ),
            Err(err) => format!("nesd: {err}"),
        },
        Err(err) if err.is_not_running() => {
            format!("nesd: not running (socket {})", ctx.socket.display())
        }
        Err(err) => format!("nesd: {err}"),
    };
    print_line(&daemon)
}
