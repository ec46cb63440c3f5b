//! Test support for the load balancer: a namespace [`testbed`] with HTTP/UDP
//! backends, and client helpers that count which backend answered.
//!
//! Everything here needs root (network namespaces, veths, a bridge). The
//! integration tests in `tests/tests/` use it, and so does `cargo xtask demo`.
//!
//! # Locating binaries
//!
//! The testbed runs `lb-testbed-backend` (this package's binary) in every
//! backend namespace; end-to-end tests also run the `lb` agent. Both are found
//! by [`backend_bin`] and [`lb_bin`]:
//!
//! 1. the environment variable (`LB_TESTBED_BACKEND_BIN`, `LB_BIN`), which
//!    `cargo xtask test` and `cargo xtask demo` set after building them;
//! 2. otherwise next to the running executable or one directory up. An
//!    integration test runs from `target/<profile>/deps/`, and cargo builds the
//!    package's own binaries into `target/<profile>/` before its integration
//!    tests, so `cargo test -p lb-tests` finds the backend without help. The
//!    `lb` binary belongs to another package: build it first
//!    (`cargo build -p lb-userspace --bin lb`, same profile) or set `LB_BIN`.

use std::{
    env,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

pub mod agent;
pub mod flood;
pub mod fuzz;
pub mod load;
pub mod misbehave;
pub mod scenarios;
pub mod testbed;
pub mod tls;

pub use testbed::{ChildGuard, HttpResponse, Namespace, ScratchNamespace, Spread, Testbed, TestbedBuilder};

/// File name of the backend server binary built by this package.
pub const BACKEND_BIN_NAME: &str = "lb-testbed-backend";
/// Environment variable that overrides where [`backend_bin`] looks.
pub const BACKEND_BIN_ENV: &str = "LB_TESTBED_BACKEND_BIN";
/// File name of the load balancer agent built by `lb-userspace`.
pub const LB_BIN_NAME: &str = "lb";
/// Environment variable that overrides where [`lb_bin`] looks.
pub const LB_BIN_ENV: &str = "LB_BIN";
/// Marker that `cargo xtask test` counts as a skipped test; see [`skip`].
pub const SKIP_MARKER: &str = "lb-tests: SKIPPED";

/// Path of the `lb-testbed-backend` binary (see the crate docs for the order).
///
/// # Errors
///
/// When the variable is unset and no such file is next to the executable.
pub fn backend_bin() -> anyhow::Result<PathBuf> {
    find_bin(BACKEND_BIN_NAME, BACKEND_BIN_ENV, "cargo build -p lb-tests --bin lb-testbed-backend")
}

/// Path of the `lb` agent binary (see the crate docs for the order).
///
/// # Errors
///
/// When the variable is unset and no such file is next to the executable.
pub fn lb_bin() -> anyhow::Result<PathBuf> {
    find_bin(LB_BIN_NAME, LB_BIN_ENV, "cargo build -p lb-userspace --bin lb")
}

fn find_bin(name: &str, var: &str, build_hint: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = env::var_os(var) {
        let path = PathBuf::from(path);
        if !is_executable(&path) {
            bail!("{var}={} is not an executable file", path.display());
        }
        return Ok(path);
    }
    let exe = env::current_exe().context("finding the current executable")?;
    let dir = exe.parent().context("current executable has no directory")?;
    let candidates: Vec<PathBuf> = [Some(dir), dir.parent()].into_iter().flatten().map(|d| d.join(name)).collect();
    candidates.iter().find(|p| is_executable(p)).cloned().with_context(|| {
        let looked: Vec<_> = candidates.iter().map(|p| p.display().to_string()).collect();
        format!(
            "{name} not found (looked in {}); build it with `{build_hint}` in the same profile or set {var}",
            looked.join(", ")
        )
    })
}

/// Reports a test as skipped, with the reason, and returns; call it then
/// `return` from the test, e.g. when the kernel lacks a feature. Writes
/// straight to stderr, past libtest's output capture, so `cargo xtask test`
/// sees the marker and counts it. (Root-only tests are `#[ignore]`d
/// instead: see [`require_root!`].)
///
/// ```no_run
/// if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
///     return lb_tests::skip("kernel has no BTF");
/// }
/// ```
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{SKIP_MARKER} {test}: {reason}");
}

/// Fails the calling test unless the process is root.
///
/// Every test that needs root is also marked
/// `#[ignore = "needs root: `cargo xtask test` runs it"]`, so plain
/// `cargo test -p lb-tests` reports it as ignored, never as passed, and
/// `cargo xtask test` runs it as root with `--include-ignored`. This catches
/// one run anyway without root, with the reason, rather than letting it
/// pass having tested nothing.
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            $crate::is_root(),
            "needs root for namespaces and XDP: run it through `cargo xtask test` (or as root with --include-ignored)"
        );
    };
}

/// Whether this process runs as root (namespaces and XDP need it).
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a clear message unless running as root.
///
/// # Errors
///
/// When the effective uid is not 0.
pub fn require_root() -> anyhow::Result<()> {
    if !is_root() {
        bail!("this needs root (network namespaces); run it through `cargo xtask test` or under sudo -E");
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
