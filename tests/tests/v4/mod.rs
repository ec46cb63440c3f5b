//! The IPv4 packet-fixture harness shared by `packets.rs` and
//! `packets_icmp.rs`: a private namespace whose routes and neighbours make
//! `bpf_fib_lookup` answer as on a real gateway, the loaded program with
//! two VIPs and six backends, frame builders and independent checksum
//! checks (etherparse computes every checksum from scratch).
#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use etherparse::{LaxSlicedPacket, NetSlice, PacketBuilder, SlicedPacket, TransportSlice, VlanSlice};
use lb::dataplane::{Dataplane as _, LoadOptions, Maps, Program};
#[path = "../common/fixture.rs"]
mod fixture;
#[allow(unused_imports, reason = "each test binary uses a different part of the harness")]
pub use fixture::{FixtureNs, assert_frame, hex, ifindex, mac_str, sh, test_run, test_run_counted, xdp_md};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    backend::{BACKEND_STATE_UP, BackendInfo},
    flow::{FlowKey, ReplyNat, flow_hash},
    guard::{ADDR_ROLE_BACKEND, ADDR_ROLE_LOCAL, ServiceKey},
    stats::reason,
    vip::{VipInfo, VipKey, ring_base},
    vip_addr::{VipAddrKey, proto_bit},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const RING: u32 = 13;
pub const GW_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const GW_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const CLIENT: [u8; 4] = [198, 18, 1, 2];
pub const VIP: [u8; 4] = [198, 18, 0, 100];
/// A client whose route has a 1280-byte MTU.
pub const NARROW_CLIENT: [u8; 4] = [198, 18, 1, 3];
pub const NARROW_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];
pub const NARROW_CLIENT_MTU: u16 = 1280;
/// Backend id 3 (198.18.2.13) sits behind a hop of this MTU.
pub const NARROW_BACKEND_MTU: u16 = 1400;
pub const VIP_TCP_PORT: u16 = 80;
pub const VIP_UDP_PORT: u16 = 5353;

pub fn backend_mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x02, last]
}

/// Backends: ids 1..=3 serve the TCP VIP on 8080, ids 4..=6 the UDP VIP on
/// 5353; host part .11..=.13. Only .11..=.13 have neighbour entries.
pub fn backend_addr(id: u32) -> ([u8; 4], u16) {
    let host = 10 + ((id - 1) % 3 + 1) as u8;
    let port = if id <= 3 { 8080 } else { 5353 };
    ([198, 18, 2, host], port)
}

// ---------------------------------------------------------------- harness

/// The test's namespace, set up for this family.
pub struct Netns(FixtureNs);

