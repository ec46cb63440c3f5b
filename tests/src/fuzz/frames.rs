//! Base frames: valid frames of every kind the gateway meets, for one
//! family, built with etherparse (every checksum computed from scratch).

use std::net::IpAddr;

use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4::DestUnreachableHeader};

use super::{Case, HOT_PORTS, Rng, Side, Topology};

/// The kinds of base frame, each named in [`Case::what`].
const KINDS: [&str; 13] = [
    "tcp to vip",
    "tcp to vip",
    "udp to vip",
    "tcp to an unserved port",
    "udp to an unserved port",
    "echo request to vip",
    "tcp reply from a backend",
    "udp reply from a backend",
    "icmp error to vip quoting a reply",
    "icmp error to a client quoting a request",
    "traffic for another host",
    "tcp to a backend directly",
    "not ip",
];

/// A random base frame of a random kind.
pub fn base(rng: &mut Rng, t: &Topology) -> Case {
    let kind = *rng.pick(&KINDS);
    let sport = if rng.chance(80) { *rng.pick(&HOT_PORTS) } else { 1024 + rng.below(60_000) as u16 };
    let payload = payload(rng);
    let tcp_backend = t.backends.iter().find(|b| b.2).copied();
    let udp_backend = t.backends.iter().find(|b| !b.2).copied();
    let (frame, side, detail) = match kind {
        "tcp to vip" => {
            let flags = *rng.pick(&["syn", "ack", "ack psh", "fin ack", "rst", "syn ack", "none"]);
            (tcp(t, Side::Client, t.client, sport, t.vip, t.vip_tcp_port, flags, &payload), Side::Client, flags)
        }
        "udp to vip" => (udp(t, Side::Client, t.client, sport, t.vip, t.vip_udp_port, &payload), Side::Client, ""),
        "tcp to an unserved port" => {
            (tcp(t, Side::Client, t.client, sport, t.vip, t.vip_tcp_port + 1, "syn", &[]), Side::Client, "")
        }
        "udp to an unserved port" => {
            (udp(t, Side::Client, t.client, sport, t.vip, t.vip_udp_port + 1, &payload), Side::Client, "")
        }
        "echo request to vip" => (echo(t, t.client, t.vip, &payload), Side::Client, ""),
        "tcp reply from a backend" => {
            let (addr, port, _) = tcp_backend.unwrap_or((t.other, 8080, true));
            (tcp(t, Side::Backend, addr, port, t.client, sport, "ack psh", &payload), Side::Backend, "")
        }
        "udp reply from a backend" => {
            let (addr, port, _) = udp_backend.unwrap_or((t.other, 5353, false));
            (udp(t, Side::Backend, addr, port, t.client, sport, &payload), Side::Backend, "")
        }
        "icmp error to vip quoting a reply" => {
            let quote = inner_tcp(t.vip, t.vip_tcp_port, t.client, sport);
            (icmp_error(t, Side::Client, t.router, t.vip, &quote), Side::Client, "")
        }
        "icmp error to a client quoting a request" => {
            let (addr, port, _) = tcp_backend.unwrap_or((t.other, 8080, true));
            let quote = inner_tcp(t.client, sport, addr, port);
            let from = if rng.chance(50) { addr } else { t.router };
            (icmp_error(t, Side::Backend, from, t.client, &quote), Side::Backend, "")
        }
        "tcp to a backend directly" => {
            let (addr, port, _) = tcp_backend.unwrap_or((t.other, 8080, true));
            let flags = *rng.pick(&["syn", "ack psh"]);
            (tcp(t, Side::Client, t.client, sport, addr, port, flags, &payload), Side::Client, flags)
        }
        "traffic for another host" => {
            let f = if rng.chance(50) {
                tcp(t, Side::Client, t.client, sport, t.other, t.vip_tcp_port, "syn", &[])
            } else {
                udp(t, Side::Client, t.client, sport, t.other, t.vip_udp_port, &payload)
            };
            (f, Side::Client, "")
        }
        _ => (arp(t), Side::Client, ""),
    };
    let what = if detail.is_empty() { format!("{kind} :{sport}") } else { format!("{kind} ({detail}) :{sport}") };
    Case { frame, side, what }
}

fn payload(rng: &mut Rng) -> Vec<u8> {
    let len = if rng.chance(50) { 0 } else { rng.below(80) };
    (0..len).map(|_| rng.byte()).collect()
}

fn macs(t: &Topology, side: Side) -> ([u8; 6], [u8; 6]) {
    match side {
        Side::Client => (t.client_mac, t.gw_client_mac),
        Side::Backend => ([2, 0, 0, 0, 2, 11], t.gw_backend_mac),
    }
}

/// The Ethernet and IP layers of a packet from `src` to `dst`.
fn ip_builder(
    t: &Topology,
    side: Side,
    src: IpAddr,
    dst: IpAddr,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let (smac, dmac) = macs(t, side);
    let eth = PacketBuilder::ethernet2(smac, dmac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => eth.ipv4([198, 18, 1, 2], [198, 18, 0, 100], 64),
    }
}

#[expect(clippy::too_many_arguments, reason = "a segment's fields, in wire order")]
fn tcp(
    t: &Topology,
    side: Side,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: &str,
    data: &[u8],
) -> Vec<u8> {
    let mut b = ip_builder(t, side, src, dst).tcp(sport, dport, 1000, 64240);
    for flag in flags.split_whitespace() {
        b = match flag {
            "syn" => b.syn(),
            "ack" => b.ack(2000),
            "psh" => b.psh(),
            "fin" => b.fin(),
            "rst" => b.rst(),
            _ => b,
        };
    }
    let data = if flags.contains("syn") { &[][..] } else { data };
    let mut out = Vec::new();
    b.write(&mut out, data).expect("a small segment fits");
    out
}

fn udp(t: &Topology, side: Side, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ip_builder(t, side, src, dst).udp(sport, dport).write(&mut out, data).expect("a small datagram fits");
    out
}

fn echo(t: &Topology, src: IpAddr, dst: IpAddr, data: &[u8]) -> Vec<u8> {
    let b = ip_builder(t, Side::Client, src, dst);
    let mut out = Vec::new();
    if src.is_ipv4() {
        b.icmpv4_echo_request(7, 1).write(&mut out, data).expect("a small echo fits");
    } else {
        b.icmpv6_echo_request(7, 1).write(&mut out, data).expect("a small echo fits");
    }
    out
}

/// An IP packet carrying a TCP segment with 8 bytes of data: what an ICMP
/// error quotes (the whole of it; mutations cut it).
fn inner_tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 63),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 63),
        _ => PacketBuilder::ipv4([198, 18, 1, 2], [198, 18, 0, 100], 63),
    };
    let mut out = Vec::new();
    b.tcp(sport, dport, 5, 100).ack(6).write(&mut out, b"GET / HT").expect("a small quote fits");
    out
}

/// Fragmentation needed (IPv4) or packet too big (IPv6), quoting `quote`.
fn icmp_error(t: &Topology, side: Side, src: IpAddr, dst: IpAddr, quote: &[u8]) -> Vec<u8> {
    let b = ip_builder(t, side, src, dst);
    let mut out = Vec::new();
    if src.is_ipv4() {
        let kind =
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 });
        b.icmpv4(kind).write(&mut out, quote).expect("a small error fits");
    } else {
        b.icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 }).write(&mut out, quote).expect("a small error fits");
    }
    out
}

fn arp(t: &Topology) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&t.client_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&t.client_mac);
    f.extend_from_slice(&[198, 18, 1, 2, 0, 0, 0, 0, 0, 0, 198, 18, 1, 1]);
    f
}
