//! Compiles `lb-bench-ebpf` (the frame-restoring wrapper and the
//! verdict-only floor) for the BPF target, so `lb-bench` can embed it next
//! to the production program that `lb-userspace` embeds.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // As in lb-userspace/build.rs: lets `cargo check`, clippy and unit
        // tests build without the eBPF toolchain; loading the empty object
        // fails with aya's error.
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR not set")?);
        std::fs::write(out_dir.join("lb-bench-ebpf"), b"").context("writing placeholder object")?;
        return Ok(());
    }
    if Command::new("bpf-linker").arg("--version").output().is_err() {
        bail!("bpf-linker is not installed; run `cargo xtask setup` first");
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir.join("../lb-bench-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("lb-bench-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-bench-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building lb-bench-ebpf (needs nightly, rust-src and bpf-linker: run `cargo xtask setup`)")
}
