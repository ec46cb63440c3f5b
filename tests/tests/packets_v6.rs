//! IPv6 packet fixtures through BPF_PROG_TEST_RUN: the extension-header-free
//! fast path (TCP and UDP to an IPv6 VIP, replies translated back), and the
//! rules for what it does not balance (extension headers, hop limit 1,
//! traffic to other addresses).
//!
//! Like `packets.rs`, each test runs in a private network namespace with a
//! veth pair, routes and permanent neighbour entries, so `bpf_fib_lookup`
//! (AF_INET6) answers as on a real gateway: client side 2001:db8:1::/64
//! (`lbp-c`), backend side 2001:db8:2::/64 (`lbp-b`), VIP 2001:db8::100.
//! Expected frames are built independently with etherparse.
//!
//! Needs root (run by `cargo xtask test`).

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb::{
    dataplane::{LoadOptions, Maps, Program},
    lb::dataplane::Dataplane as _,
};
use lb_common::{
    FAMILY_V6, PROTO_TCP, PROTO_UDP,
    backend::{BACKEND_STATE_UP, BackendInfo},
    flow::{FlowKey, flow_hash},
    stats::reason,
    vip::{VipInfo, VipKey, ring_base},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const RING: u32 = 13;
const GW_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const GW_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const CLIENT: [u8; 16] = addr(1, 0x2);
const VIP: [u8; 16] = addr(0, 0x100);
const VIP_TCP_PORT: u16 = 80;
const VIP_UDP_PORT: u16 = 5353;

/// 2001:db8:`net`::`host`.
const fn addr(net: u8, host: u16) -> [u8; 16] {
    let h = host.to_be_bytes();
    [0x20, 0x01, 0x0d, 0xb8, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, h[0], h[1]]
}

fn backend_mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x02, last]
}

/// Backends: ids 1..=3 serve the TCP VIP on 8080, ids 4..=6 the UDP VIP on
/// 5353; addresses 2001:db8:2::11..=13 (hex), each with a neighbour entry.
fn backend_addr(id: u32) -> ([u8; 16], u16) {
    let host = 0x10 + ((id - 1) % 3 + 1) as u16;
    let port = if id <= 3 { 8080 } else { 5353 };
    (addr(2, host), port)
}

fn words(a: [u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, chunk) in a.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes(chunk.try_into().expect("4 bytes"));
    }
    w
}

// ---------------------------------------------------------------- harness

struct Netns(String);

