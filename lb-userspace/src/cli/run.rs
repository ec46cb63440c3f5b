//! `lb run`: the agent.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::config::Config;

/// Load the XDP program, attach it to the configured interfaces, and keep
/// the maps in step with backend health until SIGINT or SIGTERM.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The TOML config file.
    #[arg(long, short)]
    config: PathBuf,
    /// On SIGTERM or SIGINT, remove the program, its links and pins, as
    /// `lb unload` does (by default the data path stays attached and forwards
    /// on its last state until an agent adopts it).
    #[arg(long)]
    unload_on_exit: bool,
    /// The control socket, instead of the config's agent.control_socket.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// The runtime state file, instead of the config's agent.state_file.
    #[arg(long)]
    state_file: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Validate before touching the kernel: a bad config attaches nothing.
    let mut config = Config::load(&args.config)?;
    let opts = crate::agent::RunOptions {
        unload_on_exit: args.unload_on_exit,
        control_socket: args.control_socket,
        state_file: args.state_file,
    };
    opts.apply(&mut config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(crate::agent::run(config, opts))
}
