//! `cargo xtask test`: the project's whole test run.
//!
//! 1. Unit tests of the default members (`lb-common`, `lb-userspace`,
//!    `xtask`) and of `lb-bench`; `lb-ebpf` cannot build for the host and
//!    `lb-tests` needs root.
//! 2. Build `lb` and `lb-testbed-backend`, and the `lb-tests` test
//!    executables without running them (their paths come from cargo's JSON).
//! 3. Run each `lb-tests` executable as root, with `LB_BIN` and
//!    `LB_TESTBED_BACKEND_BIN` pointing at what step 2 built, and with
//!    `--include-ignored`: its root-only tests are `#[ignore]`d so that
//!    plain `cargo test` reports them as ignored rather than passed.
//!
//! Output streams through; libtest's summary lines are counted, and lines
//! with [`lb_tests::SKIP_MARKER`] are counted as skipped tests (libtest
//! itself reports those as passed). The last line is always
//! `xtask test: N passed, M failed, K skipped`.

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _, Read},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    build::{self, Binaries, Profile},
    cargo::{self, Artifact},
    setup, util,
};

/// Hard limit for one test executable (or the whole unit-test run); a hung
/// test is killed rather than blocking CI forever.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long to keep reading a finished process's output (a leaked grandchild
/// could hold the pipe open).
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Parallel tests per executable; the tests are written to be parallel-safe
/// and the machines have 2 cores.
const TEST_THREADS: &str = "--test-threads=2";

/// What to test.
#[derive(Debug, Clone)]
pub struct Options {
    pub profile: Profile,
    /// Test-name filter passed to every test executable.
    pub filter: Option<String>,
}

/// The `test` subcommand. Returns whether everything passed; the summary
/// line is printed either way.
pub fn run(opts: &Options) -> anyhow::Result<bool> {
    if !lb_tests::is_root() {
        bail!(
            "cargo xtask test needs root: the integration tests create network namespaces and attach XDP programs. \
             Rerun as root (e.g. `sudo -E cargo xtask test`); plain `cargo test` runs the unit tests without root"
        );
    }
    setup::ensure(true)?;
    let mut report = Report::default();

    announce(1, "unit tests of lb-common, lb-userspace, xtask and lb-bench");
    let started = Instant::now();
    match unit_tests(opts) {
        Ok((tally, status)) => report.add("unit tests", tally, status),
        Err(e) => report.step_failed(format!("unit tests: {e:#}")),
    }
    took(started);

    announce(2, "building lb, lb-testbed-backend and the lb-tests test executables");
    let started = Instant::now();
    let built = build::build(opts.profile).and_then(|bins| Ok((bins, lb_tests_executables(opts.profile)?)));
    took(started);
    match built {
        Err(e) => report.step_failed(format!("build: {e:#}")),
        Ok((bins, executables)) => {
            announce(3, "lb-tests as root (network namespaces, XDP)");
            let started = Instant::now();
            for artifact in &executables {
                match run_lb_test(artifact, &bins, opts) {
                    Ok((tally, status)) => report.add(&label(artifact), tally, status),
                    Err(e) => report.step_failed(format!("{}: {e:#}", label(artifact))),
                }
            }
            took(started);
        }
    }
    report.print();
    Ok(report.ok())
}

fn announce(n: u32, what: &str) {
    println!("\n==> xtask test [{n}/3]: {what}");
}

fn took(started: Instant) {
    println!("==> took {}", util::human(started.elapsed()));
}

/// `cargo test` of the host-buildable members, counted.
fn unit_tests(opts: &Options) -> anyhow::Result<(Tally, ExitStatus)> {
    let mut cmd = cargo::command();
    cmd.args([
        "test",
        "--no-fail-fast",
        "-p",
        "lb-common",
        "-p",
        "lb-userspace",
        "-p",
        "xtask",
        // Outside the default members, and run only by `cargo xtask bench`:
        // testing it here keeps it building as the crates it uses change.
        "-p",
        "lb-bench",
    ])
    .args(opts.profile.cargo_args());
    if std::io::stderr().is_terminal() {
        // Its stderr is a pipe to us; keep cargo's colours for the terminal.
        cmd.env("CARGO_TERM_COLOR", "always");
    }
    if let Some(filter) = &opts.filter {
        cmd.arg("--").arg(filter);
    }
    run_counting(cmd)
}