impl Netns {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("lbpkt6{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        let n = ns.0.as_str();
        sh(&["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        sh(&["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        sh(&["ip", "-n", n, "link", "add", "lbp-c", "type", "veth", "peer", "name", "lbp-b"]);
        sh(&["ip", "-n", n, "link", "set", "lbp-c", "address", &mac_str(GW_CLIENT_MAC)]);
        sh(&["ip", "-n", n, "link", "set", "lbp-b", "address", &mac_str(GW_BACKEND_MAC)]);
        for dev in ["lo", "lbp-c", "lbp-b"] {
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
        }
        sh(&["ip", "-n", n, "-6", "addr", "add", "2001:db8:1::1/64", "dev", "lbp-c", "nodad"]);
        sh(&["ip", "-n", n, "-6", "addr", "add", "2001:db8:2::1/64", "dev", "lbp-b", "nodad"]);
        sh(&["ip", "-n", n, "-6", "neigh", "add", "2001:db8:1::2", "lladdr", &mac_str(CLIENT_MAC), "dev", "lbp-c", "nud", "permanent"]);
        for host in 0x11..=0x13u8 {
            let a = format!("2001:db8:2::{host:x}");
            sh(&["ip", "-n", n, "-6", "neigh", "add", &a, "lladdr", &mac_str(backend_mac(host)), "dev", "lbp-b", "nud", "permanent"]);
        }
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

/// The loaded program with two IPv6 VIPs and six IPv6 backends installed.
struct Lb {
    program: Program,
    maps: Maps,
    client_if: u32,
    backend_if: u32,
    ring: [u32; RING as usize],
}

fn vip_key(port: u16, proto: u8) -> VipKey {
    VipKey { addr_be: words(VIP), port_be: port.to_be(), proto, family: FAMILY_V6 }
}

impl Lb {
    fn new() -> Self {
        let mut program = Program::load(&LoadOptions { ring_size: RING, max_vips: 2, conntrack_capacity: 1024 })
            .unwrap_or_else(|e| panic!("load: {e:?}"));
        let mut maps = program.maps().expect("maps");
        for id in 1..=6 {
            let (a, port) = backend_addr(id);
            maps.set_backend(id, BackendInfo { addr_be: words(a), port_be: port.to_be(), family: FAMILY_V6, state: BACKEND_STATE_UP })
                .expect("backend");
        }
        let mut lb = Lb { program, maps, client_if: ifindex("lbp-c"), backend_if: ifindex("lbp-b"), ring: [0; RING as usize] };
        lb.set_ring(1, 0, [1, 2, 3]);
        lb.set_ring(2, 0, [4, 5, 6]);
        lb
    }

    fn set_ring(&mut self, vip_id: u32, generation: u32, ids: impl AsRef<[u32]>) {
        let ids = ids.as_ref();
        let base = ring_base(vip_id, generation, RING);
        let mut slots = Vec::new();
        for i in 0..RING {
            let id = ids[i as usize % ids.len()];
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

    /// Runs one frame; returns its action, output and the one verdict
    /// reason whose counter moved (fails unless exactly one moved, by one).
    fn run_counted(&mut self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>, &'static str) {
        let before = self.maps.verdicts().expect("verdicts");
        let (action, out) = self.run(frame, ingress);
        let after = self.maps.verdicts().expect("verdicts");
        let moved: Vec<(&str, u64)> = reason::NAMES
            .iter()
            .zip(before.iter().zip(after))
            .filter(|(_, (b, a))| *b != a)
            .map(|(name, (b, a))| (*name, a - b))
            .collect();
        assert!(moved.len() == 1 && moved[0].1 == 1, "expected one verdict counted once, got {moved:?}");
        (action, out, moved[0].0)
    }

    /// The frame is redirected, counted as `expected_reason`.
    #[track_caller]
    fn assert_redirected(&mut self, frame: &[u8], ingress: u32, expected_reason: u32) -> Vec<u8> {
        let (action, out, counted) = self.run_counted(frame, ingress);
        assert_eq!((action, counted), (XDP_REDIRECT, reason::NAMES[expected_reason as usize]));
        out
    }

    /// The frame is handed to the kernel byte for byte, counted as `reason`.
    #[track_caller]
    fn assert_passed_untouched(&mut self, name: &str, frame: &[u8], expected_reason: u32) {
        let (action, out, counted) = self.run_counted(frame, self.client_if);
        assert_eq!((action, counted), (XDP_PASS, reason::NAMES[expected_reason as usize]), "{name}");
        assert!(out == frame, "{name}: frame changed\n  out: {}\n  in:  {}", hex(&out), hex(frame));
    }

    /// The backend the ring assigns a client → TCP VIP flow.
    fn expected_backend(&self, sport: u16) -> u32 {
        self.ring[(flow_hash(&flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP)) % RING) as usize]
    }
}

fn flow(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_be: words(src),
        dst_be: words(dst),
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto,
        family: FAMILY_V6,
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

#[derive(Clone, Copy)]
struct Tcp {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    hop_limit: u8,
    sport: u16,
    dport: u16,
    syn: bool,
    payload: &'static [u8],
}

impl Tcp {
    fn client_to_vip(sport: u16) -> Self {
        Tcp { src_mac: CLIENT_MAC, dst_mac: GW_CLIENT_MAC, src: CLIENT, dst: VIP, hop_limit: 64, sport, dport: VIP_TCP_PORT, syn: true, payload: b"" }
    }

    fn build(&self) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac)
            .ipv6(self.src, self.dst, self.hop_limit)
            .tcp(self.sport, self.dport, 1000, 64240);
        let b = if self.syn { b.syn() } else { b.ack(2000).psh() };
        let mut out = Vec::new();
        b.write(&mut out, self.payload).expect("build tcp");
        out
    }
}

#[expect(clippy::too_many_arguments, reason = "a frame's fields, in wire order")]
fn udp(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 16], dst: [u8; 16], hop_limit: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, hop_limit)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("build udp");
    out
}

/// An ICMPv6 echo request.
fn ping(dst: [u8; 16]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GW_CLIENT_MAC)
        .ipv6(CLIENT, dst, 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut out, b"ping")
        .expect("build icmpv6");
    out
}

/// `frame` with an 8-byte hop-by-hop options header (one PadN option)
/// between the IPv6 header and its payload.
fn with_hop_by_hop(frame: &[u8]) -> Vec<u8> {
    let next = frame[14 + 6];
    let mut out = frame[..54].to_vec();
    out[14 + 6] = 0; // next header: hop-by-hop options
    let plen = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&plen.to_be_bytes());
    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&frame[54..]);
    out
}

