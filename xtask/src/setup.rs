//! `cargo xtask setup`: installs what a fresh Debian machine of the project's
//! kind lacks, and the quick "is anything missing?" check the other commands
//! run first. Every step checks before it acts, so running it again is cheap.
//!
//! - The nightly toolchain with `rust-src`: `lb-ebpf` is built for
//!   `bpfel-unknown-none` with `-Z build-std=core`.
//! - `bpf-linker`, linked against the nightly rustc's own libLLVM: it must
//!   speak the same LLVM major version as the rustc that feeds it bitcode,
//!   and no distribution package of that LLVM is reachable here.
//! - Debian packages the tests, the demo and the benchmarks run.

use std::{
    collections::BTreeSet,
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{self, output_ok, succeeds};

/// Debian packages used by the tests, the demo and the benchmarks.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "ethtool",
    "iproute2",
    "curl",
    "wrk",
    "nftables",
    "haproxy",
    "nginx-light",
    // nginx-light builds the stream module (the bench's layer-4 baseline) as a separate package.
    "libnginx-mod-stream",
    "iperf3",
    "hping3",
    // BIRD 2: the routing daemon that announces VIPs in the BGP tests (deploy/bird/).
    "bird2",
    "iputils-ping",
    "linux-perf",
    // The DNS server behind the UDP VIP of the `type = "dns"` health-check test.
    "dnsmasq-base",
    // Makes the test CA and certificate of the `type = "https"` health-check test.
    "openssl",
    // promtool lints a live agent's /metrics and checks deploy/'s rules (issue 13).
    "prometheus",
    // Headless, it loads the agent's status page in tests/tests/status_page.rs.
    "chromium",
];

/// The bpf-linker release known to build against LLVM 22 with these compilers.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Overrides where `bpf-linker` is installed (`cargo install --root`), and
/// puts its LLVM prefix and stamp under it too. Not a user option: it exists
/// to exercise the install path without replacing the real installation.
const BPF_LINKER_ROOT_ENV: &str = "XTASK_BPF_LINKER_ROOT";

/// Daemons that installing haproxy, nginx, bird2 or prometheus may start;
/// setup stops the ones it started.
const DAEMONS: &[&str] = &["haproxy", "nginx", "bird", "prometheus"];

/// Where things are installed.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `cargo install --root` for bpf-linker; `None` is cargo's default (`~/.cargo`).
    pub bpf_linker_root: Option<PathBuf>,
}

impl Options {
    /// Default locations, unless [`BPF_LINKER_ROOT_ENV`] is set.
    pub fn from_env() -> Self {
        Self { bpf_linker_root: env::var_os(BPF_LINKER_ROOT_ENV).filter(|v| !v.is_empty()).map(PathBuf::from) }
    }

    /// The `bpf-linker` that builds will use, if there is one: under the
    /// custom root, else the one in `PATH` (where rustc looks for it), else
    /// cargo's bin directory (installed, but `PATH` lacks it).
    fn bpf_linker_bin(&self) -> Option<PathBuf> {
        let candidate = match &self.bpf_linker_root {
            Some(root) => root.join("bin/bpf-linker"),
            None => match util::which("bpf-linker") {
                Some(path) => return Some(path),
                None => cargo_home().ok()?.join("bin/bpf-linker"),
            },
        };
        util::is_executable(&candidate).then_some(candidate)
    }

    /// The directory whose `lib/` holds the libLLVM symlinks bpf-linker is
    /// built and run against (its rpath points there, so it must stay).
    fn llvm_prefix(&self) -> anyhow::Result<PathBuf> {
        match &self.bpf_linker_root {
            Some(root) => Ok(root.join("lb-llvm")),
            None => Ok(util::home()?.join(".local/share/lb-llvm")),
        }
    }

    /// Records which LLVM the installed bpf-linker was built against.
    fn stamp_path(&self) -> anyhow::Result<PathBuf> {
        Ok(self.llvm_prefix()?.join("bpf-linker.stamp"))
    }
}

/// The `setup` subcommand: checks each piece and installs what is missing.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    install(opts, true)
}

/// Each step in turn; Debian packages only with `packages`.
fn install(opts: &Options, packages: bool) -> anyhow::Result<()> {
    require_rustup()?;
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker(opts)?;
    if packages {
        ensure_packages()?;
    }
    println!("setup: done");
    Ok(())
}

