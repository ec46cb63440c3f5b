//! The fuzzed data path (issue 12): mutated frames of every kind through
//! the real program (BPF_PROG_TEST_RUN, after the real verifier), against a
//! live connection table and two VIPs per family, each run checked by
//! `lb_tests::fuzz::check` and against the maps:
//!
//! - the invariants of [`check::check`] (no ABORTED; a passed frame leaves
//!   unchanged unless its reason rewrites; a malformed one is never sent
//!   on; what is sent on parses and its checksums are right);
//! - exactly one verdict counter moves, by one;
//! - the connection table grows only by its rule: at most one insert per
//!   frame, only for a client's TCP segment without SYN (whose SYN was
//!   seen) or UDP datagram to a VIP, sent on to a backend.
//!
//! `LB_FUZZ_FRAMES` (default 100,000, half per family) and `LB_FUZZ_SEED`
//! (default: 1, so `cargo xtask test` is deterministic) set the run; the seed is printed first, and
//! `cargo xtask fuzz --frames N --seed S` sets both. The same seed gives the
//! same frames; verdicts may differ only where the rate limiters' clocks
//! do. Failing inputs are written to `LB_FUZZ_OUT` (default
//! `target/fuzz-failures/`), one file each with its hex. Needs root.

#![expect(
    clippy::duplicate_mod,
    reason = "the v4 and v6 harnesses each include common/fixture.rs; this test uses both"
)]

mod v4;
mod v6;

use std::{fmt::Write as _, net::IpAddr, path::PathBuf, time::Instant};

use lb_common::stats::{conntrack_event, reason};
use lb_tests::fuzz::{Case, Generator, HOT_PORTS, Side, Topology, check, mutate};

/// Frames per run unless `LB_FUZZ_FRAMES` says otherwise.
const DEFAULT_FRAMES: u64 = 100_000;
/// Failures kept (and written out) per run.
const MAX_FAILURES: usize = 20;

/// Reasons under which a frame may pin a flow (it was balanced to a backend;
/// the kernel or an ICMP answer may have it next).
const INSERTING: [&str; 5] =
    ["redirect_to_backend", "pass_no_neigh", "pass_fib_failed", "pass_too_big", "tx_icmp_frag_needed"];