/// Checks the TCP/UDP checksum from scratch over the IPv6 pseudo-header.
fn assert_checksums_valid(frame: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv6(ip)) = sliced.net else { panic!("output is not IPv6") };
    let header = ip.header().to_header();
    match sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let expected = tcp.to_header().calc_checksum_ipv6(&header, tcp.payload()).expect("tcp csum");
            assert_eq!(tcp.checksum(), expected, "TCP checksum");
        }
        Some(TransportSlice::Udp(udp)) => {
            let expected = udp.to_header().calc_checksum_ipv6(&header, udp.payload()).expect("udp csum");
            assert_eq!(udp.checksum(), expected, "UDP checksum");
        }
        other => panic!("unexpected transport {other:?}"),
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
fn ipv6_tcp_syn_to_vip_is_rewritten_to_its_maglev_backend() {
    with_lb(|lb| {
        let sport = 40000;
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let out = lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let expected = Tcp { src_mac: GW_BACKEND_MAC, dst_mac: backend_mac(baddr[15]), dst: baddr, dport: bport, hop_limit: 63, ..Tcp::client_to_vip(sport) };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        let state = lb.maps.flow(&flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP)).expect("flow tracked");
        assert_eq!((state.backend_id, state.vip_id), (id, 1));
        let nat = lb.maps.reply_nat(&flow(baddr, CLIENT, bport, sport, PROTO_TCP)).expect("reply tracked");
        assert_eq!((nat.vip_addr_be, nat.vip_port_be), (words(VIP), VIP_TCP_PORT.to_be()));
        let c = lb.maps.backend_counters(id).expect("counters");
        assert_eq!((c.packets, c.bytes, c.new_flows), (1, out.len() as u64, 1));
    });
}

#[test]
fn ipv6_established_flow_keeps_its_backend_when_the_ring_changes() {
    with_lb(|lb| {
        let sport = 40001;
        let first = lb.expected_backend(sport);
        lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let others: Vec<u32> = (1..=3).filter(|&i| i != first).collect();
        lb.set_ring(1, 1, &others);
        let data = Tcp { syn: false, payload: b"GET / HTTP/1.1\r\n\r\n", ..Tcp::client_to_vip(sport) };
        let out = lb.assert_redirected(&data.build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let (baddr, bport) = backend_addr(first);
        let expected = Tcp { src_mac: GW_BACKEND_MAC, dst_mac: backend_mac(baddr[15]), dst: baddr, dport: bport, hop_limit: 63, ..data };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        // A new flow avoids the removed backend.
        for sport in 41000..41020 {
            let out = lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
            assert_ne!(&out[38..54], &baddr, "new flow went to the removed backend");
        }
    });
}

#[test]
fn ipv6_reply_from_backend_leaves_with_the_vip_as_source() {
    with_lb(|lb| {
        let sport = 40002;
        lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let reply = Tcp { src_mac: backend_mac(baddr[15]), dst_mac: GW_BACKEND_MAC, src: baddr, dst: CLIENT, sport: bport, dport: sport, hop_limit: 64, syn: false, payload: b"HTTP/1.1 200 OK\r\n\r\n" };
        let out = lb.assert_redirected(&reply.build(), lb.backend_if, reason::REDIRECT_TO_CLIENT);
        let expected = Tcp { src_mac: GW_CLIENT_MAC, dst_mac: CLIENT_MAC, src: VIP, sport: VIP_TCP_PORT, hop_limit: 63, ..reply };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        assert_eq!(lb.maps.backend_counters(id).expect("counters").packets, 2);
    });
}

#[test]
fn ipv6_udp_is_rewritten_both_ways() {
    with_lb(|lb| {
        let sport = 50000;
        let req = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, sport, VIP_UDP_PORT, b"query");
        let out = lb.assert_redirected(&req, lb.client_if, reason::REDIRECT_TO_BACKEND);
        let state = lb.maps.flow(&flow(CLIENT, VIP, sport, VIP_UDP_PORT, PROTO_UDP)).expect("udp flow tracked");
        assert!((4..=6).contains(&state.backend_id));
        let (baddr, bport) = backend_addr(state.backend_id);
        assert_frame(&out, &udp(GW_BACKEND_MAC, backend_mac(baddr[15]), CLIENT, baddr, 63, sport, bport, b"query"));
        assert_checksums_valid(&out);

        let reply = udp(backend_mac(baddr[15]), GW_BACKEND_MAC, baddr, CLIENT, 64, bport, sport, b"answer");
        let out = lb.assert_redirected(&reply, lb.backend_if, reason::REDIRECT_TO_CLIENT);
        assert_frame(&out, &udp(GW_CLIENT_MAC, CLIENT_MAC, VIP, CLIENT, 63, VIP_UDP_PORT, sport, b"answer"));
        assert_checksums_valid(&out);
    });
}

