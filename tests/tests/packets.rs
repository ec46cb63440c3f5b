//! Packet fixtures through BPF_PROG_TEST_RUN: the real program, through the
//! real verifier, on hand-built frames, with exact expected output bytes.
//!
//! Each test runs in a private network namespace holding a veth pair with
//! routes and permanent neighbour entries, so `bpf_fib_lookup` answers as on
//! a real gateway: client side 198.18.1.0/24 (`lbp-c`), backend side
//! 198.18.2.0/24 (`lbp-b`). Expected frames are built independently with
//! etherparse, which computes every checksum from scratch; our program only
//! ever updates checksums incrementally, so byte equality checks both.
//!
//! Needs root (run by `cargo xtask test`).

use std::{

    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice, NetSlice};
use lb::{
    dataplane::{LoadOptions, Maps, Program},
    lb::dataplane::Dataplane as _,
};
use lb_common::{
    FAMILY_V4, PROTO_TCP, PROTO_UDP,
    backend::{BACKEND_STATE_DOWN, BACKEND_STATE_UP, BackendInfo},
    flow::{FlowKey, flow_hash},
    stats::reason,
    vip::{VipInfo, VipKey, ring_base},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const RING: u32 = 13;
const GW_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const GW_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const CLIENT: [u8; 4] = [198, 18, 1, 2];
const VIP: [u8; 4] = [198, 18, 0, 100];
const VIP_TCP_PORT: u16 = 80;
const VIP_UDP_PORT: u16 = 5353;

fn backend_mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x02, last]
}

/// Backends: ids 1..=3 serve the TCP VIP on 8080, ids 4..=6 the UDP VIP on
/// 5353; host part .11..=.13. Only .11..=.13 have neighbour entries.
fn backend_addr(id: u32) -> ([u8; 4], u16) {
    let host = 10 + ((id - 1) % 3 + 1) as u8;
    let port = if id <= 3 { 8080 } else { 5353 };
    ([198, 18, 2, host], port)
}

// ---------------------------------------------------------------- harness

struct Netns(String);

impl Netns {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("lbpkt{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        let n = ns.0.as_str();
        sh(&["ip", "-n", n, "link", "add", "lbp-c", "type", "veth", "peer", "name", "lbp-b"]);
        sh(&["ip", "-n", n, "link", "set", "lbp-c", "address", &mac_str(GW_CLIENT_MAC)]);
        sh(&["ip", "-n", n, "link", "set", "lbp-b", "address", &mac_str(GW_BACKEND_MAC)]);
        for dev in ["lo", "lbp-c", "lbp-b"] {
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
        }
        sh(&["ip", "-n", n, "addr", "add", "198.18.1.1/24", "dev", "lbp-c"]);
        sh(&["ip", "-n", n, "addr", "add", "198.18.2.1/24", "dev", "lbp-b"]);
        sh(&["ip", "-n", n, "neigh", "add", "198.18.1.2", "lladdr", &mac_str(CLIENT_MAC), "dev", "lbp-c", "nud", "permanent"]);
        for host in 11..=13u8 {
            let addr = format!("198.18.2.{host}");
            sh(&["ip", "-n", n, "neigh", "add", &addr, "lladdr", &mac_str(backend_mac(host)), "dev", "lbp-b", "nud", "permanent"]);
        }
        sh(&["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns
    }

    /// Runs `f` on a thread that has entered this namespace (setns is per thread).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
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

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: a valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}");
    idx
}

/// The loaded program with two VIPs and six backends installed.
struct Lb {
    program: Program,
    maps: Maps,
    client_if: u32,
    backend_if: u32,
    ring: [u32; RING as usize],
}

fn vip_key(port: u16, proto: u8) -> VipKey {
    VipKey { addr_be: [u32::from_ne_bytes(VIP), 0, 0, 0], port_be: port.to_be(), proto, family: FAMILY_V4 }
}

impl Lb {
    fn new() -> Self {
        let mut program = Program::load(&LoadOptions { ring_size: RING, max_vips: 2, conntrack_capacity: 1024 })
            .unwrap_or_else(|e| panic!("load: {e:?}"));
        let mut maps = program.maps().expect("maps");
        for id in 1..=6 {
            let (addr, port) = backend_addr(id);
            maps.set_backend(id, backend_info(addr, port, BACKEND_STATE_UP)).expect("backend");
        }
        let mut lb = Lb { program, maps, client_if: ifindex("lbp-c"), backend_if: ifindex("lbp-b"), ring: [0; RING as usize] };
        lb.set_ring(1, 0, [1, 2, 3]);
        lb.set_ring(2, 0, [4, 5, 6]);
        lb
    }

