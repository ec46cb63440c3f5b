//! Per-CPU counters: per VIP, per backend, and per verdict reason.

use bytemuck::{Pod, Zeroable};

/// Value of `VIP_STATS` (by VIP id) and `BACKEND_STATS` (by backend id).
/// Both directions count: requests and replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    /// Packets, both directions.
    pub packets: u64,
    /// Bytes of whole frames, both directions.
    pub bytes: u64,
    /// Flows assigned a backend (new flows and rescheduled ones).
    pub new_flows: u64,
    /// Flows moved off a backend that went down.
    pub rescheduled_flows: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 32);

impl Counters {
    /// Sums per-CPU values; the agent does this at scrape time.
    pub fn merge(&mut self, other: &Counters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
        self.rescheduled_flows = self.rescheduled_flows.wrapping_add(other.rescheduled_flows);
    }
}

crate::user_pod!(Counters);

/// Why the program returned what it did: an index into `VERDICTS`, which
/// counts packets per reason. Every drop has its own reason.
pub mod reason {
    /// Neither IPv4 nor IPv6 (ARP, other ethertypes): passed to the kernel.
    pub const PASS_NOT_IPV4: u32 = 0;
    /// IPv4 but neither to a VIP nor a reply of a balanced flow: passed.
    pub const PASS_NOT_VIP: u32 = 1;
    /// IPv4 fragment not addressed to a VIP (its address and protocol have
    /// none) and not of a balanced datagram: passed, not ours to judge.
    pub const PASS_FRAGMENT: u32 = 2;
    /// Frame too short for the fixed 20-byte IPv4 header, or IP version not 4:
    /// passed untouched, and the kernel drops it.
    pub const PASS_MALFORMED_IP: u32 = 3;
    /// TTL would expire at this hop: passed untouched so the kernel sends ICMP.
    pub const PASS_TTL_EXPIRED: u32 = 4;
    /// Rewritten, but the next hop has no neighbour entry yet: handed to the
    /// kernel, which resolves it and forwards.
    pub const PASS_NO_NEIGH: u32 = 5;
    /// Rewritten, but the route lookup failed otherwise: handed to the kernel.
    pub const PASS_FIB_FAILED: u32 = 6;
    /// Client → VIP packet rewritten and redirected to its backend.
    pub const REDIRECT_TO_BACKEND: u32 = 7;
    /// Backend → client reply rewritten and redirected to the client.
    pub const REDIRECT_TO_CLIENT: u32 = 8;
    /// To a VIP whose ring has no backend up, and not answered: a TCP RST
    /// (a RST is never answered with a RST). Everything else with no
    /// backend is answered (`TX_RST_NO_BACKEND`,
    /// `TX_ICMP_UNREACHABLE_NO_BACKEND`).
    pub const DROP_NO_BACKEND: u32 = 9;
    /// To a VIP with a truncated or invalid TCP/UDP header: dropped.
    pub const DROP_MALFORMED_L4: u32 = 10;
    /// A flow or map entry names a backend id the array does not hold: dropped.
    pub const DROP_BAD_BACKEND: u32 = 11;
    /// IPv4 header length (IHL) below 5 words: passed untouched (the kernel
    /// drops it); the header cannot be trusted to find anything.
    pub const PASS_BAD_IHL: u32 = 12;
    /// IPv4 total length shorter than the header itself: passed untouched.
    pub const PASS_BAD_TOTAL_LENGTH: u32 = 13;
    /// IPv4 total length beyond the end of the frame (a truncated frame, or
    /// options cut off): passed untouched.
    pub const PASS_TRUNCATED_IP: u32 = 14;
    /// A TCP/UDP segment too short to hold its ports, or an ICMP message
    /// to a VIP address shorter than its 8-byte header: it names no VIP, so
    /// it is not ours to judge; passed untouched.
    pub const PASS_SHORT_L4: u32 = 15;
    /// IPv4 fragment that cannot be placed, to an address and protocol some
    /// VIP has: a later fragment whose first was not balanced here (not
    /// seen, seen too long ago, or not for a VIP), or a first fragment that
    /// is not for a VIP or too short to hold its ports. Dropped: no host owns
    /// the VIP to reassemble it, and its pieces must not go to different
    /// backends.
    pub const DROP_FRAGMENT: u32 = 16;
    /// A backend's packet for a flow now pinned to another backend (it moved
    /// off this one, or expired and was balanced anew): dropped, as
    /// translating it would splice two connections into one.
    pub const DROP_STALE_REPLY: u32 = 17;
    /// A new flow (or one whose backend went down) to a TCP VIP with no
    /// backend up: answered at once with a RST from the VIP, sent back out
    /// the way it came (sent back out the device it came in on), so the client fails fast.
    pub const TX_RST_NO_BACKEND: u32 = 18;
    /// A datagram to a UDP VIP with no backend up: answered with ICMP
    /// destination unreachable, port unreachable (type 3 code 3) from the
    /// VIP, quoting the IP header and the first 8 bytes (sent back out the device it came in on).
    pub const TX_ICMP_UNREACHABLE_NO_BACKEND: u32 = 19;
    /// A no-backend reply (RST or ICMP unreachable) over its per-CPU rate
    /// limit (`limits::REPLY_RATE_PER_SEC`): dropped instead.
    pub const DROP_NO_BACKEND_RATE_LIMITED: u32 = 20;
    /// ICMP echo request to a VIP address: answered by the gateway itself
    /// with an echo reply (sent back out the device it came in on).
    pub const TX_ICMP_ECHO_REPLY: u32 = 21;
    /// ICMP echo request to a VIP address over the echo replies' per-CPU
    /// rate limit (`limits::reply_bucket::ECHO`): dropped.
    pub const DROP_ICMP_ECHO_RATE_LIMITED: u32 = 22;
    /// IPv6 to an address some VIP has (and the gateway does not), whose
    /// next header is neither TCP, UDP nor ICMPv6 (an extension header:
    /// hop-by-hop, routing, fragment, destination options, ...): dropped,
    /// never balanced. Passed on, the gateway would route it back the way
    /// it came (it does not own the VIP address).
    pub const DROP_IPV6_EXT_HEADER: u32 = 23;
    /// A TCP/UDP packet of a balanced flow larger than its next hop's MTU,
    /// with don't-fragment clear: rewritten and handed to the kernel, which
    /// fragments it (XDP cannot).
    pub const PASS_TOO_BIG: u32 = 24;
    /// A packet of a balanced flow larger than its next hop's MTU with
    /// don't-fragment set: answered with ICMP fragmentation needed (IPv4)
    /// or packet too big (IPv6) carrying that MTU, so its sender's path MTU
    /// discovery works through the gateway (sent back out the device it came in on).
    pub const TX_ICMP_FRAG_NEEDED: u32 = 25;
    /// A packet that would get ICMP fragmentation needed / packet too big,
    /// over that answer's per-CPU rate limit (`limits::reply_bucket`):
    /// rewritten and handed to the kernel, which answers it under its own
    /// ICMP rate limits. Never silently dropped, or path MTU discovery
    /// would stall.
    pub const PASS_FRAG_NEEDED_RATE_LIMITED: u32 = 26;
    /// An ICMP error (destination unreachable, fragmentation needed, time
    /// exceeded, parameter problem) to a VIP about a packet of a balanced
    /// flow: steered to the flow's backend, the outer destination and the
    /// quoted source translated.
    pub const REDIRECT_ICMP_ERROR_TO_BACKEND: u32 = 27;
    /// An ICMP error to a client about a packet the gateway sent to a
    /// backend: the quoted destination becomes the VIP again (and the outer
    /// source, if the backend sent it), then it goes on to the client.
    pub const REDIRECT_ICMP_ERROR_TO_CLIENT: u32 = 28;
    /// An ICMP error to a VIP address whose quoted packet belongs to no
    /// balanced flow (or is too short or malformed to name one): dropped,
    /// as no host owns the VIP to receive it.
    pub const DROP_ICMP_ERROR_NO_FLOW: u32 = 29;
    /// A later fragment (offset ≠ 0) of a datagram whose first fragment was
    /// balanced: its address rewritten like the first's, sent the same way.
    pub const REDIRECT_FRAGMENT: u32 = 30;
    /// A packet to a VIP, with no flow yet, from one of the gateway's own
    /// addresses or a backend's (see `lb_common::guard`): dropped. It never
    /// creates balancing state, so nobody can plant reply translations for
    /// the gateway's own connections (its health probes) or a backend's.
    pub const DROP_SPOOFED_SOURCE: u32 = 31;
    /// A new flow to a VIP whose replies would carry the same 5-tuple as a
    /// live direct flow to that backend's service (`lb_common::guard`):
    /// dropped, so the direct flow's replies stay untranslated.
    pub const DROP_FLOW_COLLISION: u32 = 32;
    /// A packet of a flow that reaches a backend's service directly through
    /// the gateway, not through a VIP, either direction: passed untouched
    /// (and tracked, so its replies are never translated).
    pub const PASS_DIRECT_FLOW: u32 = 33;
    /// A backend's packet from its service port to one of the gateway's own
    /// addresses (the agent's health probes): passed untranslated.
    pub const PASS_LOCAL_DESTINATION: u32 = 34;
    /// A packet to a VIP whose backend's next hop is the gateway itself (a
    /// backend with one of the gateway's addresses): dropped, never
    /// rewritten.
    pub const DROP_LOCAL_NEXT_HOP: u32 = 35;
    /// A TCP segment to a VIP address on a port no TCP VIP of that address
    /// serves: answered with a RST from that address (rate-limited). Passed
    /// on, the gateway, which does not own the address, would route it back
    /// the way it came.
    pub const TX_RST_NO_SERVICE: u32 = 36;
    /// A UDP datagram to a VIP address on a port no UDP VIP of that address
    /// serves: answered with ICMP port unreachable (rate-limited).
    pub const TX_ICMP_UNREACHABLE_NO_SERVICE: u32 = 37;
    /// Another packet to a VIP address that no VIP of the address serves
    /// (another protocol, a RST, a segment too short for its ports, an ICMP
    /// message other than echo request or a translatable error): dropped.
    pub const DROP_NO_SERVICE: u32 = 38;
    /// A RST or port unreachable for a VIP address's unserved port, over
    /// its per-CPU rate limit: dropped.
    pub const DROP_NO_SERVICE_RATE_LIMITED: u32 = 39;
    /// A backend's reply whose flow has no per-flow reply state (evicted,
    /// or never written on this gateway), translated from the backend's
    /// service entry (`BACKEND_SERVICES`) and sent to the client.
    pub const REDIRECT_TO_CLIENT_STATELESS: u32 = 40;
    /// Number of reasons; the size of `VERDICTS`.
    pub const COUNT: u32 = 41;