/// The quick check the other subcommands run: runs setup only if something
/// is missing. With `needs_packages` false (plain builds), missing Debian
/// packages are only reported, so a non-root user can still build.
pub fn ensure(needs_packages: bool) -> anyhow::Result<()> {
    let opts = Options::from_env();
    let mut missing = missing_toolchain(&opts);
    let packages = missing_packages().unwrap_or_else(|e| {
        eprintln!("setup: cannot check Debian packages: {e:#}");
        Vec::new()
    });
    if !packages.is_empty() {
        if needs_packages {
            missing.push(format!("Debian packages {}", packages.join(" ")));
        } else {
            println!(
                "setup: note: Debian packages {} are missing (not needed to build; `cargo xtask setup` as root installs them)",
                packages.join(" ")
            );
        }
    }
    if missing.is_empty() {
        println!("setup: nothing missing");
        return Ok(());
    }
    println!("setup: missing: {}; running setup", missing.join(", "));
    install(&opts, needs_packages)
}

/// What of the Rust side is missing, as short names for a progress line.
fn missing_toolchain(opts: &Options) -> Vec<String> {
    let mut missing = Vec::new();
    if !has_nightly().unwrap_or(false) {
        missing.push("nightly toolchain".to_owned());
        missing.push("rust-src".to_owned());
    } else if !has_rust_src().unwrap_or(false) {
        missing.push("rust-src".to_owned());
    }
    match bpf_linker_state(opts) {
        Ok(BpfLinker::Current) => {}
        Ok(state) => missing.push(format!("bpf-linker ({state})")),
        Err(e) => missing.push(format!("bpf-linker ({e:#})")),
    }
    missing
}

fn require_rustup() -> anyhow::Result<()> {
    if !succeeds("rustup", &["--version"]) {
        bail!("rustup not found; install it first: curl https://sh.rustup.rs | sh -s -- -y --profile minimal");
    }
    Ok(())
}

// ------------------------------------------------------------------ nightly

/// Whether a plain `nightly` channel toolchain (not a dated one) is installed.
fn has_nightly() -> anyhow::Result<bool> {
    let list = output_ok(Command::new("rustup").args(["toolchain", "list"]))?;
    Ok(lists_nightly(&list))
}

/// Whether `rustup toolchain list` output has `nightly-<host>`.
fn lists_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| name.strip_prefix("nightly-"))
        .any(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn ensure_nightly() -> anyhow::Result<()> {
    if has_nightly()? {
        println!("setup: nightly toolchain: present");
        return Ok(());
    }
    println!("setup: nightly toolchain: installing...");
    util::run_logged(
        "nightly toolchain",
        Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]),
    )
}

fn has_rust_src() -> anyhow::Result<bool> {
    let list = output_ok(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    Ok(list.lines().any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-")))
}

fn ensure_rust_src() -> anyhow::Result<()> {
    if has_rust_src()? {
        println!("setup: rust-src for nightly: present");
        return Ok(());
    }
    println!("setup: rust-src for nightly: installing...");
    util::run_logged(
        "rust-src",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

// --------------------------------------------------------------- bpf-linker

/// The LLVM inside the nightly toolchain.
#[derive(Debug, Clone)]
struct NightlyLlvm {
    /// From `LLVM version: 22.1.4`.
    major: u32,
    /// `$sysroot/lib/libLLVM.so.<version>-rust-<rustc version>`.
    lib: PathBuf,
}

impl NightlyLlvm {
    fn detect() -> anyhow::Result<Self> {
        let version = output_ok(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
        let major = parse_llvm_major(&version)
            .with_context(|| format!("no `LLVM version:` line in nightly `rustc -vV`:\n{version}"))?;
        let sysroot = output_ok(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let lib = find_libllvm(&lib_dir)?;
        Ok(Self { major, lib })
    }

    /// The file name bpf-linker records as its `DT_NEEDED` entry.
    fn file_name(&self) -> String {
        self.lib.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// What the stamp file holds for a bpf-linker built against this LLVM.
    /// Nightlies of one rustc version share the library's name, so only a
    /// new LLVM or rustc version makes it differ.
    fn stamp(&self) -> String {
        format!("llvm-major={}\nlibllvm={}\n", self.major, self.file_name())
    }
}

/// The major version from `rustc -vV` output (`LLVM version: 22.1.4` → 22).
fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|major| major.parse().ok())
}

/// The `libLLVM.so.*` file in a toolchain's `lib/` directory.
fn find_libllvm(lib_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("libLLVM.so."))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))
}

/// The state of the installed bpf-linker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BpfLinker {
    Missing,
    /// Installed but does not run (e.g. its libLLVM went away with an old nightly).
    Broken,
    /// Runs, but was not (as far as we can tell) built against nightly's LLVM.
    OtherLlvm,
    Current,
}

impl std::fmt::Display for BpfLinker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Missing => "not installed",
            Self::Broken => "installed but does not run",
            Self::OtherLlvm => "built for another LLVM",
            Self::Current => "present",
        })
    }
}

