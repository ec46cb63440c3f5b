//! Running cargo from xtask, and reading its JSON messages to learn where
//! the binaries and test executables it built are (rather than guessing
//! `target/` paths, which `CARGO_TARGET_DIR` and profiles change).

use std::{
    env,
    ffi::OsString,
    io::{BufRead as _, BufReader, IsTerminal as _, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::util;

/// A cargo command in the workspace root. It runs the cargo that runs us
/// (`CARGO`, set by `cargo xtask`), so the toolchain stays the same, falling
/// back to `cargo` from `PATH`.
pub fn command() -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.current_dir(util::workspace_root());
    cmd
}

/// One compiled target, from a `compiler-artifact` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Target name, e.g. `lb` or `packets`.
    pub name: String,
    /// Target kinds, e.g. `["bin"]`, `["test"]`, `["lib"]`.
    pub kinds: Vec<String>,
    /// Built with the test harness (a test executable).
    pub test: bool,
    /// The runnable file, for binaries and test executables.
    pub executable: Option<PathBuf>,
    /// The package's `Cargo.toml`; tests run in its directory, as under `cargo test`.
    pub manifest_path: PathBuf,
}

impl Artifact {
    /// Parses one line of cargo's JSON output; `None` for other messages.
    pub fn from_message(message: &Value) -> Option<Self> {
        if message["reason"] != "compiler-artifact" {
            return None;
        }
        let target = &message["target"];
        Some(Self {
            name: target["name"].as_str()?.to_owned(),
            kinds: target["kind"].as_array()?.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect(),
            test: message["profile"]["test"].as_bool().unwrap_or(false),
            executable: message["executable"].as_str().map(PathBuf::from),
            manifest_path: PathBuf::from(message["manifest_path"].as_str()?),
        })
    }

    /// Whether any of its kinds is `kind`.
    pub fn is(&self, kind: &str) -> bool {
        self.kinds.iter().any(|k| k == kind)
    }
}

/// Runs `cmd` (a `cargo build` or `cargo test --no-run`) with JSON messages,
/// prints compiler diagnostics as cargo would, and returns the artifacts.
/// Cargo's own progress still goes to stderr.
pub fn artifacts(mut cmd: Command) -> anyhow::Result<Vec<Artifact>> {
    let format = if std::io::stderr().is_terminal() {
        "--message-format=json-diagnostic-rendered-ansi"
    } else {
        "--message-format=json"
    };
    cmd.arg(format).stdout(Stdio::piped()).stdin(Stdio::null());
    let shown = util::display(&cmd);
    println!("$ {shown}");
    let mut child = cmd.spawn().with_context(|| format!("starting `{shown}`"))?;
    let stdout = child.stdout.take().context("cargo's stdout is not piped")?;
    let mut artifacts = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            // Not a cargo message (e.g. a build script printing to stdout).
            println!("{line}");
            continue;
        };
        if message["reason"] == "compiler-message" {
            if let Some(rendered) = message["message"]["rendered"].as_str() {
                let _ = std::io::stderr().lock().write_all(rendered.as_bytes());
            }
        } else if let Some(artifact) = Artifact::from_message(&message) {
            artifacts.push(artifact);
        }
    }
    let status = child.wait().with_context(|| format!("waiting for `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(artifacts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_test_artifact() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#lb-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"packets","src_path":"/w/tests/tests/packets.rs","edition":"2024","doc":false,"doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/w/target/debug/deps/packets-0123"],"executable":"/w/target/debug/deps/packets-0123","fresh":true}"#;
        let message: Value = serde_json::from_str(line).expect("valid json");
        let artifact = Artifact::from_message(&message).expect("an artifact");
        assert_eq!(artifact.name, "packets");
        assert!(artifact.is("test") && artifact.test);
        assert_eq!(artifact.executable, Some(PathBuf::from("/w/target/debug/deps/packets-0123")));
        assert_eq!(artifact.manifest_path, PathBuf::from("/w/tests/Cargo.toml"));
    }

    #[test]
    fn ignores_other_messages() {
        let message: Value = serde_json::from_str(r#"{"reason":"build-finished","success":true}"#).expect("json");
        assert_eq!(Artifact::from_message(&message), None);
    }
}
