//! A structured fuzzer for the XDP program (issue 12): valid frames of every
//! kind the gateway meets, mutated, and an independent checker of what the
//! program made of them. No root or kernel here: `tests/tests/fuzz.rs` runs
//! the frames through the loaded program (BPF_PROG_TEST_RUN) and
//! `cargo xtask fuzz` runs that test longer.
//!
//! - [`Generator`]: from a seed, an endless, reproducible sequence of
//!   [`Case`]s: a base frame ([`frames`]: TCP/UDP/ICMP to a VIP, to its
//!   unserved ports, to a backend directly, a backend's replies, ICMP
//!   errors quoting either way, traffic for other hosts, non-IP), then up
//!   to three mutations
//!   ([`mutate`]: truncation, bad lengths, IHL, IPv4 options, TCP data
//!   offsets, VLAN tags, fragments, lying ICMP quotes, IPv6 extension
//!   headers, flipped bytes, TTL), then, most of the time, checksums made
//!   right again, so the checks on the output bite.
//! - [`check`]: the invariants every verdict must keep, judged with
//!   etherparse (which shares no code with the program).

pub mod check;
pub mod config;
pub mod frames;
pub mod http;
pub mod mutate;

use std::net::IpAddr;

/// A small, fast, seedable generator (SplitMix64): the same seed gives the
/// same cases on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Which of the gateway's interfaces a frame arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// From the clients' network.
    Client,
    /// From the backends' network.
    Backend,
}

/// The addresses the loaded program knows, for one family: what the base
/// frames are built from.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The gateway's MAC on the client side.
    pub gw_client_mac: [u8; 6],
    /// The gateway's MAC on the backend side.
    pub gw_backend_mac: [u8; 6],
    /// A client's MAC.
    pub client_mac: [u8; 6],
    /// A client (with a route and neighbour entry at the gateway).
    pub client: IpAddr,
    /// The VIP address.
    pub vip: IpAddr,
    /// The TCP VIP's port.
    pub vip_tcp_port: u16,
    /// The UDP VIP's port.
    pub vip_udp_port: u16,
    /// Backends: address, service port, and whether the service is TCP.
    pub backends: Vec<(IpAddr, u16, bool)>,
    /// A host that is neither: traffic to it is not the program's.
    pub other: IpAddr,
    /// A router on the clients' side, the source of ICMP errors.
    pub router: IpAddr,
}

/// One frame to run, and how it was made.
#[derive(Debug, Clone)]
pub struct Case {
    /// The frame, from the Ethernet header on.
    pub frame: Vec<u8>,
    /// The interface it arrives on.
    pub side: Side,
    /// The base frame and mutations, e.g. `tcp ack to vip | truncate 37`.
    pub what: String,
}

/// Client source ports the base frames use most of the time, so that the
/// connection table holds their flows and later frames meet live state.
pub const HOT_PORTS: [u16; 8] = [40000, 40001, 40002, 40003, 41000, 42000, 50000, 60000];

/// The reproducible sequence of cases for one family.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    topo: Topology,
}

impl Generator {
    /// Cases for `topo` from `seed`.
    #[must_use]
    pub fn new(seed: u64, topo: Topology) -> Self {
        Generator { rng: Rng::new(seed), topo }
    }

    /// The next case: a base frame, 0 to 3 mutations, then (70 % of the
    /// time) its checksums made right again.
    pub fn next_case(&mut self) -> Case {
        let mut case = frames::base(&mut self.rng, &self.topo);
        let mutations = self.rng.below(4);
        for _ in 0..mutations {
            mutate::apply(&mut self.rng, &mut case);
        }
        if mutations > 0 && self.rng.chance(70) {
            mutate::fix_checksums(&mut case.frame);
            case.what.push_str(" | checksums fixed");
        }
        case
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    pub(crate) fn topo_v4() -> Topology {
        let a = |x: [u8; 4]| IpAddr::V4(Ipv4Addr::from(x));
        Topology {
            gw_client_mac: [2, 0, 0, 0, 1, 1],
            gw_backend_mac: [2, 0, 0, 0, 2, 1],
            client_mac: [2, 0, 0, 0, 1, 2],
            client: a([198, 18, 1, 2]),
            vip: a([198, 18, 0, 100]),
            vip_tcp_port: 80,
            vip_udp_port: 5353,
            backends: vec![(a([198, 18, 2, 11]), 8080, true), (a([198, 18, 2, 11]), 5353, false)],
            other: a([198, 18, 3, 9]),
            router: a([198, 18, 1, 254]),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_cases() {
        let mut a = Generator::new(7, topo_v4());
        let mut b = Generator::new(7, topo_v4());
        for _ in 0..1000 {
            let (x, y) = (a.next_case(), b.next_case());
            assert_eq!((x.frame, x.what), (y.frame, y.what));
        }
    }

    #[test]
    fn most_unmutated_frames_are_well_formed() {
        let mut g = Generator::new(1, topo_v4());
        let mut rng = Rng::new(2);
        for _ in 0..1000 {
            let case = frames::base(&mut rng, &g.topo);
            if case.what.starts_with("not ip") {
                continue;
            }
            let judged = check::judge(&case.frame);
            assert!(matches!(judged, check::Judged::Valid), "{}: {judged:?}", case.what);
        }
        let _ = g.next_case();
    }
}
