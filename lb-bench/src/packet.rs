//! Per-packet cost of `lb_xdp` through BPF_PROG_TEST_RUN.
//!
//! Each case is measured `runs` times, and each run is three test runs of
//! `repeat` iterations on the same frame, one after the other:
//!
//! 1. `floor`: the verdict-only program, run directly;
//! 2. `wrapper`: the restoring wrapper tail-calling the verdict-only program;
//! 3. `wrapped`: the wrapper tail-calling `lb_xdp`.
//!
//! `lb_xdp`'s cost as if each iteration got a fresh copy of the frame for
//! free is `wrapped - wrapper + floor`; xtask computes it per run. After
//! every `wrapped` run the program's own counters must show that each
//! iteration took the case's path (its verdict reason counted `repeat`
//! times, nothing else, and for first ACKs `repeat` connection-table
//! inserts, for every other case none), or the run fails.
//!
//! A TCP flow enters the connection table at its first ACK after a SYN
//! seen here (`lb_common::embryo`), so a new connection costs two cases: its
//! SYN (forwarded by Maglev, untracked: it only writes its `EMBRYOS` slot)
//! and its first ACK (the insert). For the first ACK the wrapper varies the
//! source and writes that flow's SYN into `lb_xdp`'s `EMBRYOS` before each
//! iteration, so every iteration is a real first ACK with a real insert.

use std::net::IpAddr;

use anyhow::{Context as _, ensure};
use etherparse::{NetSlice, SlicedPacket};
use lb_bench_ebpf::{VARY_NONE, VARY_V4_SOURCE, VARY_V6_SOURCE};
use lb_common::{
    limits::DEFAULT_CONNTRACK_CAPACITY,
    stats::{conntrack_event, reason},
};
use serde_json::json;

use crate::{
    emit,
    fixture::{self, BpfFs, Lb, Sample, Wrapper, XDP_PASS, XDP_REDIRECT},
    frames::{
        self, BACKEND_TCP_PORT, CLIENT_MAC, CLIENT_PORT, Family, GW_BACKEND_MAC, GW_CLIENT_MAC, Segment, Tuple,
        VIP_TCP_LIMITED_PORT, VIP_TCP_PORT, VIP_UDP_PORT,
    },
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Iterations per test run (the kernel reports their average).
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Test runs of each case.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Connection-table capacity, in flows: the agent's default.
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_CAPACITY)]
    pub capacity: u32,
    /// Only the hostile section's cases: a flood's SYNs (a new source each)
    /// and one source's SYNs, to a VIP without and with per-client limits.
    #[arg(long)]
    pub hostile: bool,
}

/// One frame to measure, and the path it must take.
struct Case {
    name: &'static str,
    family: Family,
    frame: Vec<u8>,
    ingress: u32,
    /// `VARY_*`: a new flow per iteration, or the same frame each time.
    vary: u32,
    /// Each varied flow's SYN is seeded before the frame (an ACK) runs.
    first_ack: bool,
    expect: Expect,
}

#[derive(Clone, Copy)]
struct Expect {
    action: u32,
    reason: u32,
    /// Every iteration inserts a flow into the connection table (and
    /// otherwise none does).
    new_flow: bool,
}

const TO_BACKEND: Expect = Expect { action: XDP_REDIRECT, reason: reason::REDIRECT_TO_BACKEND, new_flow: false };
const TO_CLIENT: Expect = Expect { action: XDP_REDIRECT, reason: reason::REDIRECT_TO_CLIENT, new_flow: false };
const PASSED: Expect = Expect { action: XDP_PASS, reason: reason::PASS_NOT_VIP, new_flow: false };
const DIRECT: Expect = Expect { action: XDP_PASS, reason: reason::PASS_DIRECT_FLOW, new_flow: false };
/// A SYN of a new flow: forwarded by Maglev, nothing inserted.
const SYN_UNTRACKED: Expect = TO_BACKEND;
/// A new flow's first ACK: forwarded, and inserted.
const FIRST_ACK: Expect = Expect { action: XDP_REDIRECT, reason: reason::REDIRECT_TO_BACKEND, new_flow: true };

/// Case names of the new-flow cases (xtask reads them).
const SYN: &str = "tcp_syn_untracked";
const SYN_FULL: &str = "tcp_syn_untracked_table_full";
const ACK: &str = "tcp_first_ack";
const ACK_FULL: &str = "tcp_first_ack_table_full";