#[test]
fn ipv6_non_vip_traffic_passes_untouched() {
    with_lb(|lb| {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("tcp to a backend address directly", Tcp { dst: addr(2, 0x11), dport: 8080, ..Tcp::client_to_vip(40003) }.build()),
            ("tcp to the VIP address on another port", Tcp { dport: 443, ..Tcp::client_to_vip(40004) }.build()),
            ("udp to the VIP's tcp port", udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, 5000, VIP_TCP_PORT, b"x")),
            ("icmpv6 echo to the VIP address", ping(VIP)),
            ("hop-by-hop header to another address", with_hop_by_hop(&Tcp { dst: addr(2, 0x11), ..Tcp::client_to_vip(40005) }.build())),
        ];
        for (name, frame) in &cases {
            lb.assert_passed_untouched(name, frame, reason::PASS_NOT_VIP);
        }
    });
}

#[test]
fn ipv6_extension_headers_to_a_vip_pass_untouched_with_their_counter() {
    with_lb(|lb| {
        let tcp = with_hop_by_hop(&Tcp::client_to_vip(40006).build());
        lb.assert_passed_untouched("hop-by-hop, then TCP", &tcp, reason::PASS_IPV6_EXT_HEADER);
        let udp = with_hop_by_hop(&udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, 50001, VIP_UDP_PORT, b"q"));
        lb.assert_passed_untouched("hop-by-hop, then UDP", &udp, reason::PASS_IPV6_EXT_HEADER);
        // A fragment header (44) is an extension header too.
        let mut frag = tcp.clone();
        frag[14 + 6] = 44;
        lb.assert_passed_untouched("fragment header", &frag, reason::PASS_IPV6_EXT_HEADER);
        assert!(lb.maps.flow(&flow(CLIENT, VIP, 40006, VIP_TCP_PORT, PROTO_TCP)).is_none(), "no flow pinned");
    });
}

#[test]
fn ipv6_hop_limit_and_malformed_headers_follow_their_rules() {
    with_lb(|lb| {
        for hop_limit in [0, 1] {
            let frame = Tcp { hop_limit, ..Tcp::client_to_vip(40007) }.build();
            lb.assert_passed_untouched("hop limit expiring", &frame, reason::PASS_TTL_EXPIRED);
        }
        let sport = 40008;
        let (baddr, bport) = backend_addr(lb.expected_backend(sport));
        lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let reply = Tcp { src_mac: backend_mac(baddr[15]), dst_mac: GW_BACKEND_MAC, src: baddr, dst: CLIENT, sport: bport, dport: sport, hop_limit: 1, syn: false, payload: b"" };
        let frame = reply.build();
        let (action, out, counted) = lb.run_counted(&frame, lb.backend_if);
        assert_eq!((action, counted), (XDP_PASS, "pass_ttl_expired"), "reply with hop limit 1");
        assert_frame(&out, &frame);

        let syn = Tcp::client_to_vip(40009).build();
        let mut truncated = syn.clone();
        truncated.truncate(syn.len() - 1);
        lb.assert_passed_untouched("payload beyond the frame", &truncated, reason::PASS_TRUNCATED_IP);
        let mut version = syn.clone();
        version[14] = 0x40;
        lb.assert_passed_untouched("version 4 in an IPv6 ethertype", &version, reason::PASS_MALFORMED_IP);
        lb.assert_passed_untouched("header cut off", &syn[..14 + 39], reason::PASS_MALFORMED_IP);
    });
}

/// `frame` with one 802.1Q tag (VLAN `vid`) after the MACs.
fn with_vlan_tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&0x8100u16.to_be_bytes());
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

#[test]
fn ipv6_vlan_tagged_frames_are_balanced_with_their_tag_kept() {
    with_lb(|lb| {
        let sport = 40010;
        let (baddr, bport) = backend_addr(lb.expected_backend(sport));
        let syn = with_vlan_tag(&Tcp::client_to_vip(sport).build(), 42);
        let out = lb.assert_redirected(&syn, lb.client_if, reason::REDIRECT_TO_BACKEND);
        let expected = Tcp { src_mac: GW_BACKEND_MAC, dst_mac: backend_mac(baddr[15]), dst: baddr, dport: bport, hop_limit: 63, ..Tcp::client_to_vip(sport) };
        assert_frame(&out, &with_vlan_tag(&expected.build(), 42));
        let expired = with_vlan_tag(&Tcp { hop_limit: 1, ..Tcp::client_to_vip(sport) }.build(), 42);
        lb.assert_passed_untouched("tagged, hop limit 1", &expired, reason::PASS_TTL_EXPIRED);
    });
}
