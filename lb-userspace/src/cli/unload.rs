//! `lb unload`: remove the pinned data path.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    config::{Config, DEFAULT_PIN_DIR},
    dataplane::pins,
};

/// Detach the XDP program and remove its links and every pinned map
/// (connection table included) from the pin directory, leaving nothing
/// behind. Refused while an agent runs on it: stop the agent first.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pin directory (agent.pin_dir).
    #[arg(long, conflicts_with = "config")]
    pin_dir: Option<PathBuf>,
    /// Take the pin directory from this config file instead.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = pin_dir(args.pin_dir, args.config.as_deref())?;
    match pins::unload(&dir).with_context(|| format!("unloading {}", dir.display()))? {
        None => println!("nothing pinned at {}", dir.display()),
        Some(detached) if detached.is_empty() => {
            println!("removed the pins at {} (no interface was attached)", dir.display())
        }
        Some(detached) => {
            println!("detached from {}; removed the pins at {}", detached.join(", "), dir.display());
        }
    }
    Ok(())
}

/// The pin directory from `--pin-dir`, else from `--config`'s file, else the default.
pub(super) fn pin_dir(pin_dir: Option<PathBuf>, config: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = pin_dir {
        return Ok(dir);
    }
    match config {
        Some(path) => Ok(Config::load(path)?.agent.pin_dir),
        None => Ok(PathBuf::from(DEFAULT_PIN_DIR)),
    }
}