/// The `packet` subcommand.
///
/// # Errors
/// When the links, a program or a test run fail, or a case takes another path.
pub fn run(args: &Args) -> anyhow::Result<()> {
    ensure!(args.repeat > 0 && args.runs > 0, "--repeat and --runs must be at least 1");
    fixture::set_up_links()?;
    let fs = BpfFs::mount()?;
    if args.hostile {
        return hostile(&fs, args).context("the hostile cases");
    }
    tracked_flows(&fs, args).context("cases on tracked flows")?;
    new_flows_empty_table(&fs, args).context("new flows, table not full")?;
    new_flows_full_table(&fs, args).context("new flows, table full")?;
    Ok(())
}

/// Established TCP, its reply, UDP of a tracked flow and a packet that is
/// not for a VIP, for both families, on one program whose table holds only
/// those flows. Runs go case by case within a run, so drift spreads over
/// all cases alike.
fn tracked_flows(fs: &BpfFs, args: &Args) -> anyhow::Result<()> {
    let mut lb = Lb::load(args.capacity)?;
    let wrapper = &mut Wrapper::load(&mut lb, fs)?;
    emit_program(&mut lb, wrapper)?;
    let mut cases = Vec::new();
    for family in Family::ALL {
        cases.extend(tracked_flow_cases(&mut lb, family)?);
    }
    for run in 0..args.runs {
        for case in &cases {
            measure(wrapper, &mut lb, case, args.repeat, run)?;
        }
    }
    Ok(())
}

/// New flows into an empty table: a SYN of a new flow per iteration, then
/// a first ACK of a new flow per iteration, on a fresh program (and maps)
/// for each run and family, so every run starts empty (SYNs insert
/// nothing). The first run of each family counts the table afterwards,
/// showing whether anything was evicted.
fn new_flows_empty_table(fs: &BpfFs, args: &Args) -> anyhow::Result<()> {
    for run in 0..args.runs {
        for family in Family::ALL {
            let mut lb = Lb::load(args.capacity)?;
            let mut wrapper = Wrapper::load(&mut lb, fs)?;
            for case in [syn_case(&lb, family, SYN)?, first_ack_case(&lb, family, ACK)?] {
                measure(&mut wrapper, &mut lb, &case, args.repeat, run)?;
            }
            if run == 0 {
                emit_table(&mut lb, ACK, family, "after_first_run", args.capacity)?;
            }
        }
    }
    Ok(())
}

/// New flows into a full table, where every insert makes the LRU evict:
/// the table is filled first by first ACKs of new flows through the
/// program itself (a quarter more than its capacity, so it is in the
/// evicting regime), and counted before and after. SYNs and first ACKs of
/// both families are then measured on it.
fn new_flows_full_table(fs: &BpfFs, args: &Args) -> anyhow::Result<()> {
    let mut lb = Lb::load(args.capacity)?;
    let mut wrapper = Wrapper::load(&mut lb, fs)?;
    let fill = first_ack_case(&lb, Family::V4, ACK_FULL)?;
    let inserts = args.capacity.saturating_add(args.capacity / 4);
    wrapper.set_frame(&fill.frame, fill.vary, fill.first_ack)?;
    wrapper.target_lb(&mut lb)?;
    let before = Counts::read(&lb)?;
    let sample = wrapper.run_wrapped(&fill.frame, fill.ingress, inserts).context("filling the table")?;
    expect_verdict("lb_xdp filling the table", sample, XDP_REDIRECT)?;
    Counts::read(&lb)?.check_path(&before, fill.expect, inserts).context("filling the table")?;
    emit_table(&mut lb, ACK_FULL, Family::V4, "before", args.capacity)?;
    let mut cases = Vec::new();
    for family in Family::ALL {
        cases.push(syn_case(&lb, family, SYN_FULL)?);
        cases.push(first_ack_case(&lb, family, ACK_FULL)?);
    }
    for run in 0..args.runs {
        for case in &cases {
            measure(&mut wrapper, &mut lb, case, args.repeat, run)?;
        }
    }
    emit_table(&mut lb, ACK_FULL, Family::V4, "after", args.capacity)?;
    Ok(())
}

