//! `cargo xtask bench`: the benchmarks, side by side with what users would
//! pick instead, in one run. Each section measures one thing and returns a
//! Markdown table with its method; the whole report (machine description
//! first) is printed and written to `target/bench/REPORT.md`, from which
//! `BENCHMARKS.md` is updated by hand with the command that produced it.
//!
//! Sections (`--only NAME` runs one):
//! - `packet`: per-packet cost in the kernel through BPF_PROG_TEST_RUN.
//! - `control`: Maglev table builds and map writes; health-check CPU.
//! - `memory`: BPF map memory and agent RSS.
//! - `e2e`: requests per second, latency and gateway CPU through the
//!   namespace testbed, for lb, nftables, HAProxy, nginx and the direct path.
//! - `pps`: packets per second the gateway forwards, lb against nftables.
//! - `failover`: a backend's death and return, against the configured bound.
//! - `disruption`: flows moved and connections broken when a backend goes.
//! - `hostile`: a flood SYN's cost and the limiter's, and established flows
//!   and the connection table under floods in the testbed.
//!
//! Benchmarks measure; they never assert timings (tests check correctness).

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context as _;

use crate::setup;

mod baselines;
mod control;
mod disruption;
mod e2e;
mod failover;
mod harness;
mod hostile;
mod lb_bench;
mod livegen;
mod loadgen;
mod memory;
mod packet;
mod pps;
mod spread;

/// One section's result.
pub struct Report {
    /// Heading, e.g. "Per-packet cost".
    pub title: String,
    /// The method, the table and what limits it, in Markdown.
    pub body: String,
}

/// A benchmark section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Packet,
    Control,
    Memory,
    E2e,
    Pps,
    Failover,
    Disruption,
    Hostile,
}

impl Section {
    const ALL: [Section; 8] = [
        Section::Packet,
        Section::Control,
        Section::Memory,
        Section::E2e,
        Section::Pps,
        Section::Failover,
        Section::Disruption,
        Section::Hostile,
    ];
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only this section; all when `None`.
    pub only: Option<Section>,
    /// Fewer repetitions and shorter runs: for trying the harness, not for figures.
    pub quick: bool,
}

/// The `bench` subcommand.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(lb_tests::is_root(), "cargo xtask bench needs root (namespaces, XDP); rerun as root");
    setup::ensure(true)?;
    let mut report = String::new();
    let _ = writeln!(report, "# Benchmark report\n\n{}", machine_description());
    for section in Section::ALL.into_iter().filter(|s| opts.only.is_none_or(|only| only == *s)) {
        println!("\n==> bench: {section:?}");
        let result = run_section(section, opts).with_context(|| format!("bench section {section:?}"))?;
        println!("{}", result.body);
        let _ = writeln!(report, "\n## {}\n\n{}", result.title, result.body);
    }
    let out = PathBuf::from("target/bench/REPORT.md");
    std::fs::create_dir_all("target/bench").context("creating target/bench")?;
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    println!("\nbench: report written to {}", out.display());
    Ok(())
}

fn run_section(section: Section, opts: &Options) -> anyhow::Result<Report> {
    Ok(match section {
        Section::Packet => packet::run(opts)?,
        Section::Control => control::run(opts)?,
        Section::Memory => memory::run(opts)?,
        Section::E2e => e2e::run(opts.quick)?,
        Section::Pps => pps::run(opts.quick)?,
        Section::Failover => failover::run(opts.quick)?,
        Section::Disruption => disruption::run(opts.quick)?,
        Section::Hostile => hostile::run(opts)?,
    })
}

/// CPU model, cores, memory and kernel, for the top of the report.
fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {cpu}, {cores} cores, {} GiB, kernel {}. Client, gateway and backends share these cores.",
        mem_kib / (1024 * 1024),
        kernel.trim()
    )
}
