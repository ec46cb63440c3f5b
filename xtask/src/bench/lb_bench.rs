//! Building and running `lb-bench`, the measuring tool of the kernel-side
//! sections (packet, control, memory), and reading its output: one JSON
//! object per line, each with a `kind`.
//!
//! The tool links the agent's library and embeds both eBPF objects, so it
//! cannot be part of xtask itself (xtask must build before `setup` has
//! installed bpf-linker); xtask builds it with cargo and runs it instead.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    cargo::{self, Artifact},
    util,
};

/// What the kernel-side sections run, built in release mode: the figures
/// must come from optimised code.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The measuring tool.
    pub lb_bench: PathBuf,
    /// The agent.
    pub lb: PathBuf,
    /// The testbed's backend server.
    pub backend: PathBuf,
}

/// Builds `lb-bench`, `lb` and `lb-testbed-backend` in one release build.
///
/// # Errors
/// When cargo fails or does not report one of the binaries.
pub fn build() -> anyhow::Result<Tools> {
    let mut cmd = cargo::command();
    cmd.args(["build", "--release", "-p", "lb-bench", "-p", "lb-userspace", "-p", "lb-tests", "--bins"]);
    let artifacts = cargo::artifacts(cmd)?;
    Ok(Tools {
        lb_bench: binary(&artifacts, "lb-bench")?,
        lb: binary(&artifacts, lb_tests::LB_BIN_NAME)?,
        backend: binary(&artifacts, lb_tests::BACKEND_BIN_NAME)?,
    })
}

fn binary(artifacts: &[Artifact], name: &str) -> anyhow::Result<PathBuf> {
    artifacts
        .iter()
        .filter(|a| a.name == name && a.is("bin") && !a.test)
        .find_map(|a| a.executable.clone())
        .with_context(|| format!("cargo built no binary named {name}"))
}

/// Runs `cmd` (an `lb-bench` invocation) with its stderr (progress) shown,
/// kills it by PID after `timeout`, and returns its output lines parsed.
///
/// # Errors
/// When it cannot start, times out, exits non-zero, or prints a line that
/// is not JSON.
pub fn run(mut cmd: Command, timeout: Duration) -> anyhow::Result<Vec<Value>> {
    let shown = util::display(&cmd);
    println!("$ {shown}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let stdout = child.stdout.take().context("lb-bench's stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for `{shown}`"))? {
            break status;
        }
        if Instant::now() >= deadline {
            // Our own child: kill(2) by its PID through std.
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {timeout:?}; killed it");
        }
        thread::sleep(Duration::from_millis(100));
    };
    let _ = reader.join();
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    rx.try_iter()
        .map(|line| {
            let line = line.context("reading lb-bench's output")?;
            serde_json::from_str(&line).with_context(|| format!("lb-bench printed a line that is not JSON: {line}"))
        })
        .collect()
}

/// The lines of one `kind`.
pub fn of_kind<'a>(lines: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    lines.iter().filter(move |line| line["kind"] == kind)
}

/// Field `key` of `line` as a number.
///
/// # Errors
/// When it is missing or not a number.
pub fn number(line: &Value, key: &str) -> anyhow::Result<f64> {
    line[key].as_f64().with_context(|| format!("lb-bench line without a number `{key}`: {line}"))
}

/// The 1-minute load average now (`/proc/loadavg`): how busy the shared
/// machine was around a measurement, for the report.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}