    /// Fills ring `generation` of `vip_id` round-robin with `ids` and
    /// publishes it.
    fn set_ring(&mut self, vip_id: u32, generation: u32, ids: impl AsRef<[u32]>) {
        let ids = ids.as_ref();
        let base = ring_base(vip_id, generation, RING);
        let mut slots = Vec::new();
        for i in 0..RING {
            let id = if ids.is_empty() { 0 } else { ids[i as usize % ids.len()] };
            slots.push((base + i, id));
            if vip_id == 1 {
                self.ring[i as usize] = id;
            }
        }
        self.maps.write_ring_slots(&slots).expect("ring");
        let (port, proto) = if vip_id == 1 { (VIP_TCP_PORT, PROTO_TCP) } else { (VIP_UDP_PORT, PROTO_UDP) };
        self.maps
            .upsert_vip(vip_key(port, proto), VipInfo { vip_id, ring_size: RING, ring_generation: generation, flags: 0 })
            .expect("vip");
    }

    fn run(&mut self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
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
        let result = self.program.xdp().expect("xdp").test_run(opts).unwrap_or_else(|e| panic!("test_run: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn verdict_count(&self, r: u32) -> u64 {
        self.maps.verdicts().expect("verdicts")[r as usize]
    }

    /// The backend the ring assigns a client → TCP VIP flow.
    fn expected_backend(&self, sport: u16) -> u32 {
        let key = flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP);
        self.ring[(flow_hash(&key) % RING) as usize]
    }
}

fn backend_info(addr: [u8; 4], port: u16, state: u8) -> BackendInfo {
    BackendInfo { addr_be: [u32::from_ne_bytes(addr), 0, 0, 0], port_be: port.to_be(), family: FAMILY_V4, state }
}

fn flow(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_be: [u32::from_ne_bytes(src), 0, 0, 0],
        dst_be: [u32::from_ne_bytes(dst), 0, 0, 0],
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// `struct xdp_md` for ctx_in: data offsets and the ingress device.
fn xdp_md(len: u32, ingress_ifindex: u32) -> [u8; 24] {
    let fields = [0u32, len, 0, ingress_ifindex, 0, 0];
    let mut out = [0u8; 24];
    for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    out
}

// ---------------------------------------------------------------- frames

struct Tcp {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
    syn: bool,
    payload: &'static [u8],
}

impl Tcp {
    fn client_to_vip(sport: u16) -> Self {
        Tcp { src_mac: CLIENT_MAC, dst_mac: GW_CLIENT_MAC, src: CLIENT, dst: VIP, ttl: 64, sport, dport: VIP_TCP_PORT, syn: true, payload: b"" }
    }

    fn build(&self) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac)
            .ipv4(self.src, self.dst, self.ttl)
            .tcp(self.sport, self.dport, 1000, 64240);
        let b = if self.syn { b.syn() } else { b.ack(2000).psh() };
        let mut out = Vec::new();
        b.write(&mut out, self.payload).expect("build tcp");
        out
    }
}

#[expect(clippy::too_many_arguments, reason = "a frame's fields, in wire order")]
fn udp(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], ttl: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, ttl)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("build udp");
    out
}

/// Checks IPv4 and L4 checksums from scratch: independent of the expected
/// bytes, so a failure says which checksum is wrong.
fn assert_checksums_valid(frame: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv4(ip)) = sliced.net else { panic!("output is not IPv4") };
    let header = ip.header().to_header();
    assert_eq!(header.header_checksum, header.calc_header_checksum(), "IPv4 header checksum");
    match sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let expected = tcp.to_header().calc_checksum_ipv4(&header, tcp.payload()).expect("tcp csum");
            assert_eq!(tcp.checksum(), expected, "TCP checksum");
        }
        Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
            let expected = udp.to_header().calc_checksum_ipv4(&header, udp.payload()).expect("udp csum");
            assert_eq!(udp.checksum(), expected, "UDP checksum");
        }
        _ => {}
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