impl Netns {
    pub fn new() -> Self {
        let ns = FixtureNs::new("lbpkt", GW_CLIENT_MAC, GW_BACKEND_MAC);
        let n = ns.name();
        sh(&["ip", "-n", n, "addr", "add", "198.18.1.1/24", "dev", "lbp-c"]);
        sh(&["ip", "-n", n, "addr", "add", "198.18.2.1/24", "dev", "lbp-b"]);
        sh(&[
            "ip",
            "-n",
            n,
            "neigh",
            "add",
            "198.18.1.2",
            "lladdr",
            &mac_str(CLIENT_MAC),
            "dev",
            "lbp-c",
            "nud",
            "permanent",
        ]);
        for host in 11..=13u8 {
            let addr = format!("198.18.2.{host}");
            sh(&[
                "ip",
                "-n",
                n,
                "neigh",
                "add",
                &addr,
                "lladdr",
                &mac_str(backend_mac(host)),
                "dev",
                "lbp-b",
                "nud",
                "permanent",
            ]);
        }
        // Narrow paths, for path MTU rules: a second client behind a
        // 1280-byte hop, and backend .13 behind a 1400-byte one. `lock`:
        // without it the FIB reports the device MTU for forwarded packets.
        sh(&[
            "ip",
            "-n",
            n,
            "neigh",
            "add",
            "198.18.1.3",
            "lladdr",
            &mac_str(NARROW_CLIENT_MAC),
            "dev",
            "lbp-c",
            "nud",
            "permanent",
        ]);
        sh(&[
            "ip",
            "-n",
            n,
            "route",
            "add",
            "198.18.1.3/32",
            "dev",
            "lbp-c",
            "mtu",
            "lock",
            &NARROW_CLIENT_MTU.to_string(),
        ]);
        sh(&[
            "ip",
            "-n",
            n,
            "route",
            "add",
            "198.18.2.13/32",
            "dev",
            "lbp-b",
            "mtu",
            "lock",
            &NARROW_BACKEND_MTU.to_string(),
        ]);
        sh(&["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        Netns(ns)
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.0.run(f)
    }
}

/// The loaded program with two VIPs and six backends installed.
pub struct Lb {
    pub program: Program,
    pub maps: Maps,
    pub client_if: u32,
    pub backend_if: u32,
    pub ring: [u32; RING as usize],
}

pub fn vip_key(port: u16, proto: u8) -> VipKey {
    VipKey::new((VIP, port).into(), proto)
}

impl Lb {
    pub fn new() -> Self {
        let mut program = Program::load(&LoadOptions { ring_size: RING, max_vips: 2, conntrack_capacity: 1024 })
            .unwrap_or_else(|e| panic!("load: {e:?}"));
        let mut maps = program.maps().expect("maps");
        for id in 1..=6 {
            let (addr, port) = backend_addr(id);
            maps.set_backend(id, backend_info(addr, port, BACKEND_STATE_UP)).expect("backend");
        }
        let mut lb =
            Lb { program, maps, client_if: ifindex("lbp-c"), backend_if: ifindex("lbp-b"), ring: [0; RING as usize] };
        for id in 1..=6 {
            lb.mark_address([u32::from_ne_bytes(backend_addr(id).0), 0, 0, 0]);
        }
        lb.install_guard();
        lb.set_ring(1, 0, [1, 2, 3]);
        lb.set_ring(2, 0, [4, 5, 6]);
        lb
    }

    /// Writes what the agent's balancer writes for the data path's guards
    /// (`lb_common::guard`): each backend's service and address role, and
    /// the gateway's own addresses.
    pub fn install_guard(&mut self) {
        for id in 1..=6 {
            let (a, port) = backend_addr(id);
            let (vip_id, vip_port, proto) =
                if id <= 3 { (1, VIP_TCP_PORT, PROTO_TCP) } else { (2, VIP_UDP_PORT, PROTO_UDP) };
            let service = ServiceKey::new((a, port).into(), proto);
            let nat = ReplyNat::new(&vip_key(vip_port, proto), vip_id, id);
            self.maps.set_backend_service(service, nat).expect("backend service");
            let key = VipAddrKey::new(a.into());
            self.maps.set_addr_roles(key, ADDR_ROLE_BACKEND).expect("backend role");
        }
        for gw in [[198, 18, 1, 1], [198, 18, 2, 1]] {
            let key = VipAddrKey::new(gw.into());
            self.maps.set_addr_roles(key, ADDR_ROLE_LOCAL).expect("local role");
        }
    }

    /// Fills ring `generation` of `vip_id` round-robin with `ids` and
    /// publishes it.
    pub fn set_ring(&mut self, vip_id: u32, generation: u32, ids: impl AsRef<[u32]>) {
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
        self.upsert_vip(
            vip_key(port, proto),
            VipInfo { vip_id, ring_size: RING, ring_generation: generation, flags: 0 },
        );
    }

    /// Writes a VIP as the agent's balancer does: its `VIPS` entry, then its
    /// protocol's bit in its address's `VIP_ADDRS` entry.
    pub fn upsert_vip(&mut self, key: VipKey, info: VipInfo) {
        self.mark_address(key.addr_be);
        self.maps.upsert_vip(key, info).expect("vip");
        self.set_vip_addr_bit(&key, true);
    }

    /// Sets the address filter slot of `addr_be`, as the agent's balancer
    /// does for every VIP and backend address before it names them.
    pub fn mark_address(&mut self, addr_be: [u32; 4]) {
        self.maps.set_addr_filter(lb_common::addr_filter::slot(&addr_be)).expect("address filter");
    }

    /// Removes a VIP as the agent's balancer does: its `VIPS` entry, then its
    /// protocol's bit (these fixtures have one VIP per address and protocol).
    pub fn remove_vip(&mut self, key: &VipKey) {
        self.maps.remove_vip(key).expect("remove vip");
        self.set_vip_addr_bit(key, false);
    }

    fn set_vip_addr_bit(&mut self, key: &VipKey, present: bool) {
        let addr = key.addr_key();
        let (protos, bit) = (self.maps.vip_addr_protos(&addr), proto_bit(key.proto));
        let protos = if present { protos | bit } else { protos & !bit };
        self.maps.set_vip_addr(addr, protos).expect("vip address");
    }

    pub fn run(&mut self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        test_run(&mut self.program, frame, ingress)
    }

    pub fn verdict_count(&self, r: u32) -> u64 {
        self.maps.verdicts().expect("verdicts")[r as usize]
    }

    /// Runs one frame and returns its action, output and the one verdict
    /// reason whose counter moved; fails unless exactly one moved, by one.
    pub fn run_counted(&mut self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>, &'static str) {
        test_run_counted(&mut self.program, &self.maps, frame, ingress)
    }

    /// The frame is handed to the kernel byte for byte, counted as `reason`.
    #[track_caller]
    pub fn assert_passed_untouched(&mut self, name: &str, frame: &[u8], expected_reason: u32) {
        let (action, out, counted) = self.run_counted(frame, self.client_if);
        assert_eq!((action, counted), (XDP_PASS, reason::NAMES[expected_reason as usize]), "{name}");
        assert!(out == frame, "{name}: frame changed\n  out: {}\n  in:  {}", hex(&out), hex(frame));
    }

    /// The frame is redirected, counted as `expected_reason`; returns it.
    #[track_caller]
    pub fn assert_redirected_as(&mut self, frame: &[u8], ingress: u32, expected_reason: u32) -> Vec<u8> {
        let (action, out, counted) = self.run_counted(frame, ingress);
        assert_eq!((action, counted), (XDP_REDIRECT, reason::NAMES[expected_reason as usize]));
        out
    }

    /// The frame is dropped, counted as `expected_reason`.
    #[track_caller]
    pub fn assert_dropped(&mut self, name: &str, frame: &[u8], ingress: u32, expected_reason: u32) {
        let (action, _, counted) = self.run_counted(frame, ingress);
        assert_eq!((action, counted), (XDP_DROP, reason::NAMES[expected_reason as usize]), "{name}");
    }

    /// Sends a TCP flow's first ACK after its SYN (`Tcp::client_to_vip`):
    /// the packet that pins the flow in the connection table.
    pub fn ack(&mut self, sport: u16) -> (u32, Vec<u8>) {
        let ack = Tcp { syn: false, ..Tcp::client_to_vip(sport) }.build();
        self.run(&ack, self.client_if)
    }

    /// The backend the ring assigns a client → TCP VIP flow.
    pub fn expected_backend(&self, sport: u16) -> u32 {
        let key = flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP);
        self.ring[(flow_hash(&key) % RING) as usize]
    }
}

pub fn backend_info(addr: [u8; 4], port: u16, state: u8) -> BackendInfo {
    BackendInfo::new((addr, port).into(), state)
}

pub fn flow(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey::new((src, sport).into(), (dst, dport).into(), proto)
}

// ---------------------------------------------------------------- frames

pub struct Tcp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub syn: bool,
    pub payload: &'static [u8],
}