struct Failure {
    family: &'static str,
    index: u64,
    case: Case,
    /// The action and the frame as the program left it.
    output: (u32, Vec<u8>),
    why: String,
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn fuzzed_frames_keep_the_data_path_invariants() {
    lb_tests::require_root!();
    let (seed, frames) = parameters();
    eprintln!("fuzz: seed {seed}, {frames} frames (again: cargo xtask fuzz --seed {seed} --frames {frames})");
    let started = Instant::now();
    let v4_frames = frames / 2;
    let v6_frames = frames - v4_frames;
    let mut failures = v4::Netns::new().run(move || run_v4(seed, v4_frames));
    failures.extend(v6::Netns::new().run(move || run_v6(seed ^ 0x6666, v6_frames)));
    eprintln!("fuzz: {frames} frames in {:.1?}, {} failures", started.elapsed(), failures.len());
    if failures.is_empty() {
        return;
    }
    let dir = save(seed, &failures);
    let mut message =
        format!("{} frames broke an invariant (seed {seed}; inputs in {}):\n", failures.len(), dir.display());
    for f in failures.iter().take(5) {
        let _ = writeln!(
            message,
            "  {} #{}: {}\n    {}\n    {}",
            f.family,
            f.index,
            f.why,
            f.case.what,
            v4::hex(&f.case.frame)
        );
    }
    panic!("{message}");
}

/// The seed `cargo xtask test` runs with.
const DEFAULT_SEED: u64 = 1;

fn parameters() -> (u64, u64) {
    // A fixed default keeps `cargo xtask test` (and CI) deterministic;
    // `cargo xtask fuzz` draws a new seed each run.
    let seed = std::env::var("LB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    let frames = std::env::var("LB_FUZZ_FRAMES").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_FRAMES);
    (seed, frames)
}

fn run_v4(seed: u64, frames: u64) -> Vec<Failure> {
    let mut lb = v4::Lb::new();
    for &sport in &HOT_PORTS[..HOT_PORTS.len() / 2] {
        lb.run(&v4::Tcp::client_to_vip(sport).build(), lb.client_if);
        lb.ack(sport);
        let udp = v4::udp(v4::CLIENT_MAC, v4::GW_CLIENT_MAC, v4::CLIENT, v4::VIP, 64, sport, v4::VIP_UDP_PORT, b"x");
        lb.run(&udp, lb.client_if);
    }
    let a = |x: [u8; 4]| IpAddr::from(x);
    let topo = Topology {
        gw_client_mac: v4::GW_CLIENT_MAC,
        gw_backend_mac: v4::GW_BACKEND_MAC,
        client_mac: v4::CLIENT_MAC,
        client: a(v4::CLIENT),
        vip: a(v4::VIP),
        vip_tcp_port: v4::VIP_TCP_PORT,
        vip_udp_port: v4::VIP_UDP_PORT,
        backends: [1, 2, 3, 4]
            .into_iter()
            .map(|id| {
                let (addr, port) = v4::backend_addr(id);
                (a(addr), port, id <= 3)
            })
            .collect(),
        other: a([198, 18, 3, 9]),
        router: a([198, 18, 1, 254]),
    };
    let (client_if, backend_if) = (lb.client_if, lb.backend_if);
    run_cases("ipv4", Generator::new(seed, topo), frames, |frame, side| {
        let ingress = if side == Side::Client { client_if } else { backend_if };
        let (action, out) = v4::test_run(&mut lb.program, frame, ingress);
        (action, out, lb.maps.verdicts().expect("verdicts"), lb.maps.conntrack_events().expect("events"))
    })
}

fn run_v6(seed: u64, frames: u64) -> Vec<Failure> {
    let mut lb = v6::Lb::new();
    for &sport in &HOT_PORTS[..HOT_PORTS.len() / 2] {
        lb.run(&v6::Tcp::client_to_vip(sport).build(), lb.client_if);
        lb.ack(sport);
    }
    let a = |x: [u8; 16]| IpAddr::from(x);
    let topo = Topology {
        gw_client_mac: v6::GW_CLIENT_MAC,
        gw_backend_mac: v6::GW_BACKEND_MAC,
        client_mac: v6::CLIENT_MAC,
        client: a(v6::CLIENT),
        vip: a(v6::VIP),
        vip_tcp_port: v6::VIP_TCP_PORT,
        vip_udp_port: v6::VIP_UDP_PORT,
        backends: [1, 2, 3, 4]
            .into_iter()
            .map(|id| {
                let (addr, port) = v6::backend_addr(id);
                (a(addr), port, id <= 3)
            })
            .collect(),
        other: a(v6::addr(3, 9)),
        router: a(v6::addr(1, 0xfe)),
    };
    let (client_if, backend_if) = (lb.client_if, lb.backend_if);
    run_cases("ipv6", Generator::new(seed, topo), frames, |frame, side| {
        let ingress = if side == Side::Client { client_if } else { backend_if };
        let (action, out) = v6::test_run(&mut lb.program, frame, ingress);
        (action, out, lb.maps.verdicts().expect("verdicts"), lb.maps.conntrack_events().expect("events"))
    })
}

type Verdicts = [u64; reason::COUNT as usize];
type Events = [u64; conntrack_event::COUNT as usize];

/// Runs `frames` cases through `run` (one test run, then the counters
/// after it) and checks each; returns the failures (at most [`MAX_FAILURES`]).
fn run_cases(
    family: &'static str,
    mut generator: Generator,
    frames: u64,
    mut run: impl FnMut(&[u8], Side) -> (u32, Vec<u8>, Verdicts, Events),
) -> Vec<Failure> {
    let mut failures = Vec::new();
    // The counters before the first case: an ARP frame moves pass_not_ip only.
    let arp = generator_arp();
    let (_, _, mut verdicts, mut events) = run(&arp, Side::Client);
    for index in 0..frames {
        let case = generator.next_case();
        let (action, out, v, e) = run(&case.frame, case.side);
        let why = judge_run(&case, action, &out, (&verdicts, &v), (&events, &e));
        (verdicts, events) = (v, e);
        if let Err(why) = why {
            failures.push(Failure { family, index, case, output: (action, out), why });
            if failures.len() >= MAX_FAILURES {
                break;
            }
        }
    }
    let seen: Vec<String> =
        reason::NAMES.iter().zip(verdicts).filter(|(_, n)| *n > 0).map(|(name, n)| format!("{name} {n}")).collect();
    eprintln!("fuzz: {family} verdicts: {}", seen.join(", "));
    failures
}

fn generator_arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&v4::CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.resize(42, 0);
    f
}

fn judge_run(
    case: &Case,
    action: u32,
    out: &[u8],
    v: (&Verdicts, &Verdicts),
    e: (&Events, &Events),
) -> Result<(), String> {
    let moved: Vec<(&str, u64)> = reason::NAMES
        .iter()
        .zip(v.0.iter().zip(v.1))
        .filter(|(_, (b, a))| b != a)
        .map(|(name, (b, a))| (*name, a.wrapping_sub(*b)))
        .collect();
    let [(reason, 1)] = moved[..] else { return Err(format!("verdict counters moved: {moved:?}")) };
    check::check(&case.frame, action, out, reason)?;
    let inserted = e.1[conntrack_event::INSERTED as usize].wrapping_sub(e.0[conntrack_event::INSERTED as usize]);
    match inserted {
        0 => Ok(()),
        1 if may_pin(case, reason) => Ok(()),
        n => Err(format!("{n} connection-table inserts for a frame counted as {reason}")),
    }
}

/// Whether a frame may pin a flow: a client's TCP segment without SYN, or a
/// UDP datagram, balanced to a backend.
fn may_pin(case: &Case, reason: &str) -> bool {
    if case.side != Side::Client || !INSERTING.contains(&reason) {
        return false;
    }
    // By hand, not etherparse: it does not read the ports of a datagram's
    // first fragment, which the program balances like a whole datagram.
    let f = &case.frame;
    let Some((at, ethertype)) = mutate::l3(f) else { return false };
    let (proto, l4) = match ethertype {
        0x0800 if f.len() > at + 9 => (f[at + 9], at + usize::from(f[at] & 0x0f) * 4),
        0x86dd if f.len() > at + 6 => (f[at + 6], at + 40),
        _ => return false,
    };
    match proto {
        6 => f.get(l4 + 13).is_some_and(|flags| flags & 0x12 != 0x02),
        17 => true,
        _ => false,
    }
}

/// Writes each failure's input to a file of its own; returns the directory.
fn save(seed: u64, failures: &[Failure]) -> PathBuf {
    let dir = std::env::var_os("LB_FUZZ_OUT")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures"), PathBuf::from);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("fuzz: cannot create {}: {e}", dir.display());
    }
    for f in failures {
        let path = dir.join(format!("{seed}-{}-{}.txt", f.family, f.index));
        let text = format!(
            "seed {seed}\nfamily {}\nframe {}\nside {:?}\nmade {}\nbroke {}\nhex {}\naction {}\nout {}\n",
            f.family,
            f.index,
            f.case.side,
            f.case.what,
            f.why,
            v4::hex(&f.case.frame),
            f.output.0,
            v4::hex(&f.output.1)
        );
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("fuzz: cannot write {}: {e}", path.display());
        }
    }
    dir
}