#[track_caller]
fn assert_frame(actual: &[u8], expected: &[u8]) {
    assert!(actual == expected, "frame differs\n  actual:   {}\n  expected: {}", hex(actual), hex(expected));
}

fn with_lb(f: impl FnOnce(&mut Lb) + Send + 'static) {
    let ns = Netns::new();
    ns.run(move || {
        let mut lb = Lb::new();
        f(&mut lb);
    });
}

// ---------------------------------------------------------------- cases

#[test]
fn tcp_syn_to_vip_is_rewritten_to_its_maglev_backend() {
    with_lb(|lb| {
        let sport = 40000;
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let (verdict, out) = lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        assert_eq!(verdict, XDP_REDIRECT);
        let expected = Tcp { src_mac: GW_BACKEND_MAC, dst_mac: backend_mac(baddr[3]), dst: baddr, dport: bport, ttl: 63, ..Tcp::client_to_vip(sport) };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        let state = lb.maps.flow(&flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP)).expect("flow tracked");
        assert_eq!((state.backend_id, state.vip_id), (id, 1));
        let nat = lb.maps.reply_nat(&flow(baddr, CLIENT, bport, sport, PROTO_TCP)).expect("reply tracked");
        assert_eq!(nat.vip_port_be, VIP_TCP_PORT.to_be());
        assert_eq!(lb.verdict_count(reason::REDIRECT_TO_BACKEND), 1);
        let c = lb.maps.backend_counters(id).expect("counters");
        assert_eq!((c.packets, c.bytes, c.new_flows), (1, out.len() as u64, 1));
        assert_eq!(lb.maps.vip_counters(1).expect("vip counters").new_flows, 1);
    });
}

#[test]
fn established_flow_keeps_its_backend_when_the_ring_changes() {
    with_lb(|lb| {
        let sport = 40001;
        let first = lb.expected_backend(sport);
        let (v, _) = lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        assert_eq!(v, XDP_REDIRECT);
        // A new ring without the flow's backend, published in generation 1.
        let others: Vec<u32> = (1..=3).filter(|&i| i != first).collect();
        lb.set_ring(1, 1, &others);
        let data = Tcp { syn: false, payload: b"GET / HTTP/1.1\r\n\r\n", ..Tcp::client_to_vip(sport) };
        let (v, out) = lb.run(&data.build(), lb.client_if);
        assert_eq!(v, XDP_REDIRECT);
        let (baddr, bport) = backend_addr(first);
        let expected = Tcp { src_mac: GW_BACKEND_MAC, dst_mac: backend_mac(baddr[3]), dst: baddr, dport: bport, ttl: 63, ..data };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        // A new flow now avoids the removed backend.
        for sport in 41000..41020 {
            let (v, out) = lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
            assert_eq!(v, XDP_REDIRECT);
            assert_ne!(&out[30..34], &backend_addr(first).0, "new flow went to the removed backend");
        }
    });
}

#[test]
fn reply_from_backend_leaves_with_the_vip_as_source() {
    with_lb(|lb| {
        let sport = 40002;
        lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let reply = Tcp { src_mac: backend_mac(baddr[3]), dst_mac: GW_BACKEND_MAC, src: baddr, dst: CLIENT, sport: bport, dport: sport, ttl: 64, syn: false, payload: b"HTTP/1.1 200 OK\r\n\r\n" };
        let (v, out) = lb.run(&reply.build(), lb.backend_if);
        assert_eq!(v, XDP_REDIRECT);
        let expected = Tcp { src_mac: GW_CLIENT_MAC, dst_mac: CLIENT_MAC, src: VIP, sport: VIP_TCP_PORT, ttl: 63, ..reply };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        assert_eq!(lb.verdict_count(reason::REDIRECT_TO_CLIENT), 1);
        assert_eq!(lb.maps.backend_counters(id).expect("counters").packets, 2);
    });
}

