//! `cargo xtask fuzz`: a fuzz test of `lb-tests` for as many cases as
//! asked, from a seed given or drawn.
//!
//! - `--target frames` (the default): the fuzzed data path
//!   (`tests/tests/fuzz.rs`), as root, with `LB_FUZZ_FRAMES`;
//!   `cargo xtask test` runs it with 100,000 frames.
//! - `--target config`: the fuzzed config parser
//!   (`tests/tests/config_fuzz.rs`), no root needed, with
//!   `LB_CONFIG_FUZZ_CASES`; `cargo xtask test` runs it with 5,000 cases.
//! - `--target admin`: random and mutated requests to a running agent's
//!   admin port and control socket (`tests/tests/admin_fuzz.rs`), as root,
//!   with `LB_ADMIN_FUZZ_REQUESTS`; `cargo xtask test` runs 10,000.
//!
//! It builds the test executable and runs its one test with `LB_FUZZ_SEED`;
//! the test prints the seed first, so any run can be repeated, and writes
//! failing inputs to `target/fuzz-failures/`.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{build::Profile, cargo, setup, util};

/// What `cargo xtask fuzz` feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Mutated frames through the loaded XDP program (needs root).
    Frames,
    /// Mutated config files through the config parser.
    Config,
    /// Random and mutated requests to a running agent's admin API (needs root).
    Admin,
}

impl Target {
    /// The `lb-tests` test file, its one test, and the variable that sets
    /// how many cases it runs.
    fn test(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Target::Frames => ("fuzz", "fuzzed_frames_keep_the_data_path_invariants", "LB_FUZZ_FRAMES"),
            Target::Config => {
                ("config_fuzz", "mutated_configs_are_accepted_or_rejected_naming_a_key", "LB_CONFIG_FUZZ_CASES")
            }
            Target::Admin => (
                "admin_fuzz",
                "fuzzed_admin_requests_are_answered_or_closed_and_the_agent_stays_up",
                "LB_ADMIN_FUZZ_REQUESTS",
            ),
        }
    }
}

/// What to fuzz.
#[derive(Debug, Clone)]
pub struct Options {
    pub profile: Profile,
    pub target: Target,
    /// Cases to run: frames (half IPv4, half IPv6) or config files.
    pub cases: u64,
    /// The seed; drawn from the clock when absent.
    pub seed: Option<u64>,
}

/// The `fuzz` subcommand. Returns whether every case kept the invariants.
pub fn run(opts: &Options) -> anyhow::Result<bool> {
    let needs_root = opts.target != Target::Config;
    if needs_root && !lb_tests::is_root() {
        bail!(
            "cargo xtask fuzz --target {:?} needs root: it loads the XDP program. Rerun as root (e.g. `sudo -E \
             cargo xtask fuzz`)",
            opts.target
        );
    }
    setup::ensure(needs_root)?;
    let (file, test, cases_var) = opts.target.test();
    let mut build = cargo::command();
    build.args(["test", "-p", "lb-tests", "--test", file, "--no-run"]).args(opts.profile.cargo_args());
    let exe = cargo::artifacts(build)?
        .into_iter()
        .filter(|a| a.test && a.is("test"))
        .find_map(|a| a.executable)
        .with_context(|| format!("cargo built no `{file}` test executable for lb-tests"))?;
    let mut cmd = Command::new(&exe);
    if opts.target == Target::Admin {
        // The test runs the agent and the testbed's backends.
        let bins = crate::build::build(opts.profile)?;
        cmd.env(lb_tests::LB_BIN_ENV, std::path::absolute(&bins.lb).context("the lb binary's path")?)
            .env(lb_tests::BACKEND_BIN_ENV, std::path::absolute(&bins.backend).context("the backend's path")?);
    }
    cmd.args(["--exact", test, "--include-ignored", "--nocapture"])
        .env(cases_var, opts.cases.to_string())
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
    println!("fuzz: {}", if status.success() { "every case kept the invariants" } else { "FAILED" });
    Ok(status.success())
}