    /// Names for metrics, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ipv4",
        "pass_not_vip",
        "pass_fragment",
        "pass_malformed_ip",
        "pass_ttl_expired",
        "pass_no_neigh",
        "pass_fib_failed",
        "redirect_to_backend",
        "redirect_to_client",
        "drop_no_backend",
        "drop_malformed_l4",
        "drop_bad_backend",
        "pass_bad_ihl",
        "pass_bad_total_length",
        "pass_truncated_ip",
        "pass_short_l4",
        "drop_fragment",
        "drop_stale_reply",
        "tx_rst_no_backend",
        "tx_icmp_unreachable_no_backend",
        "drop_no_backend_rate_limited",
        "tx_icmp_echo_reply",
        "drop_icmp_echo_rate_limited",
        "drop_ipv6_ext_header",
        "pass_too_big",
        "tx_icmp_frag_needed",
        "pass_frag_needed_rate_limited",
        "redirect_icmp_error_to_backend",
        "redirect_icmp_error_to_client",
        "drop_icmp_error_no_flow",
        "redirect_fragment",
        "drop_spoofed_source",
        "drop_flow_collision",
        "pass_direct_flow",
        "pass_local_destination",
        "drop_local_next_hop",
        "tx_rst_no_service",
        "tx_icmp_unreachable_no_service",
        "drop_no_service",
        "drop_no_service_rate_limited",
        "redirect_to_client_stateless",
    ];
}

