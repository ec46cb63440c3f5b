//! `lb reload`: ask the running agent to reload its config file and show the result.

use super::control::{SocketArgs, print_answer, request};

/// Reload the running agent's config file (as SIGHUP does) and wait for the
/// result: prints each change and exits 0, or prints the refusal (file, key,
/// reason) and exits non-zero. Runtime changes (`lb backend`) stay in force.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    socket: SocketArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let socket = args.socket.path()?;
    let (code, body) = request(&socket, "POST", "/reload", "")?;
    print_answer(code, &body)
}
