//! What the packet-fixture harnesses share, whatever the address family
//! (included by `v4/mod.rs` and `v6/mod.rs`; not a test crate of its own): a
//! private network namespace to run the loaded program in (its routes and
//! neighbours make `bpf_fib_lookup` answer as on a real gateway), one
//! BPF_PROG_TEST_RUN of a frame with the verdict counter that moved, and
//! frame comparison. The per-family harnesses build their topology and
//! frames on top.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb::dataplane::{Maps, Program};
use lb_common::stats::reason;

/// A network namespace of its own for one test; deleted on drop.
pub struct FixtureNs(String);

impl FixtureNs {
    /// Creates `<prefix><pid>x<n>` with a veth pair `lbp-c` (client side)
    /// and `lbp-b` (backend side) whose MACs are `client_mac` and
    /// `backend_mac`, both up, and loopback up.
    ///
    /// # Panics
    ///
    /// When a command fails: this is for tests.
    #[must_use]
    pub fn new(prefix: &str, client_mac: [u8; 6], backend_mac: [u8; 6]) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name]);
        let ns = FixtureNs(name);
        let n = ns.name();
        // DAD would hold IPv6 addresses back for a second or two.
        sh(&["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        sh(&["ip", "-n", n, "link", "add", "lbp-c", "type", "veth", "peer", "name", "lbp-b"]);
        sh(&["ip", "-n", n, "link", "set", "lbp-c", "address", &mac_str(client_mac)]);
        sh(&["ip", "-n", n, "link", "set", "lbp-b", "address", &mac_str(backend_mac)]);
        for dev in ["lo", "lbp-c", "lbp-b"] {
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
        }
        ns
    }

    /// The name given to `ip netns`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `ip -n <this namespace> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", self.name()];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// Runs `f` on a thread that has entered this namespace (setns is per thread).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            use std::os::fd::AsRawFd as _;
            // SAFETY: a valid netns fd; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for FixtureNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs a command, panicking with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The index of interface `name` in the calling thread's namespace.
#[must_use]
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: a valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}");
    idx
}

/// `struct xdp_md` for ctx_in: data offsets and the ingress device.
#[must_use]
pub fn xdp_md(len: u32, ingress_ifindex: u32) -> [u8; 24] {
    let fields = [0u32, len, 0, ingress_ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    out
}

/// One BPF_PROG_TEST_RUN of `frame` arriving on `ingress`: the action and
/// the frame as the program left it.
pub fn test_run(program: &mut Program, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = xdp_md(frame.len() as u32, ingress);
    let mut ctx_out = [0u8; 24];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ctx_out: Some(&mut ctx_out),
        ..TestRunOptions::default()
    };
    let result = program.xdp().expect("xdp").test_run(opts).unwrap_or_else(|e| panic!("test_run: {e:?}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// [`test_run`], and the one verdict reason whose counter moved; fails
/// unless exactly one moved, by one.
pub fn test_run_counted(
    program: &mut Program,
    maps: &Maps,
    frame: &[u8],
    ingress: u32,
) -> (u32, Vec<u8>, &'static str) {
    let before = maps.verdicts().expect("verdicts");
    let (action, out) = test_run(program, frame, ingress);
    let after = maps.verdicts().expect("verdicts");
    let moved: Vec<(&str, u64)> = reason::NAMES
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| *b != a)
        .map(|(name, (b, a))| (*name, a - b))
        .collect();
    assert!(moved.len() == 1 && moved[0].1 == 1, "expected one verdict counted once, got {moved:?}");
    (action, out, moved[0].0)
}

/// A frame as hex, for failure messages.
#[must_use]
pub fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// Byte equality, with both frames in hex on failure.
#[track_caller]
pub fn assert_frame(actual: &[u8], expected: &[u8]) {
    assert!(actual == expected, "frame differs\n  actual:   {}\n  expected: {}", hex(actual), hex(expected));
}