/// Whether bpf-linker runs and was built for the nightly's LLVM: the stamp
/// written by setup says so, or (installed by hand) it is dynamically
/// linked to exactly that libLLVM.
fn bpf_linker_state(opts: &Options) -> anyhow::Result<BpfLinker> {
    let Some(bin) = opts.bpf_linker_bin() else {
        return Ok(BpfLinker::Missing);
    };
    if !succeeds(&bin, &["--version"]) {
        return Ok(BpfLinker::Broken);
    }
    let llvm = NightlyLlvm::detect()?;
    let stamp = fs::read_to_string(opts.stamp_path()?).unwrap_or_default();
    if stamp == llvm.stamp() || links_against(&bin, &llvm.file_name()) {
        Ok(BpfLinker::Current)
    } else {
        Ok(BpfLinker::OtherLlvm)
    }
}

/// Whether `ldd bin` resolves a library called `lib_name`.
fn links_against(bin: &Path, lib_name: &str) -> bool {
    let Ok(out) = output_ok(Command::new("ldd").arg(bin)) else {
        return false;
    };
    out.lines().any(|l| {
        let l = l.trim();
        l.starts_with(lib_name) && l.contains("=>") && !l.contains("not found")
    })
}

fn ensure_bpf_linker(opts: &Options) -> anyhow::Result<()> {
    let state = bpf_linker_state(opts)?;
    if state == BpfLinker::Current {
        let llvm = NightlyLlvm::detect()?;
        // Adopt a hand-made install, so the next check needs no ldd.
        let stamp = opts.stamp_path()?;
        if fs::read_to_string(&stamp).ok().as_deref() != Some(llvm.stamp().as_str()) {
            write_stamp(&stamp, &llvm)?;
        }
        println!("setup: bpf-linker for LLVM {}: present", llvm.major);
        return Ok(());
    }
    let llvm = NightlyLlvm::detect()?;
    println!(
        "setup: bpf-linker for LLVM {}: {state}; installing {BPF_LINKER_VERSION} against {} (about a minute)...",
        llvm.major,
        llvm.lib.display()
    );
    install_bpf_linker(opts, &llvm)?;
    println!("setup: bpf-linker for LLVM {}: installed", llvm.major);
    Ok(())
}

/// Links the prefix's `lib/` to nightly's libLLVM and builds bpf-linker against it.
fn install_bpf_linker(opts: &Options, llvm: &NightlyLlvm) -> anyhow::Result<()> {
    let prefix = opts.llvm_prefix()?;
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    for name in ["libLLVM.so".to_owned(), llvm.file_name()] {
        replace_symlink(&llvm.lib, &lib_dir.join(name))?;
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "stable", "cargo", "install", "bpf-linker"])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{}", llvm.major)])
        // --force: replace a bpf-linker built for another LLVM.
        .args(["--locked", "--force"])
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN");
    if let Some(root) = &opts.bpf_linker_root {
        cmd.arg("--root").arg(root);
    }
    println!("setup: bpf-linker: building (about a minute on 2 cores)...");
    util::run_logged("bpf-linker", &mut cmd)?;
    let bin = opts.bpf_linker_bin().context("bpf-linker installed, but not found in PATH or cargo's bin directory")?;
    output_ok(Command::new(&bin).arg("--version"))
        .with_context(|| format!("the new {} does not run", bin.display()))?;
    if opts.bpf_linker_root.is_none() && util::which("bpf-linker").is_none() {
        println!(
            "setup: warning: {} is not in PATH; add {} to PATH (e.g. `. ~/.cargo/env`)",
            bin.display(),
            bin.parent().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
        );
    }
    write_stamp(&opts.stamp_path()?, llvm)
}

fn replace_symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("removing old {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}

fn write_stamp(path: &Path, llvm: &NightlyLlvm) -> anyhow::Result<()> {
    fs::write(path, llvm.stamp()).with_context(|| format!("writing {}", path.display()))
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    match env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home)),
        None => Ok(util::home()?.join(".cargo")),
    }
}

// ----------------------------------------------------------- Debian packages

/// Which of [`DEBIAN_PACKAGES`] are not installed.
fn missing_packages() -> anyhow::Result<Vec<&'static str>> {
    // One dpkg-query for all; it exits 1 when some package is unknown, but
    // still lists the known ones, so the exit status is not checked.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(DEBIAN_PACKAGES)
        .output()
        .context("running dpkg-query (setup supports Debian only)")?;
    let installed = installed_packages(&String::from_utf8_lossy(&out.stdout));
    Ok(DEBIAN_PACKAGES.iter().copied().filter(|p| !installed.contains(*p)).collect())
}

