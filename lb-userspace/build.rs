//! Compiles `lb-ebpf` for the BPF target so the agent can embed the object.
//!
//! This needs the nightly toolchain with `rust-src` and `bpf-linker`;
//! `cargo xtask setup` installs both.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Passes the git commit to the agent (`lb_build_info`) as `LB_GIT_COMMIT`;
/// outside a git checkout (a source tarball) there is none, and the agent
/// says `unknown`.
fn git_commit() {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        String::from_utf8(out.stdout).ok().map(|s| s.trim().to_owned())
    };
    if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=LB_GIT_COMMIT={commit}");
    }
    // The reflog grows with every commit and checkout: a new commit rebuilds.
    if let Some(log) = git(&["rev-parse", "--path-format=absolute", "--git-path", "logs/HEAD"]) {
        println!("cargo:rerun-if-changed={log}");
    }
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR not set")?);
    git_commit();
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Lets `cargo check`/unit tests build without the eBPF toolchain; the
        // agent refuses to load an empty object with a clear error.
        std::fs::write(out_dir.join("lb-ebpf"), b"").context("writing placeholder object")?;
        return Ok(());
    }
    if Command::new("bpf-linker").arg("--version").output().is_err() {
        bail!("bpf-linker is not installed; run `cargo xtask setup` first");
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir.join("../lb-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("lb-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building lb-ebpf (needs nightly, rust-src and bpf-linker: run `cargo xtask setup`)")
}
