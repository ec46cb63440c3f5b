//! Handshake counters per backend, for passive health (nginx's `max_fails`
//! at layer 4): the data path counts both halves of every TCP handshake it
//! balances, and ICMP unreachables quoting UDP datagrams sent to a backend;
//! the agent compares the counts over time (`lb-userspace`'s
//! `health::passive`).
//!
//! What is counted, and where, so the hot path pays only on handshakes:
//! - `syns`: a SYN (without ACK) forwarded to the backend: a client's
//!   opening segment, first or retransmitted.
//! - `syn_acks`: a SYN+ACK from the backend on the reply path: it accepted.
//! - `resets`: a RST from the backend **answering a SYN**: nothing listens.
//!   Recognised statelessly by its header alone (see [`reply_event`]): RFC
//!   793's reset generation gives a segment without ACK (and a SYN has none)
//!   a RST+ACK with sequence number 0, while a RST of an open connection
//!   carries the connection's own sequence number (0 only once in 2^32),
//!   and a RST answering a segment with ACK (a spoofed ACK, a stale
//!   connection) has no ACK flag. No lookup, no per-flow state.
//! - `unreachables`: an ICMP destination unreachable (port or host, and
//!   their IPv6 twins) quoting a UDP datagram the gateway sent to the
//!   backend.
//!
//! Established packets never reach these counters: the fast path leaves a
//! backend's SYN and RST segments to the pipeline, which counts them in its
//! forward stage after everything else; a packet without SYN or RST costs
//! one flags test there.

use bytemuck::{Pod, Zeroable};

use crate::tcp::{TCP_ACK, TCP_RST, TCP_SYN};

/// Value of `HANDSHAKES`, indexed by backend id; per CPU, summed by the
/// agent. Every field only grows (wrapping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Handshakes {
    /// SYNs forwarded to the backend.
    pub syns: u64,
    /// SYN+ACKs from the backend.
    pub syn_acks: u64,
    /// RSTs from the backend answering a SYN.
    pub resets: u64,
    /// ICMP port or host unreachables quoting a UDP datagram sent to it.
    pub unreachables: u64,
}
const _: () = assert!(core::mem::size_of::<Handshakes>() == 32);

impl Handshakes {
    /// Sums per-CPU values.
    pub fn merge(&mut self, other: &Handshakes) {
        self.syns = self.syns.wrapping_add(other.syns);
        self.syn_acks = self.syn_acks.wrapping_add(other.syn_acks);
        self.resets = self.resets.wrapping_add(other.resets);
        self.unreachables = self.unreachables.wrapping_add(other.unreachables);
    }
}

crate::user_pod!(Handshakes);

/// Which counter a segment moves: none.
pub const EVENT_NONE: u8 = 0;
/// [`Handshakes::syns`].
pub const EVENT_SYN: u8 = 1;
/// [`Handshakes::syn_acks`].
pub const EVENT_SYN_ACK: u8 = 2;
/// [`Handshakes::resets`].
pub const EVENT_RESET: u8 = 3;

/// Whether a TCP segment's flags are worth a look: only SYN and RST
/// segments ever move a counter, so everything else is sorted out by this
/// one test.
#[inline(always)]
pub fn may_count(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_RST) != 0
}

/// The counter a client's segment forwarded to its backend moves: a SYN
/// without ACK is an opening.
#[inline(always)]
pub fn request_event(tcp_flags: u8) -> u8 {
    if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN { EVENT_SYN } else { EVENT_NONE }
}

/// The counter a backend's segment on the reply path moves: SYN+ACK
/// accepts; RST+ACK with sequence number 0 (`seq`, host order) refuses a
/// SYN (see the module's doc for why that is exact enough).
#[inline(always)]
pub fn reply_event(tcp_flags: u8, seq: u32) -> u8 {
    let flags = tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST);
    if flags == TCP_SYN | TCP_ACK {
        EVENT_SYN_ACK
    } else if flags == TCP_RST | TCP_ACK && seq == 0 {
        EVENT_RESET
    } else {
        EVENT_NONE
    }
}