/// Builds the `lb-tests` test executables (unit tests of its library and
/// binary, and the integration tests) without running them.
fn lb_tests_executables(profile: Profile) -> anyhow::Result<Vec<Artifact>> {
    let mut cmd = cargo::command();
    cmd.args(["test", "-p", "lb-tests", "--no-run"]).args(profile.cargo_args());
    let mut executables: Vec<Artifact> =
        cargo::artifacts(cmd)?.into_iter().filter(|a| a.test && a.executable.is_some()).collect();
    // Quick unit tests first, then the integration tests, by name.
    executables.sort_by_key(|a| (a.is("test"), a.name.clone()));
    executables.dedup();
    if !executables.iter().any(|a| a.is("test")) {
        bail!("cargo built no integration test executables for lb-tests");
    }
    Ok(executables)
}

/// `packets` for an integration test, `lb_tests (lib)` for unit tests.
fn label(artifact: &Artifact) -> String {
    if artifact.is("test") {
        artifact.name.clone()
    } else {
        format!("{} ({})", artifact.name, artifact.kinds.join(","))
    }
}

/// Runs one `lb-tests` executable the way `cargo test` would (in the
/// package's directory), plus the binaries it needs.
fn run_lb_test(artifact: &Artifact, bins: &Binaries, opts: &Options) -> anyhow::Result<(Tally, ExitStatus)> {
    let exe = artifact.executable.as_deref().context("not an executable")?;
    let package_dir = artifact.manifest_path.parent().unwrap_or(Path::new("."));
    println!("\n--> {} ({})", label(artifact), exe.display());
    let mut cmd = Command::new(exe);
    cmd.arg(TEST_THREADS)
        .arg("--include-ignored")
        .args(opts.filter.as_deref())
        .current_dir(package_dir)
        .env(lb_tests::LB_BIN_ENV, absolute(&bins.lb)?)
        .env(lb_tests::BACKEND_BIN_ENV, absolute(&bins.backend)?)
        .env("RUST_BACKTRACE", "1")
        .env("CARGO_MANIFEST_DIR", package_dir);
    run_counting(cmd)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))
}

// ------------------------------------------------------------ running, counting

#[derive(Debug, Clone, Copy)]
enum Stream {
    Out,
    Err,
}

/// Runs `cmd`, echoing its stdout and stderr line by line as they come and
/// counting libtest's results; kills it (by PID) after [`RUN_TIMEOUT`].
fn run_counting(mut cmd: Command) -> anyhow::Result<(Tally, ExitStatus)> {
    let shown = util::display(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, Stream::Out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, Stream::Err, tx);
    }
    let mut tally = Tally::default();
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((stream, line)) => {
                match stream {
                    Stream::Out => println!("{line}"),
                    Stream::Err => eprintln!("{line}"),
                }
                tally.line(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if exited.is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        match exited {
            Some((_, at)) if at.elapsed() > DRAIN_GRACE => break,
            Some(_) => {}
            None => {
                if let Some(status) = child.try_wait().with_context(|| format!("waiting for `{shown}`"))? {
                    exited = Some((status, Instant::now()));
                } else if Instant::now() >= deadline {
                    eprintln!("xtask test: `{shown}` still running after {RUN_TIMEOUT:?}; killing it");
                    let _ = child.kill();
                    let status = child.wait().with_context(|| format!("waiting for `{shown}`"))?;
                    tally.failures.push(format!("(timed out after {RUN_TIMEOUT:?}) {shown}"));
                    exited = Some((status, Instant::now()));
                }
            }
        }
    }
    let status = exited.map(|(s, _)| s).context("child status lost")?;
    Ok((tally, status))
}

/// Sends each line of `reader` (lossily decoded, without the newline) to `tx`.
fn spawn_reader(reader: impl Read + Send + 'static, stream: Stream, tx: mpsc::Sender<(Stream, String)>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Test results counted from libtest output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tally {
    /// As libtest reports them (skipped tests included).
    passed: u64,
    failed: u64,
    ignored: u64,
    /// `test: reason` of each skip marker line.
    skipped: Vec<String>,
    /// Names of failed tests.
    failures: Vec<String>,
    /// How many `test result:` lines were seen.
    summaries: u64,
}

