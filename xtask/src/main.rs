//! `cargo xtask`: the project's developer commands, in Rust so they need
//! nothing but cargo (the alias lives in `.cargo/config.toml`).
//!
//! - `setup`: installs what a fresh Debian machine lacks (nightly with
//!   `rust-src`, `bpf-linker` against nightly's own LLVM, Debian packages).
//! - `build`: the `lb` agent (with its embedded eBPF object) and the testbed backend.
//! - `test`: unit tests, then the root-only integration tests of `lb-tests`.
//! - `demo`: a narrated run of the agent in a namespace testbed.
//! - `fuzz`: the fuzzed data path or config parser, as many cases as asked, from a seed.
//! - `bench`: benchmarks side by side with nftables, HAProxy, nginx and the direct path.
//! - `dist`: a Debian package (binary, unit, config, man pages, completions, deploy/).
//!
//! Every command but `setup` first checks quickly whether anything is
//! missing and runs setup only then.

mod bench;
mod build;
mod cargo;
mod demo;
mod dist;
mod fuzz;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer commands for the XDP load balancer.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the toolchain pieces and Debian packages this project needs (idempotent).
    Setup,
    /// Build the `lb` agent (with its eBPF program) and the testbed backend.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run unit tests, then the integration tests in network namespaces (needs root).
    Test {
        /// Build and test with the release profile.
        #[arg(long)]
        release: bool,
        /// Run only tests whose name contains this (passed to every test binary).
        filter: Option<String>,
    },
    /// Show the balancer at work in a namespace testbed (needs root).
    Demo,
    /// Run mutated frames through the loaded XDP program (needs root), mutated configs through the
    /// config parser, or mutated requests to a running agent's admin API (needs root), and check each.
    Fuzz {
        /// What to fuzz.
        #[arg(long, value_enum, default_value_t = fuzz::Target::Frames)]
        target: fuzz::Target,
        /// Frames to run (`--target frames`), half IPv4 and half IPv6.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Config files (`--target config`, default 200,000) or requests (`--target admin`, default
        /// 20,000) to run.
        #[arg(long)]
        cases: Option<u64>,
        /// Seed of the frames (printed either way); drawn from the clock if absent.
        #[arg(long)]
        seed: Option<u64>,
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build target/dist/lb_VERSION_ARCH.deb with dpkg-deb.
    Dist {
        /// Package the debug build (quicker; for trying the packaging).
        #[arg(long)]
        debug: bool,
        /// Then install it into a fresh root (dpkg --root) and run the packaged
        /// `lb check` on the packaged config, as the unit's ExecStartPre does.
        #[arg(long)]
        check: bool,
    },
    /// Run the benchmarks and write target/bench/REPORT.md (needs root).
    Bench {
        /// Run only this section.
        #[arg(long, value_enum)]
        only: Option<bench::Section>,
        /// Fewer repetitions: for trying the harness, not for figures.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(&setup::Options::from_env()).map(|()| true),
        Command::Build { release } => build::run(build::Profile::from_flag(release)).map(|()| true),
        Command::Test { release, filter } => {
            test::run(&test::Options { profile: build::Profile::from_flag(release), filter })
        }
        Command::Demo => demo::run().map(|()| true),
        Command::Fuzz { target, frames, cases, seed, release } => {
            let cases = match target {
                fuzz::Target::Frames => frames,
                fuzz::Target::Config => cases.unwrap_or(200_000),
                fuzz::Target::Admin => cases.unwrap_or(20_000),
            };
            fuzz::run(&fuzz::Options { profile: build::Profile::from_flag(release), target, cases, seed })
        }
        Command::Dist { debug, check } => dist::run(debug).and_then(|deb| {
            if check {
                dist::check(&deb)?;
            }
            Ok(true)
        }),
        Command::Bench { only, quick } => bench::run(&bench::Options { only, quick }).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // The command already said what failed.
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