/// The hostile section's cases: a SYN flood's segment (a new 5-tuple every
/// iteration) to the plain TCP VIP (`tcp_syn_untracked`, as in the main
/// cases) and to the limited one (`tcp_syn_limited`; for IPv6, whose
/// varied source is the address, every iteration also creates its client's
/// bucket; IPv4 varies the port first, so its client mostly exists), then
/// one source's SYN over and over to each (`tcp_syn_same_tuple`,
/// `tcp_syn_limited_same_tuple`: the bucket exists and is warm). A fresh program per run and family, so every run
/// starts with empty tables.
fn hostile(fs: &BpfFs, args: &Args) -> anyhow::Result<()> {
    for run in 0..args.runs {
        for family in Family::ALL {
            let mut lb = Lb::load(args.capacity)?;
            let mut wrapper = Wrapper::load(&mut lb, fs)?;
            let limited = Tuple { dport: VIP_TCP_LIMITED_PORT, ..new_flow_tuple(family) };
            let same = Tuple { sport: CLIENT_PORT + 4, ..new_flow_tuple(family) };
            let limited_same = Tuple { dport: VIP_TCP_LIMITED_PORT, ..same };
            let syn = |name, tuple, vary| -> anyhow::Result<Case> {
                let frame = frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, tuple, Segment::Syn)?;
                Ok(Case { name, family, frame, ingress: lb.client_if, vary, first_ack: false, expect: SYN_UNTRACKED })
            };
            let cases = [
                syn_case(&lb, family, SYN)?,
                syn("tcp_syn_limited", limited, vary_source(family))?,
                syn("tcp_syn_same_tuple", same, VARY_NONE)?,
                syn("tcp_syn_limited_same_tuple", limited_same, VARY_NONE)?,
            ];
            for case in &cases {
                measure(&mut wrapper, &mut lb, case, args.repeat, run)?;
            }
        }
    }
    Ok(())
}

/// Opens a TCP and a UDP flow of `family` through the program and returns
/// the cases that run on them.
fn tracked_flow_cases(lb: &mut Lb, family: Family) -> anyhow::Result<Vec<Case>> {
    let (client, vip) = (family.client(), family.vip());
    let tcp = Tuple { src: client, dst: vip, sport: CLIENT_PORT, dport: VIP_TCP_PORT };
    let backend = open_tcp_flow(lb, tcp)?;
    let reply = Tuple { src: backend, dst: client, sport: BACKEND_TCP_PORT, dport: CLIENT_PORT };
    let backend_mac =
        frames::backend_mac_of(family, backend).with_context(|| format!("{backend} is not a benchmark backend"))?;
    let udp = Tuple { src: client, dst: vip, sport: CLIENT_PORT + 1, dport: VIP_UDP_PORT };
    let udp_frame = frames::udp(CLIENT_MAC, GW_CLIENT_MAC, udp)?;
    let before = Counts::read(lb)?;
    open_flow(lb, &udp_frame, lb.client_if)?;
    ensure_inserted(lb, &before, "a UDP flow's first datagram")?;
    // To a backend's address, but not its service port: not ours.
    let not_vip = Tuple { src: client, dst: family.not_a_vip(), sport: CLIENT_PORT + 2, dport: 22 };
    // To a backend's service directly, not through a VIP: a direct flow,
    // tracked. Not the tracked flow's backend: for a while after a direct
    // flow, a backend's replies take the pipeline, not the fast path.
    let other_backend =
        (1..=frames::BACKENDS).map(|i| family.backend(i)).find(|&a| a != backend).context("a second backend")?;
    let direct = Tuple { src: client, dst: other_backend, sport: CLIENT_PORT + 2, dport: BACKEND_TCP_PORT };
    let other = Tuple { src: client, dst: family.other_host(), sport: CLIENT_PORT + 2, dport: BACKEND_TCP_PORT };
    // A SYN of one 5-tuple over and over: the SYN path with its map lines
    // in cache, beside `tcp_syn_untracked`'s new 5-tuple per iteration.
    let syn_again = Tuple { src: client, dst: vip, sport: CLIENT_PORT + 4, dport: VIP_TCP_PORT };
    let case =
        |name, frame, ingress, expect| Case { name, family, frame, ingress, vary: VARY_NONE, first_ack: false, expect };
    Ok(vec![
        case("tcp_established", frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, tcp, Segment::Data)?, lb.client_if, TO_BACKEND),
        case("tcp_reply", frames::tcp(backend_mac, GW_BACKEND_MAC, reply, Segment::Data)?, lb.backend_if, TO_CLIENT),
        case("udp_tracked", udp_frame, lb.client_if, TO_BACKEND),
        case("not_vip_pass", frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, not_vip, Segment::Data)?, lb.client_if, PASSED),
        case("direct_flow_pass", frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, direct, Segment::Data)?, lb.client_if, DIRECT),
        case("other_host_pass", frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, other, Segment::Data)?, lb.client_if, PASSED),
        case(
            "tcp_syn_same_tuple",
            frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, syn_again, Segment::Syn)?,
            lb.client_if,
            SYN_UNTRACKED,
        ),
    ])
}

