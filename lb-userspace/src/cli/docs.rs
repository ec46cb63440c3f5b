//! `lb generate-docs`: man pages and shell completions generated from the
//! CLI's own definitions (clap_mangen, clap_complete), so they never drift
//! from `lb --help`. Hidden: packaging (`cargo xtask dist`) runs it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap_complete::Shell;

/// Write the man pages (`man1/lb.1`, `man1/lb-SUBCOMMAND.1`) and the bash,
/// zsh and fish completions (`completions/`) under a directory.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write them; created if missing.
    #[arg(long)]
    out: PathBuf,
}

#[cfg(test)]
impl Args {
    pub(super) fn for_test(out: PathBuf) -> Self {
        Args { out }
    }
}

pub fn run(args: &Args, command: clap::Command) -> anyhow::Result<()> {
    let man = args.out.join("man1");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    write_man_pages(&man, &command)?;
    let completions = args.out.join("completions");
    std::fs::create_dir_all(&completions).with_context(|| format!("creating {}", completions.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = command.clone();
        let path = clap_complete::generate_to(shell, &mut command, "lb", &completions)
            .with_context(|| format!("writing the {shell} completion into {}", completions.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `lb.1`, then one page per visible subcommand, named `lb-NAME.1`.
fn write_man_pages(dir: &Path, command: &clap::Command) -> anyhow::Result<()> {
    let write = |name: &str, page: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .title(name.to_owned())
            .render(&mut out)
            .with_context(|| format!("rendering {name}.1"))?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
        Ok(())
    };
    write("lb", command.clone())?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("lb-{}", sub.get_name());
        let page = sub.clone().display_name(name.clone()).bin_name(format!("lb {}", sub.get_name()));
        write(&name, page)?;
    }
    Ok(())
}