/// Package names whose status is `install ok installed`, from
/// `dpkg-query -W -f='${Package} ${Status}\n'` output.
fn installed_packages(dpkg_output: &str) -> BTreeSet<String> {
    dpkg_output
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name.to_owned())
        .collect()
}

fn ensure_packages() -> anyhow::Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("setup: Debian packages ({}): present", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    if !lb_tests::is_root() {
        bail!(
            "Debian packages {} are missing and installing them needs root: rerun as root, e.g. `sudo -E cargo xtask setup`",
            missing.join(" ")
        );
    }
    println!("setup: Debian packages: installing {}...", missing.join(" "));
    install_packages(&missing)?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("apt-get finished but {} are still not installed", still.join(" "));
    }
    println!("setup: Debian packages: installed");
    Ok(())
}

/// `apt-get install`, keeping the packages' services from starting: a
/// `policy-rc.d` that denies starts while it runs, and, should a daemon
/// start anyway, stopping exactly the daemons that appeared during the install.
fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let before = daemon_pids();
    {
        let _policy = PolicyRcd::deny_starts()?;
        util::run_logged("apt-get update", apt_get().arg("update"))?;
        let what = format!("apt-get install ({} packages)", packages.len());
        util::run_logged(&what, apt_get().args(["install", "-y", "--no-install-recommends"]).args(packages))?;
    }
    stop_new_daemons(&before);
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// `/usr/sbin/policy-rc.d` answering 101 ("action forbidden"), so that
/// `invoke-rc.d` starts no service while packages install. Removed on drop,
/// but only if this created it.
struct PolicyRcd {
    created: Option<PathBuf>,
}

impl PolicyRcd {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn deny_starts() -> anyhow::Result<Self> {
        let path = PathBuf::from(Self::PATH);
        if path.symlink_metadata().is_ok() {
            println!("setup: {} exists already; leaving it as it is", path.display());
            return Ok(Self { created: None });
        }
        fs::write(&path, "#!/bin/sh\n# Written by cargo xtask setup during apt-get install.\nexit 101\n")
            .with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", path.display()))?;
        Ok(Self { created: Some(path) })
    }
}

impl Drop for PolicyRcd {
    fn drop(&mut self) {
        if let Some(path) = self.created.take()
            && let Err(e) = fs::remove_file(&path)
        {
            eprintln!("setup: warning: removing {}: {e}", path.display());
        }
    }
}

/// PIDs of [`DAEMONS`] processes in this network namespace (read from
/// `/proc`, like `pgrep -x`, without needing procps). Processes in other
/// namespaces are tests' or benchmarks' own servers, never the packages'
/// services.
fn daemon_pids() -> BTreeSet<i32> {
    let own_netns = fs::read_link("/proc/self/ns/net").ok();
    let Ok(entries) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            DAEMONS.contains(&comm.trim()) && fs::read_link(format!("/proc/{pid}/ns/net")).ok() == own_netns
        })
        .collect()
}

/// SIGTERMs the daemons that did not run before the install, and waits up to
/// 5 s for them to go. Everything else is left alone.
fn stop_new_daemons(before: &BTreeSet<i32>) {
    let started: Vec<i32> = daemon_pids().difference(before).copied().collect();
    if started.is_empty() {
        return;
    }
    for &pid in &started {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        println!("setup: stopping {} (pid {pid}), started by the install", comm.trim());
        // SAFETY: plain kill(2) of a PID that appeared during our install.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !started.iter().any(|&pid| is_alive(pid)) {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("setup: warning: some of pids {started:?} are still running after SIGTERM");
}

/// Whether `pid` exists and is not a zombie (an exited process its parent
/// has not reaped yet).
fn is_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) S ...`: the state follows the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (abc 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn nightly_channel_but_not_dated_nightlies() {
        assert!(lists_nightly("stable-x86_64-unknown-linux-gnu (active, default)\nnightly-x86_64-unknown-linux-gnu\n"));
        assert!(!lists_nightly(
            "stable-x86_64-unknown-linux-gnu (default)\nnightly-2026-05-19-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn installed_means_install_ok_installed() {
        let out = "curl install ok installed\nwrk deinstall ok config-files\nhaproxy install ok installed\n";
        let installed = installed_packages(out);
        assert!(installed.contains("curl") && installed.contains("haproxy"));
        assert!(!installed.contains("wrk"));
    }

    #[test]
    fn stamp_names_major_and_library() {
        let llvm = NightlyLlvm { major: 22, lib: PathBuf::from("/t/lib/libLLVM.so.22.1-rust-1.97.0-nightly") };
        assert_eq!(llvm.stamp(), "llvm-major=22\nlibllvm=libLLVM.so.22.1-rust-1.97.0-nightly\n");
    }
}
