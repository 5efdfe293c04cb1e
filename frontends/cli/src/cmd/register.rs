//! `nes register -e EMAIL`: register this identity's keys with the key server, through
//! the daemon (which holds the keys and knows the key server).

use crate::error::{user, CliError};
use crate::output::print_line;
use crate::Ctx;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the key server sends the activation link.
    #[arg(short = 'e', long, env = "NES_EMAIL")]
    pub email: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<(), CliError> {
    let email = args.email.trim();
    if email.is_empty() || !email.contains('@') {
        return Err(user(format!(
            "not an email address: {:?}; give the address the activation link should go to",
            args.email
        )));
    }
    let reply = ctx.client().await?.register(email).await?;
    let message = if reply.message.is_empty() {
        format!(
            "registered {}: follow the activation link mailed to {email}",
            reply.username
        )
    } else {
        format!("{}: {}", reply.username, reply.message)
    };
    print_line(&message)
}
