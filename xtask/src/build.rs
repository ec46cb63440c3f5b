//! `cargo xtask build`: the `lb` agent and the testbed backend.
//!
//! Building `lb-userspace` runs its build script, which compiles `lb-ebpf`
//! for the BPF target with nightly (through aya-build) and embeds the object
//! in `lb`; that is why setup (nightly, `rust-src`, `bpf-linker`) comes first.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    cargo::{self, Artifact},
    setup,
};

/// Cargo profile to build (and test) with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// `--release` on the command line means [`Profile::Release`].
    pub fn from_flag(release: bool) -> Self {
        if release { Self::Release } else { Self::Debug }
    }

    /// Extra cargo arguments selecting this profile.
    pub fn cargo_args(self) -> &'static [&'static str] {
        match self {
            Self::Debug => &[],
            Self::Release => &["--release"],
        }
    }
}

/// Where the built binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The agent, `target/<profile>/lb`.
    pub lb: PathBuf,
    /// The testbed's backend server, `target/<profile>/lb-testbed-backend`.
    pub backend: PathBuf,
}

/// The `build` subcommand: setup check, build, and where the results are.
pub fn run(profile: Profile) -> anyhow::Result<()> {
    setup::ensure(false)?;
    let bins = build(profile)?;
    println!("build: done");
    println!("  {}", bins.lb.display());
    println!("  {}", bins.backend.display());
    Ok(())
}

/// Builds `lb` (with its eBPF object) and `lb-testbed-backend` in one cargo
/// run, and returns their paths as cargo reports them.
pub fn build(profile: Profile) -> anyhow::Result<Binaries> {
    println!("build: lb (with the eBPF program) and {}", lb_tests::BACKEND_BIN_NAME);
    let mut cmd = cargo::command();
    cmd.args(["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]).args(profile.cargo_args());
    let artifacts = cargo::artifacts(cmd)?;
    Ok(Binaries {
        lb: binary(&artifacts, lb_tests::LB_BIN_NAME)?,
        backend: binary(&artifacts, lb_tests::BACKEND_BIN_NAME)?,
    })
}

/// The executable of the (non-test) binary target `name`.
fn binary(artifacts: &[Artifact], name: &str) -> anyhow::Result<PathBuf> {
    artifacts
        .iter()
        .filter(|a| a.name == name && a.is("bin") && !a.test)
        .find_map(|a| a.executable.clone())
        .with_context(|| format!("cargo built no binary named {name}"))
}
