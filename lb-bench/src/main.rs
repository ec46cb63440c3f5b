//! `lb-bench`: the measuring side of `cargo xtask bench`'s kernel sections.
//! xtask builds it, runs it (as root, the packet benchmark inside a network
//! namespace of its own), and turns its output into the report.
//!
//! ```text
//! lb-bench packet --repeat 1000000 --runs 5      # per-packet cost (BPF_PROG_TEST_RUN)
//! lb-bench maglev --runs 5                       # Maglev builds and map writes
//! lb-bench maps --pid 1234                       # an agent's BPF maps and their memlock
//! lb-bench fill-flows --pid 1234 --flows 1000000 ...   # tracked flows written into its maps
//! ```
//!
//! Output is one JSON object per line on stdout, each with a `kind`: raw
//! measurements, no medians (xtask computes those). Progress goes to stderr.
//! Nothing here asserts a timing; a run fails only when it could not
//! measure what it claims (a wrong verdict, a flow that was not new).

mod fixture;
mod frames;
mod maglev;
mod maps;
mod packet;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kernel-side benchmarks of the load balancer (needs root).
#[derive(Debug, Parser)]
#[command(name = "lb-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per-packet cost of lb_xdp through BPF_PROG_TEST_RUN, with the frame
    /// restored before every iteration. Builds its links in the current
    /// network namespace, so run it in a fresh one (it refuses the host's).
    Packet(packet::Args),
    /// Maglev table builds, diffs and the control plane's map writes.
    Maglev(maglev::Args),
    /// The BPF maps a process holds, with the memory the kernel charges for each.
    Maps(maps::ListArgs),
    /// Writes tracked flows into a running agent's CONNTRACK.
    FillFlows(maps::FillArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Packet(args) => packet::run(&args),
        Command::Maglev(args) => maglev::run(&args),
        Command::Maps(args) => maps::list(&args),
        Command::FillFlows(args) => maps::fill(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lb-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints one measurement line (a JSON object) on stdout.
fn emit(value: &serde_json::Value) {
    println!("{value}");
}