/// A SYN to the TCP VIP whose source the wrapper varies per iteration:
/// forwarded untracked.
fn syn_case(lb: &Lb, family: Family, name: &'static str) -> anyhow::Result<Case> {
    let frame = frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, new_flow_tuple(family), Segment::Syn)?;
    Ok(Case {
        name,
        family,
        frame,
        ingress: lb.client_if,
        vary: vary_source(family),
        first_ack: false,
        expect: SYN_UNTRACKED,
    })
}

/// The handshake's ACK to the TCP VIP whose source the wrapper varies per
/// iteration, after seeding that flow's SYN: the flow enters the table.
fn first_ack_case(lb: &Lb, family: Family, name: &'static str) -> anyhow::Result<Case> {
    let frame = frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, new_flow_tuple(family), Segment::Ack)?;
    Ok(Case {
        name,
        family,
        frame,
        ingress: lb.client_if,
        vary: vary_source(family),
        first_ack: true,
        expect: FIRST_ACK,
    })
}

/// The new-flow cases' tuple, before the wrapper varies its source.
fn new_flow_tuple(family: Family) -> Tuple {
    Tuple { src: family.client(), dst: family.vip(), sport: CLIENT_PORT + 3, dport: VIP_TCP_PORT }
}

fn vary_source(family: Family) -> u32 {
    match family {
        Family::V4 => VARY_V4_SOURCE,
        Family::V6 => VARY_V6_SOURCE,
    }
}

/// Opens a tracked TCP flow as a client does: its SYN (forwarded, not
/// inserted), then its first ACK (inserted). Returns its backend.
fn open_tcp_flow(lb: &mut Lb, tcp: Tuple) -> anyhow::Result<IpAddr> {
    let before = Counts::read(lb)?;
    let backend = open_flow(lb, &frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, tcp, Segment::Syn)?, lb.client_if)?;
    ensure!(Counts::read(lb)?.inserted == before.inserted, "a SYN inserted a flow into the connection table");
    let acked = open_flow(lb, &frames::tcp(CLIENT_MAC, GW_CLIENT_MAC, tcp, Segment::Ack)?, lb.client_if)?;
    ensure!(acked == backend, "the first ACK went to {acked}, its SYN to {backend}");
    ensure_inserted(lb, &before, "a TCP flow's first ACK")?;
    Ok(backend)
}

/// Fails unless exactly one flow was inserted since `before`.
fn ensure_inserted(lb: &Lb, before: &Counts, what: &str) -> anyhow::Result<()> {
    let inserted = Counts::read(lb)?.inserted - before.inserted;
    ensure!(inserted == 1, "{what} made {inserted} connection-table inserts, expected 1");
    Ok(())
}

/// Sends a flow's first packet through the program and returns the backend
/// it was sent to (the rewritten destination).
fn open_flow(lb: &mut Lb, frame: &[u8], ingress: u32) -> anyhow::Result<IpAddr> {
    let (verdict, out) = lb.run_once(frame, ingress)?;
    ensure!(verdict == XDP_REDIRECT, "a flow's first packet got verdict {verdict}, not XDP_REDIRECT");
    let sliced = SlicedPacket::from_ethernet(&out).context("the rewritten frame does not parse")?;
    match sliced.net {
        Some(NetSlice::Ipv4(ip)) => Ok(ip.header().destination_addr().into()),
        Some(NetSlice::Ipv6(ip)) => Ok(ip.header().destination_addr().into()),
        _ => anyhow::bail!("the rewritten frame is not IP"),
    }
}

/// The three test runs of one run of `case`, checked and emitted.
fn measure(wrapper: &mut Wrapper, lb: &mut Lb, case: &Case, repeat: u32, run: u32) -> anyhow::Result<()> {
    let what = format!("{} {} run {run}", case.family.name(), case.name);
    wrapper.set_frame(&case.frame, case.vary, case.first_ack)?;
    let floor = wrapper.run_floor(&case.frame, case.ingress, repeat).with_context(|| what.clone())?;
    expect_verdict("the verdict-only program", floor, XDP_PASS)?;
    wrapper.target_floor()?;
    let bare = wrapper.run_wrapped(&case.frame, case.ingress, repeat).with_context(|| what.clone())?;
    expect_verdict("the wrapper alone", bare, XDP_PASS)?;
    wrapper.target_lb(lb)?;
    let before = Counts::read(lb)?;
    let wrapped = wrapper.run_wrapped(&case.frame, case.ingress, repeat).with_context(|| what.clone())?;
    expect_verdict("lb_xdp in the wrapper", wrapped, case.expect.action).with_context(|| what.clone())?;
    Counts::read(lb)?.check_path(&before, case.expect, repeat).with_context(|| what.clone())?;
    let (plain, plain_path) = run_plain(lb, case, repeat).with_context(|| what.clone())?;
    eprintln!("lb-bench: {what}: floor {} ns, wrapper {} ns, wrapped {} ns", floor.ns, bare.ns, wrapped.ns);
    emit(&json!({
        "kind": "packet",
        "case": case.name,
        "family": case.family.name(),
        "run": run,
        "repeat": repeat,
        "frame_bytes": case.frame.len(),
        "floor_ns": floor.ns,
        "wrapper_ns": bare.ns,
        "wrapped_ns": wrapped.ns,
        "plain_ns": plain.ns,
        "plain_path": plain_path,
    }));
    Ok(())
}