#[test]
fn udp_with_and_without_checksum_is_rewritten_both_ways() {
    with_lb(|lb| {
        let sport = 50000;
        let req = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, sport, VIP_UDP_PORT, b"query");
        let (v, out) = lb.run(&req, lb.client_if);
        assert_eq!(v, XDP_REDIRECT);
        let state = lb.maps.flow(&flow(CLIENT, VIP, sport, VIP_UDP_PORT, PROTO_UDP)).expect("udp flow tracked");
        let (baddr, bport) = backend_addr(state.backend_id);
        assert!((4..=6).contains(&state.backend_id));
        assert_frame(&out, &udp(GW_BACKEND_MAC, backend_mac(baddr[3]), CLIENT, baddr, 63, sport, bport, b"query"));
        assert_checksums_valid(&out);

        // The same flow's next datagram, sent without a checksum: stays without one.
        let mut bare = req.clone();
        bare[40..42].copy_from_slice(&[0, 0]);
        let (v, out) = lb.run(&bare, lb.client_if);
        assert_eq!(v, XDP_REDIRECT);
        let mut expected = udp(GW_BACKEND_MAC, backend_mac(baddr[3]), CLIENT, baddr, 63, sport, bport, b"query");
        expected[40..42].copy_from_slice(&[0, 0]);
        assert_frame(&out, &expected);

        let reply = udp(backend_mac(baddr[3]), GW_BACKEND_MAC, baddr, CLIENT, 64, bport, sport, b"answer");
        let (v, out) = lb.run(&reply, lb.backend_if);
        assert_eq!(v, XDP_REDIRECT);
        assert_frame(&out, &udp(GW_CLIENT_MAC, CLIENT_MAC, VIP, CLIENT, 63, VIP_UDP_PORT, sport, b"answer"));
        assert_checksums_valid(&out);
    });
}

#[test]
fn non_vip_traffic_passes_untouched() {
    with_lb(|lb| {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("tcp to a backend address directly", Tcp { dst: [198, 18, 2, 11], dport: 8080, ..Tcp::client_to_vip(40003) }.build()),
            ("tcp to the VIP address on another port", Tcp { dport: 443, ..Tcp::client_to_vip(40004) }.build()),
            ("udp to the VIP's tcp port", udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, 5000, VIP_TCP_PORT, b"x")),
            ("health-check reply: backend to the gateway", Tcp { src: [198, 18, 2, 11], dst: [198, 18, 2, 1], sport: 8080, dport: 45000, syn: false, ..Tcp::client_to_vip(0) }.build()),
            ("arp", arp_request()),
        ];
        for (name, frame) in &cases {
            let (v, out) = lb.run(frame, lb.client_if);
            assert_eq!(v, XDP_PASS, "{name}");
            assert_frame(&out, frame);
        }
        assert_eq!(lb.verdict_count(reason::PASS_NOT_VIP), 4);
        assert_eq!(lb.verdict_count(reason::PASS_NOT_IPV4), 1);
    });
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[198, 18, 1, 1]);
    f
}

#[test]
fn flow_on_a_down_backend_is_rescheduled() {
    with_lb(|lb| {
        let sport = 40005;
        let first = lb.expected_backend(sport);
        lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        let (addr, port) = backend_addr(first);
        lb.maps.set_backend(first, backend_info(addr, port, BACKEND_STATE_DOWN)).expect("down");
        let others: Vec<u32> = (1..=3).filter(|&i| i != first).collect();
        lb.set_ring(1, 1, &others);
        let data = Tcp { syn: false, ..Tcp::client_to_vip(sport) };
        let (v, out) = lb.run(&data.build(), lb.client_if);
        assert_eq!(v, XDP_REDIRECT);
        let now = lb.maps.flow(&flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP)).expect("tracked").backend_id;
        assert_ne!(now, first);
        assert_eq!(&out[30..34], &backend_addr(now).0);
        assert_eq!(lb.maps.backend_counters(now).expect("c").rescheduled_flows, 1);
    });
}