impl Tally {
    fn line(&mut self, line: &str) {
        if let Some((_, reason)) = line.split_once(lb_tests::SKIP_MARKER) {
            self.skipped.push(reason.trim().to_owned());
        }
        let trimmed = line.trim();
        if let Some(summary) = trimmed.strip_prefix("test result: ") {
            self.summary(summary);
        } else if let Some(name) = trimmed.strip_prefix("test ").and_then(|rest| rest.strip_suffix(" ... FAILED")) {
            self.failures.push(name.to_owned());
        }
    }

    /// `ok. 10 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.2s`
    fn summary(&mut self, summary: &str) {
        self.summaries += 1;
        let counts = summary.split_once(". ").map_or(summary, |(_, rest)| rest);
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// Passed, failed and skipped as reported: a skipped test returned
    /// early, which libtest counts as passed, so it moves from passed to
    /// skipped; ignored tests did not run either and count as skipped.
    fn totals(&self) -> (u64, u64, u64) {
        let skipped = u64::try_from(self.skipped.len()).unwrap_or(u64::MAX);
        (self.passed.saturating_sub(skipped), self.failed, skipped.saturating_add(self.ignored))
    }
}

/// Everything counted over the run, and the steps that failed outright.
#[derive(Debug, Default)]
struct Report {
    parts: Vec<(String, Tally)>,
    failed_steps: Vec<String>,
}

impl Report {
    fn add(&mut self, what: &str, tally: Tally, status: ExitStatus) {
        // A failing test already explains a non-zero exit; otherwise (a
        // crash, a compile error, a timeout) the step itself failed.
        if !status.success() && tally.failed == 0 {
            self.failed_steps.push(format!("{what}: exited with {status}"));
        }
        self.parts.push((what.to_owned(), tally));
    }

    fn step_failed(&mut self, message: String) {
        eprintln!("xtask test: {message}");
        self.failed_steps.push(message);
    }

    fn totals(&self) -> (u64, u64, u64) {
        self.parts.iter().fold((0, 0, 0), |(p, f, s), (_, t)| {
            let (tp, tf, ts) = t.totals();
            (p + tp, f + tf, s + ts)
        })
    }

    fn ok(&self) -> bool {
        self.failed_steps.is_empty() && self.totals().1 == 0
    }

    fn print(&self) {
        println!("\n==> xtask test: results");
        for (what, tally) in &self.parts {
            let (p, f, s) = tally.totals();
            println!("  {what:<32} {p:>4} passed {f:>4} failed {s:>4} skipped");
        }
        let skipped: Vec<&String> = self.parts.iter().flat_map(|(_, t)| &t.skipped).collect();
        if !skipped.is_empty() {
            println!("skipped:");
            for s in skipped {
                println!("  {s}");
            }
        }
        let failures: Vec<String> = self
            .parts
            .iter()
            .flat_map(|(what, t)| t.failures.iter().map(move |name| format!("{what}: {name}")))
            .collect();
        if !failures.is_empty() {
            println!("failed tests:");
            for f in failures {
                println!("  {f}");
            }
        }
        if !self.failed_steps.is_empty() {
            println!("failed steps:");
            for s in &self.failed_steps {
                println!("  {s}");
            }
        }
        let (p, f, s) = self.totals();
        println!("xtask test: {p} passed, {f} failed, {s} skipped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_summaries_skips_and_failures() {
        let mut t = Tally::default();
        for line in [
            "running 3 tests",
            "lb-tests: SKIPPED e2e_one: needs root",
            "test a ... ok",
            "test b ... FAILED",
            "test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1.50s",
        ] {
            t.line(line);
        }
        assert_eq!((t.passed, t.failed, t.ignored, t.summaries), (6, 1, 1, 2));
        assert_eq!(t.skipped, vec!["e2e_one: needs root".to_owned()]);
        assert_eq!(t.failures, vec!["b".to_owned()]);
        assert_eq!(t.totals(), (5, 1, 2));
    }

    #[test]
    fn output_that_is_not_a_summary_counts_nothing() {
        let mut t = Tally::default();
        t.line("test result: garbage");
        t.line("some test printed: test result: ok. 9 passed");
        assert_eq!(t.totals(), (0, 0, 0));
    }
}