/// lb_xdp run directly with plain `repeat`, the method the wrapper
/// replaces, and the paths its iterations took (verdict reason → count).
/// For a frame the program passes untouched it is valid, and checks the
/// wrapper's subtraction; for a frame it rewrites it shows the trap: after
/// the first iteration the rewritten frame takes another path, often as a
/// direct flow to a backend, whose mark (`DIRECT_SEEN`) is wiped after, so
/// later cases on the same program are measured as without it.
fn run_plain(
    lb: &mut Lb,
    case: &Case,
    repeat: u32,
) -> anyhow::Result<(Sample, serde_json::Map<String, serde_json::Value>)> {
    let before = Counts::read(lb)?;
    let plain = lb.run_repeated(&case.frame, case.ingress, repeat)?;
    let after = Counts::read(lb)?;
    lb.forget_direct_flows()?;
    let path = reason::NAMES
        .iter()
        .zip(after.verdicts.iter().zip(&before.verdicts))
        .filter(|(_, (now, then))| now != then)
        .map(|(name, (now, then))| ((*name).to_owned(), json!(now - then)))
        .collect();
    Ok((plain, path))
}

fn expect_verdict(what: &str, sample: Sample, want: u32) -> anyhow::Result<()> {
    ensure!(
        sample.verdict == want,
        "{what} returned verdict {} instead of {want} (0, XDP_ABORTED, means the wrapper failed to restore or tail-call)",
        sample.verdict
    );
    Ok(())
}

/// The program's counters that tell which path the iterations took.
struct Counts {
    verdicts: [u64; reason::COUNT as usize],
    inserted: u64,
}

impl Counts {
    fn read(lb: &Lb) -> anyhow::Result<Self> {
        let verdicts = lb.maps.verdicts()?;
        let inserted = lb.maps.conntrack_events()?[conntrack_event::INSERTED as usize];
        Ok(Self { verdicts, inserted })
    }

    /// Fails unless exactly `repeat` iterations were counted, all under
    /// `expect.reason`, with one insert each for new flows and none otherwise.
    fn check_path(&self, before: &Self, expect: Expect, repeat: u32) -> anyhow::Result<()> {
        let repeat = u64::from(repeat);
        for (i, (now, then)) in self.verdicts.iter().zip(&before.verdicts).enumerate() {
            let want = if i == expect.reason as usize { repeat } else { 0 };
            let name = reason::NAMES.get(i).copied().unwrap_or("?");
            ensure!(now - then == want, "verdict {name} counted {} times, expected {want}", now - then);
        }
        let inserts = self.inserted - before.inserted;
        let want = if expect.new_flow { repeat } else { 0 };
        ensure!(
            inserts == want,
            "{inserts} connection-table inserts, expected {want}: not every iteration took the case's path"
        );
        Ok(())
    }
}

/// Sizes of the programs as loaded: what the kernel runs.
fn emit_program(lb: &mut Lb, wrapper: &mut Wrapper) -> anyhow::Result<()> {
    let info = lb.program.xdp()?.info()?;
    emit(&json!({
        "kind": "program",
        "name": "lb_xdp",
        "jited_bytes": info.size_jitted(),
        "xlated_insns": info.size_translated().unwrap_or(0) / 8,
    }));
    for (name, bytes) in wrapper.jited_sizes()? {
        emit(&json!({ "kind": "program", "name": name, "jited_bytes": bytes }));
    }
    Ok(())
}

/// Counts the connection table and emits it.
fn emit_table(lb: &mut Lb, case: &str, family: Family, when: &str, capacity: u32) -> anyhow::Result<()> {
    let conntrack = lb.table_entries()?;
    emit(&json!({
        "kind": "table",
        "case": case,
        "family": family.name(),
        "when": when,
        "capacity": capacity,
        "conntrack": conntrack,
    }));
    Ok(())
}
