//! `cargo xtask fuzz`: the fuzzed data path (`tests/tests/fuzz.rs`) for as
//! many frames as asked, from a seed given or drawn.
//!
//! It builds the `fuzz` test executable of `lb-tests` and runs its one test
//! as root with `LB_FUZZ_FRAMES` and `LB_FUZZ_SEED`; the test prints the
//! seed first, so any run can be repeated, and writes failing inputs to
//! `target/fuzz-failures/`. `cargo xtask test` runs the same test with its
//! default of 100,000 frames.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{build::Profile, cargo, setup, util};

/// The test the subcommand runs.
const FUZZ_TEST: &str = "fuzzed_frames_keep_the_data_path_invariants";

/// What to fuzz.
#[derive(Debug, Clone)]
pub struct Options {
    pub profile: Profile,
    /// Frames to run (half IPv4, half IPv6).
    pub frames: u64,
    /// The seed; drawn from the clock when absent.
    pub seed: Option<u64>,
}

/// The `fuzz` subcommand. Returns whether every frame kept the invariants.
pub fn run(opts: &Options) -> anyhow::Result<bool> {
    if !lb_tests::is_root() {
        bail!("cargo xtask fuzz needs root: it loads the XDP program. Rerun as root (e.g. `sudo -E cargo xtask fuzz`)");
    }
    setup::ensure(true)?;
    let mut build = cargo::command();
    build.args(["test", "-p", "lb-tests", "--test", "fuzz", "--no-run"]).args(opts.profile.cargo_args());
    let exe = cargo::artifacts(build)?
        .into_iter()
        .filter(|a| a.test && a.is("test"))
        .find_map(|a| a.executable)
        .context("cargo built no `fuzz` test executable for lb-tests")?;
    let mut cmd = Command::new(&exe);
    cmd.args(["--exact", FUZZ_TEST, "--include-ignored", "--nocapture"])
        .env("LB_FUZZ_FRAMES", opts.frames.to_string())
        .env("RUST_BACKTRACE", "1");
    // Without --seed, a new one each run (the test's own default is fixed,
    // for `cargo xtask test`).
    let seed = opts.seed.unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    cmd.env("LB_FUZZ_SEED", seed.to_string());
    println!("fuzz: {}", util::display(&cmd));
    let status = cmd.status().with_context(|| format!("running {}", exe.display()))?;
    println!("fuzz: {}", if status.success() { "every frame kept the invariants" } else { "FAILED" });
    Ok(status.success())
}
