//! `pps`: packets per second the gateway forwards, lb against nftables,
//! with a generator that outruns it.
//!
//! The generator ([`super::livegen`]) runs in the client namespace, one
//! thread per core, each pinned, and transmits 60-byte UDP frames to the VIP
//! (port 5353, 64 flows) out of the client's veth toward the gateway. Both
//! balancers map the VIP to port 9 of the 3 backends, where nothing listens:
//! the backends' kernels drop the datagrams after counting them (port
//! unreachable answers are rate limited to a trickle), so no echo server
//! and no reply traffic take cycles from the gateway. Counted, before and
//! after: the frames the generator sent, the gateway's client-side veth's rx
//! (what reached the gateway), lb's `redirect_to_backend` verdicts (what the
//! gateway decided) or, for nftables, the backend-side veth's tx, and the
//! backends' veths' rx (what arrived).
//!
//! Both setups get the same veth settings: GRO on on the gateway's
//! client-side veth, which gives it the NAPI context frames redirected into a
//! veth need when no XDP program is attached (nftables); with lb's program
//! attached it has one anyway.

use std::{
    fmt::Write as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_tests::{
    Testbed,
    agent::{ADMIN, Agent},
    testbed::{BACKEND_HTTP_PORT, CLIENT_ADDR, VIP, VIP_UDP_PORT},
};

use super::{
    Report,
    baselines::{self, Balancer, Params},
    harness::{self, LinkCounters, Summary, table},
    livegen::{self, Generator},
};

/// Backends behind the VIP.
const BACKENDS: usize = 3;
/// The backends' port the VIP maps to: the discard port, where nothing listens.
const SINK_PORT: u16 = 9;
/// The lb VIP's name in the generated config.
const SINK_VIP: &str = "sink";
/// Frames of the balance check before each measurement.
const CHECK_FRAMES: u64 = 2_000;

#[derive(Debug, Clone, Copy)]
struct Plan {
    runs: usize,
    /// Frames per generator thread, the count bound.
    frames_per_thread: u64,
    /// The time bound on generating.
    max_time: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan { runs: 1, frames_per_thread: 2_000_000, max_time: Duration::from_secs(1) }
        } else {
            Plan { runs: 3, frames_per_thread: 40_000_000, max_time: Duration::from_secs(5) }
        }
    }
}

/// Counters of one measurement, deltas over the generating window.
#[derive(Debug, Clone)]
struct Sample {
    balancer: Balancer,
    seconds: f64,
    offered: u64,
    at_gateway: u64,
    gateway_counted: u64,
    /// Frames the gateway's backend-side veth could not hand to the switch.
    dropped_to_switch: u64,
    at_backends: u64,
    backends_hit: usize,
}

impl Sample {
    fn mpps(&self, packets: u64) -> f64 {
        packets as f64 / self.seconds / 1e6
    }
}

/// The `pps` section.
pub fn run(quick: bool) -> anyhow::Result<Report> {
    let plan = Plan::new(quick);
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let load_before = harness::load_average();
    let mut samples = Vec::new();
    for round in 0..plan.runs {
        for balancer in [Balancer::Lb, Balancer::Nftables] {
            println!("bench pps: round {}/{}, {}", round + 1, plan.runs, balancer.name());
            let sample = measure(balancer, threads, plan)
                .with_context(|| format!("pps: {}, round {}", balancer.name(), round + 1))?;
            println!(
                "  offered {:.2} Mpps, at gateway {:.2}, counted {:.2}, at backends {:.2} Mpps",
                sample.mpps(sample.offered),
                sample.mpps(sample.at_gateway),
                sample.mpps(sample.gateway_counted),
                sample.mpps(sample.at_backends)
            );
            samples.push(sample);
        }
    }
    let load = format!(
        "{load_before} before the section ({} after it, which counts its own threads too)",
        harness::load_average()
    );
    Ok(Report { title: "Packets per second".to_owned(), body: body(plan, threads, &samples, &load) })
}

/// Where the frames go and what counts them, for one testbed.
struct Path<'t> {
    testbed: &'t Testbed,
    ifindex: u32,
    frame: Vec<u8>,
}