/// What happened to entries of the connection table: an index into
/// `CONNTRACK_EVENTS`, which counts them per CPU. Unlike verdicts these are
/// not one per packet.
pub mod conntrack_event {
    /// A key entered the table: a new flow, or a `RESTORED` one. LRU
    /// evictions are invisible to the program, but nothing else removes
    /// entries, so evictions ≈ inserted − entries present.
    pub const INSERTED: u32 = 0;
    /// A flow idle past its timeout was balanced anew by its next packet.
    pub const EXPIRED: u32 = 1;
    /// A SYN after FIN or RST on a 5-tuple started a new flow before the
    /// old one's timeout.
    pub const REOPENED: u32 = 2;
    /// A reply found its flow's entry evicted and put it back from
    /// `REPLY_NAT` (so a busy reply direction keeps an idle-looking request
    /// direction pinned).
    pub const RESTORED: u32 = 3;
    /// Number of events; the size of `CONNTRACK_EVENTS`.
    pub const COUNT: u32 = 4;

    /// Names for metrics, indexed by event.
    pub const NAMES: [&str; COUNT as usize] = ["inserted", "expired", "reopened", "restored"];
}

#[cfg(test)]
mod tests {
    use super::reason::NAMES;

    #[test]
    fn reason_names_are_unique_and_say_their_action() {
        for (i, name) in NAMES.iter().enumerate() {
            assert!(!NAMES[..i].contains(name), "{name} appears twice");
            assert!(
                ["pass_", "drop_", "redirect_", "tx_"].iter().any(|p| name.starts_with(p)),
                "{name} does not start with its action"
            );
        }
    }
}
