//! `lb check`: validate a config without touching the kernel.

use std::path::PathBuf;

use crate::config::Config;

/// Validate a config file and print what it describes; exits non-zero with
/// the file, key and reason when it is invalid.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The TOML config file.
    #[arg(long, short)]
    config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    println!("{}: ok", config.source.display());
    println!("  interfaces: {}", config.agent.interfaces.join(", "));
    for vip in &config.vips {
        println!("  vip {} {} {} ({} backends)", vip.name, vip.protocol.as_str(), vip.listen, vip.backends.len());
    }
    Ok(())
}