impl Path<'_> {
    fn counters(&self, agent: Option<&Agent>) -> anyhow::Result<Counters> {
        let t = self.testbed;
        let backends = (1..=t.backend_count())
            .map(|i| LinkCounters::read(t.backend_ns(i), t.backend_if(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Counters {
            gateway_in: LinkCounters::read(t.gateway(), t.gateway_client_if())?,
            gateway_out: LinkCounters::read(t.gateway(), t.gateway_backend_if())?,
            backends,
            redirected: agent.map(redirected_to_backends).transpose()?,
        })
    }
}

#[derive(Debug, Clone)]
struct Counters {
    gateway_in: LinkCounters,
    gateway_out: LinkCounters,
    backends: Vec<LinkCounters>,
    redirected: Option<u64>,
}

fn measure(balancer: Balancer, threads: usize, plan: Plan) -> anyhow::Result<Sample> {
    let testbed = harness::testbed(BACKENDS)?;
    testbed.gateway().exec_ok(&["ethtool", "-K", testbed.gateway_client_if(), "gro", "on"])?;
    let params = Params { lb_config: sink_config(&testbed), lb_vip: SINK_VIP.to_owned(), udp_backend_port: SINK_PORT };
    let running = baselines::start(balancer, &testbed, &params)?;
    let path = path(&testbed)?;
    let generator = &Generator::load(&path.frame)?;
    check_balances(generator, &path, running.agent())?;

    let before = path.counters(running.agent())?;
    let started = Instant::now();
    let deadline = started + plan.max_time;
    let offered = generate(generator, &path, threads, plan.frames_per_thread, deadline)?;
    let seconds = started.elapsed().as_secs_f64();
    thread::sleep(livegen::DRAIN);
    let after = path.counters(running.agent())?;

    let at_backends: Vec<u64> =
        after.backends.iter().zip(&before.backends).map(|(a, b)| a.since(*b).rx_packets).collect();
    let gateway_counted = match (after.redirected, before.redirected) {
        (Some(a), Some(b)) => a - b,
        _ => after.gateway_out.since(before.gateway_out).tx_packets,
    };
    Ok(Sample {
        balancer,
        seconds,
        offered,
        at_gateway: after.gateway_in.since(before.gateway_in).rx_packets,
        gateway_counted,
        dropped_to_switch: after.gateway_out.since(before.gateway_out).tx_dropped,
        at_backends: at_backends.iter().sum(),
        backends_hit: at_backends.iter().filter(|&&n| n > 0).count(),
    })
}

/// The client veth's index and a frame from it to the gateway's MAC.
fn path(testbed: &Testbed) -> anyhow::Result<Path<'_>> {
    let client = harness::link_json(testbed.client(), testbed.client_if(), false)?;
    let gateway = harness::link_json(testbed.gateway(), testbed.gateway_client_if(), false)?;
    let ifindex =
        client["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok()).context("client veth has no ifindex")?;
    let frame = livegen::udp_frame(mac(&client)?, mac(&gateway)?, CLIENT_ADDR, VIP, VIP_UDP_PORT);
    Ok(Path { testbed, ifindex, frame })
}

fn mac(link: &serde_json::Value) -> anyhow::Result<[u8; 6]> {
    let text = link["address"].as_str().context("link has no address")?;
    let bytes: Vec<u8> = text.split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
    bytes.try_into().map_err(|_| anyhow::anyhow!("not a MAC address: {text}"))
}

/// A short burst; at least two backends must receive some of it.
fn check_balances(generator: &Generator, path: &Path<'_>, agent: Option<&Agent>) -> anyhow::Result<()> {
    let before = path.counters(agent)?;
    generate(generator, path, 1, CHECK_FRAMES, Instant::now() + Duration::from_secs(2))?;
    thread::sleep(livegen::DRAIN);
    let after = path.counters(agent)?;
    let hit: Vec<u64> = after.backends.iter().zip(&before.backends).map(|(a, b)| a.since(*b).rx_packets).collect();
    ensure!(
        hit.iter().filter(|&&n| n > 0).count() >= 2,
        "{CHECK_FRAMES} frames did not spread over the backends: {hit:?}"
    );
    Ok(())
}

/// `threads` generator threads in the client namespace, one pinned to each
/// core, `frames` each or until `deadline`; returns the frames sent.
fn generate(
    generator: &Generator,
    path: &Path<'_>,
    threads: usize,
    frames: u64,
    deadline: Instant,
) -> anyhow::Result<u64> {
    let client = path.testbed.client();
    let results: Vec<anyhow::Result<u64>> = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|cpu| {
                s.spawn(move || -> anyhow::Result<u64> {
                    client.enter(|| {
                        livegen::pin_to_cpu(cpu)?;
                        generator.send(path.ifindex, &path.frame, frames, deadline)
                    })?
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a generator thread panicked"))))
            .collect()
    });
    results.into_iter().sum()
}

/// `redirect_to_backend` verdicts so far.
fn redirected_to_backends(agent: &Agent) -> anyhow::Result<u64> {
    let status = agent.status()?;
    status["verdicts"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["reason"] == "redirect_to_backend"))
        .and_then(|v| v["packets"].as_u64())
        .with_context(|| format!("no redirect_to_backend verdict in {status}"))
}

/// lb's config: a UDP VIP over the backends' discard port, health-checked over HTTP.
fn sink_config(testbed: &Testbed) -> String {
    let mut toml = format!(
        "[agent]\ninterfaces = [\"{}\", \"{}\"]\nadmin_listen = \"{ADMIN}\"\nxdp_mode = \"native\"\n\n\
         [[vip]]\nname = \"{SINK_VIP}\"\nlisten = \"{}\"\nprotocol = \"udp\"\n\n\
         [vip.health_check]\ntype = \"http\"\npath = \"/health\"\nport = {BACKEND_HTTP_PORT}\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\n",
        testbed.gateway_client_if(),
        testbed.gateway_backend_if(),
        testbed.vip_udp()
    );
    for i in 1..=testbed.backend_count() {
        let _ = writeln!(toml, "[[vip.backend]]\naddress = \"{}:{SINK_PORT}\"\n", testbed.backend_addr(i));
    }
    toml
}

// ------------------------------------------------------------------ report

fn body(plan: Plan, threads: usize, samples: &[Sample], load: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", harness::command_line());
    let _ = writeln!(
        out,
        "Generator: BPF_PROG_TEST_RUN in live-frame mode of a 26-instruction XDP program that rewrites the headers and returns XDP_TX (`xtask/src/bench/livegen.rs`), \
         on the client's veth, {threads} thread(s) pinned one per core, {FRAME_LEN}-byte UDP frames to {VIP}:{VIP_UDP_PORT} from {} random source ports, \
         at most {} frames per thread or {} s. Median of {} round(s), min–max; Mpps over the generating time. \
         lb: `lb run` with a UDP VIP over the backends' port {SINK_PORT}; nftables: `nft -f bench/nftables.nft` (the same mapping). Load average (1, 5, 15 min) of the shared machine: {load}.\n",
        livegen::FLOWS,
        plan.frames_per_thread,
        plan.max_time.as_secs(),
        plan.runs,
        FRAME_LEN = livegen::FRAME_LEN,
    );
    let header = [
        "setup",
        "offered Mpps",
        "reached the gateway Mpps",
        "gateway counted Mpps",
        "dropped toward the switch Mpps",
        "arrived at backends Mpps",
        "backends hit",
    ];
    let rows: Vec<Vec<String>> = [Balancer::Lb, Balancer::Nftables]
        .iter()
        .map(|&b| {
            let runs: Vec<&Sample> = samples.iter().filter(|s| s.balancer == b).collect();
            let mpps =
                |f: fn(&Sample) -> u64| Summary::of(&runs.iter().map(|s| s.mpps(f(s))).collect::<Vec<_>>()).show(2);
            vec![
                b.name().to_owned(),
                mpps(|s| s.offered),
                mpps(|s| s.at_gateway),
                mpps(|s| s.gateway_counted),
                mpps(|s| s.dropped_to_switch),
                mpps(|s| s.at_backends),
                runs.iter().map(|s| s.backends_hit).min().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out.push_str(PPS_NOTES);
    out
}

const PPS_NOTES: &str = "
How to read it:
- *offered*: frames the generator transmitted. *reached the gateway*: rx of the gateway's client-side veth; the rest found its receive ring (256 frames) full and was dropped there, so the generator outran the gateway. *gateway counted*: lb's `redirect_to_backend` verdicts (`/status`), for nftables the tx of the gateway's backend-side veth: what the gateway forwarded. *dropped toward the switch*: the backend-side veth's tx drops, frames the switch's veth had no room for. *arrived at backends*: rx of the backends' veths, summed.
- *gateway counted* is the gateway's forwarding rate; *arrived at backends* is end to end and also depends on how fast the switch (bridge) and the backends' kernels take packets in, on the same cores. XDP hands the switch bare frames, so the switch's side allocates the socket buffers the kernel path had allocated on the gateway: when the gateway is fast, the switch becomes the limit and drops at its ring.
- Everything runs on the same 2 cores: the generator, the gateway, the bridge and the backends' kernels (receive up to the UDP lookup). The kernel runs the gateway's receive work (its veth's NAPI) on the core whose generator filled the ring, right after each batch, so the generator takes cycles the gateway would have to itself on another host, and the gateway's veth has one receive queue, so its work is serialised on one core at a time. The figures are lower bounds for one core shared with a generator; on separate hosts with multi-queue NICs the gateway would spread flows over all its cores, and the gap between XDP (no socket buffer, no conntrack on the gateway) and the kernel path would remain.
- Another user's work on the shared cores takes cycles from the generator and the gateway alike; the min–max spread shows how much it varied.
";