#[test]
fn vip_with_no_backend_up_drops_and_counts() {
    with_lb(|lb| {
        lb.set_ring(1, 1, []);
        let (v, _) = lb.run(&Tcp::client_to_vip(40006).build(), lb.client_if);
        assert_eq!(v, XDP_DROP);
        assert_eq!(lb.verdict_count(reason::DROP_NO_BACKEND), 1);
    });
}

#[test]
fn malformed_and_expiring_packets_follow_their_rules() {
    with_lb(|lb| {
        let good = Tcp::client_to_vip(40007).build();

        let mut bad_doff = good.clone();
        bad_doff[46] = 0x40; // TCP data offset 4 words, below the minimum 5
        let (v, _) = lb.run(&bad_doff, lb.client_if);
        assert_eq!(v, XDP_DROP, "tcp data offset < 5 to a VIP");
        assert_eq!(lb.verdict_count(reason::DROP_MALFORMED_L4), 1);

        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x44;
        let (v, out) = lb.run(&bad_ihl, lb.client_if);
        assert_eq!(v, XDP_PASS, "ihl < 5");
        assert_frame(&out, &bad_ihl);

        let mut too_long = good.clone();
        too_long[16..18].copy_from_slice(&1400u16.to_be_bytes());
        let (v, out) = lb.run(&too_long, lb.client_if);
        assert_eq!(v, XDP_PASS, "ip total length beyond the frame");
        assert_frame(&out, &too_long);
        assert_eq!(lb.verdict_count(reason::PASS_MALFORMED_IP), 2);

        let truncated = &good[..14 + 20 + 2];
        let (v, out) = lb.run(truncated, lb.client_if);
        assert_eq!(v, XDP_PASS, "ports cut off");
        assert_frame(&out, truncated);

        let ttl1 = Tcp { ttl: 1, ..Tcp::client_to_vip(40008) }.build();
        let (v, out) = lb.run(&ttl1, lb.client_if);
        assert_eq!(v, XDP_PASS, "ttl 1");
        assert_frame(&out, &ttl1);
        assert_eq!(lb.verdict_count(reason::PASS_TTL_EXPIRED), 1);

        let mut fragment = good.clone();
        fragment[20] |= 0x20; // more fragments
        let (v, out) = lb.run(&fragment, lb.client_if);
        assert_eq!(v, XDP_PASS, "fragment");
        assert_frame(&out, &fragment);
        assert_eq!(lb.verdict_count(reason::PASS_FRAGMENT), 1);
    });
}

#[test]
fn ipv4_options_are_kept_and_skipped() {
    with_lb(|lb| {
        let sport = 40009;
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let input = with_ip_options(&Tcp::client_to_vip(sport).build());
        let (v, out) = lb.run(&input, lb.client_if);
        assert_eq!(v, XDP_REDIRECT);
        let expected = with_ip_options(&Tcp { src_mac: GW_BACKEND_MAC, dst_mac: backend_mac(baddr[3]), dst: baddr, dport: bport, ttl: 63, ..Tcp::client_to_vip(sport) }.build());
        assert_frame(&out, &expected);
        assert_checksums_valid(&out);
    });
}

/// Inserts 4 bytes of IPv4 options (NOP, NOP, NOP, EOL) and fixes the header.
fn with_ip_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x46;
    let tot = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    let (mut header, _) = etherparse::Ipv4Header::from_slice(&f[14..]).expect("ipv4 with options");
    header.header_checksum = header.calc_header_checksum();
    f[24..26].copy_from_slice(&header.header_checksum.to_be_bytes());
    f
}

#[test]
fn backend_without_neighbour_entry_goes_to_the_kernel_rewritten() {
    with_lb(|lb| {
        // Backend id 1 moved to .14, which has no neighbour entry yet.
        lb.maps.set_backend(1, backend_info([198, 18, 2, 14], 8080, BACKEND_STATE_UP)).expect("backend");
        lb.set_ring(1, 1, [1]);
        let sport = 40010;
        let (v, out) = lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        assert_eq!(v, XDP_PASS);
        // Addresses rewritten; MACs and TTL left for the kernel's forwarding.
        let expected = Tcp { dst: [198, 18, 2, 14], dport: 8080, ..Tcp::client_to_vip(sport) };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        assert_eq!(lb.verdict_count(reason::PASS_NO_NEIGH), 1);
    });
}
