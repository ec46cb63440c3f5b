//! The frames the packet benchmark sends, built with etherparse (so every
//! checksum is computed from scratch), and the addresses they use.
//!
//! The layout mirrors the packet fixtures in `tests/tests/v4` and `v6`: the
//! gateway's client side is 198.18.1.0/24 and 2001:db8:1::/64, its backend
//! side 198.18.2.0/24 and 2001:db8:2::/64, the VIPs 198.18.0.100 and
//! 2001:db8::100.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use etherparse::PacketBuilder;

pub const GW_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const GW_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];

pub const VIP_TCP_PORT: u16 = 80;
pub const VIP_UDP_PORT: u16 = 5353;
pub const BACKEND_TCP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;
/// The TCP VIP with per-client limits (`[vip.limits]`, never reached), and
/// its backends' port: a service of their own, not shared with the other VIP.
pub const VIP_TCP_LIMITED_PORT: u16 = 81;
pub const BACKEND_TCP_LIMITED_PORT: u16 = 8081;
/// Its rate and burst: the highest the config takes, so no SYN is refused
/// and every one pays for the limiter's check and its client's bucket.
pub const LIMITED_RATE: u32 = 10_000_000;
/// Backends per VIP; each has a permanent neighbour entry.
pub const BACKENDS: u8 = 3;
/// Source port of the benchmark's tracked TCP flow (UDP uses the next one).
pub const CLIENT_PORT: u16 = 40000;
/// Payload of data segments and datagrams: a short request line.
pub const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n";

/// MAC of backend `host` (its address's last byte).
pub const fn backend_mac(host: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x02, host]
}

/// Address family of a benchmark case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn client(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, 1, 2).into(),
            Family::V6 => Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2).into(),
        }
    }

    pub fn vip(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, 0, 100).into(),
            Family::V6 => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100).into(),
        }
    }

    /// Backend `i` (1-based): 198.18.2.(10+i) or 2001:db8:2::(10+i), the
    /// IPv6 host part written as the same digits in hex, as the testbed does.
    pub fn backend(self, i: u8) -> IpAddr {
        let host = 10 + i;
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, 2, host).into(),
            Family::V6 => Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, u16::from(0x10 + i)).into(),
        }
    }

    /// An address on the backend side that no VIP has: traffic to it passes.
    pub fn not_a_vip(self) -> IpAddr {
        self.backend(1)
    }

    /// An address that is neither a VIP nor a backend: most of what a
    /// gateway forwards.
    pub fn other_host(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, 5, 5).into(),
            Family::V6 => Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 5).into(),
        }
    }
}

/// The MAC of backend `addr` of `family`, as its neighbour entry has it.
pub fn backend_mac_of(family: Family, addr: IpAddr) -> Option<[u8; 6]> {
    (1..=BACKENDS).find(|&i| family.backend(i) == addr).map(|i| backend_mac(10 + i))
}

/// One direction of a flow, as a frame names it.
#[derive(Clone, Copy, Debug)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// TCP flags of a benchmark segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// A connection's first segment, no payload.
    Syn,
    /// The client's ACK that ends the handshake, no payload: the segment at
    /// which a flow enters the connection table.
    Ack,
    /// ACK and PSH with [`PAYLOAD`].
    Data,
}

/// A TCP frame `src_mac` → `dst_mac` carrying `tuple`, TTL/hop limit 64.
pub fn tcp(src_mac: [u8; 6], dst_mac: [u8; 6], tuple: Tuple, segment: Segment) -> anyhow::Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let ip = match (tuple.src, tuple.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => anyhow::bail!("mixed address families in {tuple:?}"),
    };
    let b = ip.tcp(tuple.sport, tuple.dport, 1000, 64240);
    let (b, payload) = match segment {
        Segment::Syn => (b.syn(), &[][..]),
        Segment::Ack => (b.ack(2000), &[][..]),
        Segment::Data => (b.ack(2000).psh(), PAYLOAD),
    };
    let mut out = Vec::new();
    b.write(&mut out, payload).context("building a TCP frame")?;
    Ok(out)
}

/// A UDP frame `src_mac` → `dst_mac` carrying `tuple` and [`PAYLOAD`].
pub fn udp(src_mac: [u8; 6], dst_mac: [u8; 6], tuple: Tuple) -> anyhow::Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let ip = match (tuple.src, tuple.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => anyhow::bail!("mixed address families in {tuple:?}"),
    };
    let mut out = Vec::new();
    ip.udp(tuple.sport, tuple.dport).write(&mut out, PAYLOAD).context("building a UDP frame")?;
    Ok(out)
}