/// ICMP destination unreachable (IPv4).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv6 destination unreachable.
pub const ICMPV6_DEST_UNREACH: u8 = 1;

/// Whether an ICMP (`v6` false) or ICMPv6 error of `icmp_type` and `code`
/// quoting a UDP datagram to a backend says the backend did not take it:
/// host or port unreachable (ICMP codes 1 and 3; ICMPv6 address and port
/// unreachable, 3 and 4). Network unreachable and administrative
/// prohibitions say more about a path or a firewall than the backend.
#[inline(always)]
pub fn is_unreachable(v6: bool, icmp_type: u8, code: u8) -> bool {
    if v6 {
        icmp_type == ICMPV6_DEST_UNREACH && (code == 3 || code == 4)
    } else {
        icmp_type == ICMP_DEST_UNREACH && (code == 1 || code == 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::TCP_FIN;

    #[test]
    fn only_a_bare_syn_is_an_opening() {
        assert_eq!(request_event(TCP_SYN), EVENT_SYN);
        assert_eq!(request_event(TCP_SYN | 0x08), EVENT_SYN, "PSH does not matter");
        assert_eq!(request_event(TCP_SYN | TCP_ACK), EVENT_NONE);
        assert_eq!(request_event(TCP_ACK), EVENT_NONE);
        assert_eq!(request_event(TCP_SYN | TCP_RST), EVENT_NONE);
    }

    #[test]
    fn a_reset_answering_a_syn_has_ack_and_sequence_zero() {
        assert_eq!(reply_event(TCP_SYN | TCP_ACK, 12_345), EVENT_SYN_ACK);
        assert_eq!(reply_event(TCP_RST | TCP_ACK, 0), EVENT_RESET);
        // An open connection's reset carries its own sequence number.
        assert_eq!(reply_event(TCP_RST | TCP_ACK, 987_654), EVENT_NONE);
        // The answer to a segment with ACK (a spoofed ACK) has no ACK flag.
        assert_eq!(reply_event(TCP_RST, 0), EVENT_NONE);
        assert_eq!(reply_event(TCP_ACK, 0), EVENT_NONE);
        assert_eq!(reply_event(TCP_FIN | TCP_ACK, 0), EVENT_NONE);
    }

    /// The gateway's own RST (`tcp::rst_header`) for a SYN is what a backend
    /// sends: the rule recognises it.
    #[test]
    fn the_reset_rfc_793_generates_for_a_syn_is_recognised() {
        let syn: [u16; 10] = [1, 2, 0x1234, 0x5678, 0, 0, crate::tcp::word(0x50, TCP_SYN), 0, 0, 0];
        let rst = crate::tcp::rst_header(&syn, TCP_SYN, 20);
        let [_, flags] = rst[6].to_ne_bytes();
        let seq = (u32::from(u16::from_be(rst[2])) << 16) | u32::from(u16::from_be(rst[3]));
        assert_eq!(reply_event(flags, seq), EVENT_RESET);
    }

    #[test]
    fn only_flags_with_syn_or_rst_are_looked_at() {
        assert!(may_count(TCP_SYN) && may_count(TCP_RST) && may_count(TCP_SYN | TCP_ACK));
        assert!(!may_count(TCP_ACK) && !may_count(TCP_FIN | TCP_ACK) && !may_count(0));
    }

    #[test]
    fn unreachables_are_host_or_port() {
        assert!(is_unreachable(false, 3, 3) && is_unreachable(false, 3, 1));
        assert!(!is_unreachable(false, 3, 0) && !is_unreachable(false, 3, 13) && !is_unreachable(false, 11, 0));
        assert!(is_unreachable(true, 1, 4) && is_unreachable(true, 1, 3));
        assert!(!is_unreachable(true, 1, 1) && !is_unreachable(true, 3, 0));
    }
}