impl Tcp {
    pub fn client_to_vip(sport: u16) -> Self {
        Tcp {
            src_mac: CLIENT_MAC,
            dst_mac: GW_CLIENT_MAC,
            src: CLIENT,
            dst: VIP,
            ttl: 64,
            sport,
            dport: VIP_TCP_PORT,
            syn: true,
            payload: b"",
        }
    }

    pub fn build(&self) -> Vec<u8> {
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
pub fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
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
pub fn assert_checksums_valid(frame: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv4(ip)) = sliced.net else { panic!("output is not IPv4") };
    let header = ip.header().to_header();
    assert_eq!(header.header_checksum, header.calc_header_checksum(), "IPv4 header checksum");
    match sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let expected = tcp.to_header().calc_checksum_ipv4(&header, tcp.payload()).expect("tcp csum");
            assert_eq!(tcp.checksum(), expected, "TCP checksum");
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            let expected = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload()).checksum;
            assert_eq!(icmp.checksum(), expected, "ICMP checksum");
        }
        Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
            let expected = udp.to_header().calc_checksum_ipv4(&header, udp.payload()).expect("udp csum");
            assert_eq!(udp.checksum(), expected, "UDP checksum");
        }
        _ => {}
    }
}

pub fn with_lb(f: impl FnOnce(&mut Lb) + Send + 'static) {
    lb_tests::require_root!();
    let ns = Netns::new();
    ns.run(move || {
        let mut lb = Lb::new();
        f(&mut lb);
    });
}

/// The reply to a no-backend or echo packet: sent back out (a redirect to
/// the device it came in on; the reason says it is a reply), the
/// bytes as `expected`, counted once as `expected_reason`.
impl Lb {
    #[track_caller]
    pub fn assert_answered(&mut self, name: &str, frame: &[u8], expected: &[u8], expected_reason: u32) {
        let (action, out, counted) = self.run_counted(frame, self.client_if);
        assert_eq!((action, counted), (XDP_REDIRECT, reason::NAMES[expected_reason as usize]), "{name}");
        assert_frame(&out, expected);
        assert_checksums_valid(&out);
    }
}

/// Inserts IPv4 options after the fixed header of an untagged frame and
/// fixes IHL, total length and the header checksum.
pub fn with_ip_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40, "options come in words, at most 10");
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(options);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x45 + (options.len() / 4) as u8;
    let tot = u16::from_be_bytes([f[16], f[17]]) + options.len() as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    let (mut header, _) = etherparse::Ipv4Header::from_slice(&f[14..]).expect("ipv4 with options");
    header.header_checksum = header.calc_header_checksum();
    f[24..26].copy_from_slice(&header.header_checksum.to_be_bytes());
    f
}

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// Inserts VLAN tags, outermost first as (TPID, VLAN id), after the MACs of
/// an untagged frame; checks that etherparse reads them back.
pub fn with_vlan_tags(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    if tags.len() <= 2 {
        // Lax: the tags must parse even when what follows is malformed on purpose.
        let vids: Vec<u16> = match LaxSlicedPacket::from_ethernet(&f).expect("tagged frame parses").vlan {
            None => vec![],
            Some(VlanSlice::SingleVlan(v)) => vec![v.vlan_identifier().value()],
            Some(VlanSlice::DoubleVlan(v)) => {
                vec![v.outer().vlan_identifier().value(), v.inner().vlan_identifier().value()]
            }
        };
        assert_eq!(vids, tags.iter().map(|t| t.1).collect::<Vec<_>>(), "etherparse reads other tags");
    }
    f
}
