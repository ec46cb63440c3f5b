//! `cargo xtask bench`: benchmarks of the balancer against the direct path
//! and other balancers (nftables, HAProxy, nginx). Not written yet; this
//! module is where they go.

use crate::setup;

/// The `bench` subcommand (a placeholder for now).
pub fn run() -> anyhow::Result<()> {
    // The benchmarks will need wrk, haproxy, nginx, iperf3 and perf.
    setup::ensure(true)?;
    println!("bench: benchmarks are not written yet; they are tracked in issue 4");
    Ok(())
}
