//! Per-CPU counters: per backend, and per verdict reason.

use bytemuck::{Pod, Zeroable};

/// Value of `BACKEND_STATS` (by backend id): a backend's traffic, each
/// direction apart, as IPVS and HAProxy report it. "In" is client → backend
/// (through the VIP), "out" is backend → client (replies, translated back).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    /// Packets client → backend.
    pub packets_in: u64,
    /// Bytes of whole frames client → backend.
    pub bytes_in: u64,
    /// Packets backend → client.
    pub packets_out: u64,
    /// Bytes of whole frames backend → client.
    pub bytes_out: u64,
    /// Flows assigned a backend (new flows and rescheduled ones).
    pub new_flows: u64,
    /// Flows moved off a backend that went down.
    pub rescheduled_flows: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 48);

impl Counters {
    /// Sums per-CPU values; the agent does this at scrape time.
    pub fn merge(&mut self, other: &Counters) {
        self.packets_in = self.packets_in.wrapping_add(other.packets_in);
        self.bytes_in = self.bytes_in.wrapping_add(other.bytes_in);
        self.packets_out = self.packets_out.wrapping_add(other.packets_out);
        self.bytes_out = self.bytes_out.wrapping_add(other.bytes_out);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
        self.rescheduled_flows = self.rescheduled_flows.wrapping_add(other.rescheduled_flows);
    }

    /// Packets in both directions.
    pub fn packets(&self) -> u64 {
        self.packets_in.wrapping_add(self.packets_out)
    }
}

/// Which way a packet of a balanced flow goes, for [`Counters`].
pub mod direction {
    /// Client → backend.
    pub const IN: u32 = 0;
    /// Backend → client.
    pub const OUT: u32 = 1;
}

crate::user_pod!(Counters);

/// Why the program returned what it did: an index into `VERDICTS`, which
/// counts packets per reason. Every drop has its own reason.
///
/// One table below gives each reason its constant, its value, its name
/// (split at its first underscore into the `action` and `reason` labels of
/// `lb_verdict_packets_total`) and its meaning (the doc
/// comment, also in [`HELP`](reason::HELP)); the build fails unless the
/// values count up from 0 in table order and each name is its constant's
/// name in lowercase.
pub mod reason {
    /// Declares the reasons, [`COUNT`], [`NAMES`] and [`HELP`] from one table
    /// of `doc comment, CONSTANT = value => "name"`.
    macro_rules! reasons {
        ($($(#[doc = $doc:literal])+ $konst:ident = $value:literal => $name:literal,)+) => {
            $($(#[doc = $doc])+ pub const $konst: u32 = $value;)+

            /// Number of reasons; the size of `VERDICTS`.
            pub const COUNT: u32 = [$($value),+].len() as u32;

            /// Names for metrics, indexed by reason.
            pub const NAMES: [&str; COUNT as usize] = [$($name),+];

            /// What each reason means, indexed by reason: its doc comment as
            /// one line.
            pub const HELP: [&str; COUNT as usize] = [$(concat!($($doc),+).trim_ascii_start()),+];

            const _: () = {
                let values = [$($konst),+];
                let constants = [$(stringify!($konst)),+];
                let mut i = 0;
                while i < values.len() {
                    assert!(values[i] == i as u32, "reasons must count up from 0 in table order");
                    assert!(is_lowercase_of(NAMES[i], constants[i]), "a reason's name must be its constant in lowercase");
                    i += 1;
                }
            };
        };
    }

    /// Whether `name` is `constant` in ASCII lowercase.
    const fn is_lowercase_of(name: &str, constant: &str) -> bool {
        let (name, constant) = (name.as_bytes(), constant.as_bytes());
        if name.len() != constant.len() {
            return false;
        }
        let mut i = 0;
        while i < name.len() {
            if name[i] != constant[i].to_ascii_lowercase() {
                return false;
            }
            i += 1;
        }
        true
    }

    reasons! {
        /// Not IP at all (ARP, other ethertypes; also behind VLAN tags), or
        /// behind three or more VLAN tags: passed to the kernel.
        PASS_NOT_IP = 0 => "pass_not_ip",
        /// IP, but neither to a VIP nor a reply of a balanced flow: passed.
        PASS_NOT_VIP = 1 => "pass_not_vip",
        /// IPv4 fragment not addressed to a VIP (its address and protocol have
        /// none) and not of a balanced datagram: passed, not ours to judge.
        PASS_FRAGMENT = 2 => "pass_fragment",
        /// Frame too short for the fixed 20-byte IPv4 header, or IP version not 4:
        /// passed untouched, and the kernel drops it.
        PASS_MALFORMED_IP = 3 => "pass_malformed_ip",
        /// TTL would expire at this hop: passed untouched so the kernel sends ICMP.
        PASS_TTL_EXPIRED = 4 => "pass_ttl_expired",
        /// Rewritten, but the next hop has no neighbour entry yet: handed to the
        /// kernel, which resolves it and forwards.
        PASS_NO_NEIGH = 5 => "pass_no_neigh",
        /// Rewritten, but the route lookup failed otherwise: handed to the kernel.
        PASS_FIB_FAILED = 6 => "pass_fib_failed",
        /// Client → VIP packet rewritten and redirected to its backend.
        REDIRECT_TO_BACKEND = 7 => "redirect_to_backend",
        /// Backend → client reply rewritten and redirected to the client.
        REDIRECT_TO_CLIENT = 8 => "redirect_to_client",
        /// To a VIP whose ring has no backend up, and not answered: a TCP RST
        /// (a RST is never answered with a RST). Everything else with no
        /// backend is answered (`TX_RST_NO_BACKEND`,
        /// `TX_ICMP_UNREACHABLE_NO_BACKEND`).
        DROP_NO_BACKEND = 9 => "drop_no_backend",
        /// To a VIP with a truncated or invalid TCP/UDP header: dropped.
        DROP_MALFORMED_L4 = 10 => "drop_malformed_l4",
        /// A flow or map entry names a backend id the array does not hold: dropped.
        DROP_BAD_BACKEND = 11 => "drop_bad_backend",
        /// IPv4 header length (IHL) below 5 words: passed untouched (the kernel
        /// drops it); the header cannot be trusted to find anything.
        PASS_BAD_IHL = 12 => "pass_bad_ihl",
        /// IPv4 total length shorter than the header itself: passed untouched.
        PASS_BAD_TOTAL_LENGTH = 13 => "pass_bad_total_length",
        /// IPv4 total length beyond the end of the frame (a truncated frame, or
        /// options cut off): passed untouched.
        PASS_TRUNCATED_IP = 14 => "pass_truncated_ip",
        /// A TCP/UDP segment too short to hold its ports, or an ICMP message
        /// to a VIP address shorter than its 8-byte header: it names no VIP, so
        /// it is not ours to judge; passed untouched.
        PASS_SHORT_L4 = 15 => "pass_short_l4",
        /// IPv4 fragment that cannot be placed, to an address and protocol some
        /// VIP has: a later fragment whose first was not balanced here (not
        /// seen, seen too long ago, or not for a VIP), or a first fragment that
        /// is not for a VIP or too short to hold its ports. Dropped: no host owns
        /// the VIP to reassemble it, and its pieces must not go to different
        /// backends.
        DROP_FRAGMENT = 16 => "drop_fragment",
        /// A backend's packet for a flow now pinned to another backend (it moved
        /// off this one, or expired and was balanced anew): dropped, as
        /// translating it would splice two connections into one.
        DROP_STALE_REPLY = 17 => "drop_stale_reply",
        /// A new flow (or one whose backend went down) to a TCP VIP with no
        /// backend up: answered at once with a RST from the VIP, sent back out
        /// the device it came in on, so the client fails fast.
        TX_RST_NO_BACKEND = 18 => "tx_rst_no_backend",
        /// A datagram to a UDP VIP with no backend up: answered with ICMP
        /// destination unreachable, port unreachable (type 3 code 3) from the
        /// VIP, quoting the IP header and the first 8 bytes (sent back out the device it came in on).
        TX_ICMP_UNREACHABLE_NO_BACKEND = 19 => "tx_icmp_unreachable_no_backend",
        /// A no-backend answer (RST or ICMP unreachable) over its per-CPU rate
        /// limit (`limits::REPLY_RATE_PER_SEC`): dropped instead.
        DROP_NO_BACKEND_RATE_LIMITED = 20 => "drop_no_backend_rate_limited",
        /// ICMP echo request to a VIP address: answered by the gateway itself
        /// with an echo reply (sent back out the device it came in on).
        TX_ICMP_ECHO_REPLY = 21 => "tx_icmp_echo_reply",
        /// ICMP echo request to a VIP address over the echo replies' per-CPU
        /// rate limit (`limits::reply_bucket::ECHO`): dropped.
        DROP_ICMP_ECHO_RATE_LIMITED = 22 => "drop_icmp_echo_rate_limited",
        /// IPv6 to an address some VIP has (and the gateway does not), whose
        /// next header is neither TCP, UDP nor ICMPv6 (an extension header:
        /// hop-by-hop, routing, fragment, destination options, ...): dropped,
        /// never balanced. Passed on, the gateway would route it back the way
        /// it came (it does not own the VIP address).
        DROP_IPV6_EXT_HEADER = 23 => "drop_ipv6_ext_header",
        /// A TCP/UDP packet of a balanced flow larger than its next hop's MTU,
        /// with don't-fragment clear: rewritten and handed to the kernel, which
        /// fragments it (XDP cannot).
        PASS_TOO_BIG = 24 => "pass_too_big",
        /// A packet of a balanced flow larger than its next hop's MTU with
        /// don't-fragment set: answered with ICMP fragmentation needed (IPv4)
        /// or packet too big (IPv6) carrying that MTU, so its sender's path MTU
        /// discovery works through the gateway (sent back out the device it came in on).
        TX_ICMP_FRAG_NEEDED = 25 => "tx_icmp_frag_needed",
        /// A packet that would get ICMP fragmentation needed / packet too big,
        /// over that answer's per-CPU rate limit (`limits::reply_bucket`):
        /// rewritten and handed to the kernel, which answers it under its own
        /// ICMP rate limits. Never silently dropped, or path MTU discovery
        /// would stall.
        PASS_FRAG_NEEDED_RATE_LIMITED = 26 => "pass_frag_needed_rate_limited",
        /// An ICMP error (destination unreachable, fragmentation needed, time
        /// exceeded, parameter problem) to a VIP about a packet of a balanced
        /// flow: steered to the flow's backend, the outer destination and the
        /// quoted source translated.
        REDIRECT_ICMP_ERROR_TO_BACKEND = 27 => "redirect_icmp_error_to_backend",
        /// An ICMP error to a client about a packet the gateway sent to a
        /// backend: the quoted destination becomes the VIP again (and the outer
        /// source, if the backend sent it), then it goes on to the client.
        REDIRECT_ICMP_ERROR_TO_CLIENT = 28 => "redirect_icmp_error_to_client",
        /// An ICMP error to a VIP address whose quoted packet belongs to no
        /// balanced flow (or is too short or malformed to name one): dropped,
        /// as no host owns the VIP to receive it.
        DROP_ICMP_ERROR_NO_FLOW = 29 => "drop_icmp_error_no_flow",
        /// A later fragment (offset ≠ 0) of a datagram whose first fragment was
        /// balanced: its address rewritten like the first's, sent the same way.
        REDIRECT_FRAGMENT = 30 => "redirect_fragment",
        /// A packet to a VIP, with no flow yet, from one of the gateway's own
        /// addresses or a backend's (see `lb_common::guard`): dropped. It never
        /// creates balancing state, so nobody can plant reply translations for
        /// the gateway's own connections (its health probes) or a backend's.
        DROP_SPOOFED_SOURCE = 31 => "drop_spoofed_source",
        /// A new flow to a VIP whose replies would carry the same 5-tuple as a
        /// live direct flow to that backend's service (`lb_common::guard`):
        /// dropped, so the direct flow's replies stay untranslated.
        DROP_FLOW_COLLISION = 32 => "drop_flow_collision",
        /// A packet of a flow that reaches a backend's service directly through
        /// the gateway, not through a VIP, either direction: passed untouched
        /// (and tracked, so its replies are never translated).
        PASS_DIRECT_FLOW = 33 => "pass_direct_flow",
        /// A backend's packet from its service port to one of the gateway's own
        /// addresses (the agent's health probes): passed untranslated.
        PASS_LOCAL_DESTINATION = 34 => "pass_local_destination",
        /// A packet to a VIP whose backend's next hop is the gateway itself (a
        /// backend with one of the gateway's addresses): dropped, never
        /// rewritten.
        DROP_LOCAL_NEXT_HOP = 35 => "drop_local_next_hop",
        /// A TCP segment to a VIP address on a port no TCP VIP of that address
        /// serves: answered with a RST from that address (rate-limited). Passed
        /// on, the gateway, which does not own the address, would route it back
        /// the way it came.
        TX_RST_NO_SERVICE = 36 => "tx_rst_no_service",
        /// A UDP datagram to a VIP address on a port no UDP VIP of that address
        /// serves: answered with ICMP port unreachable (rate-limited).
        TX_ICMP_UNREACHABLE_NO_SERVICE = 37 => "tx_icmp_unreachable_no_service",
        /// Another packet to a VIP address that no VIP of the address serves
        /// (another protocol, a RST, a segment too short for its ports, an ICMP
        /// message other than echo request or a translatable error): dropped.
        DROP_NO_SERVICE = 38 => "drop_no_service",
        /// A RST or port unreachable for a VIP address's unserved port, over
        /// its per-CPU rate limit: dropped.
        DROP_NO_SERVICE_RATE_LIMITED = 39 => "drop_no_service_rate_limited",
        /// A backend's reply whose flow has no per-flow reply state (evicted,
        /// or never written on this gateway), translated from the backend's
        /// service entry (`BACKEND_SERVICES`) and sent to the client.
        REDIRECT_TO_CLIENT_STATELESS = 40 => "redirect_to_client_stateless",
        /// A reply from a backend's service that several VIPs share, whose
        /// flow is in the connection table under none of them (evicted, or
        /// never seen here): dropped, as which VIP it answers for is unknown;
        /// never forwarded with the backend's own address.
        DROP_REPLY_NO_FLOW = 41 => "drop_reply_no_flow",
        /// A TCP segment to a VIP, not a SYN, of a flow the connection table
        /// does not hold and whose SYN was not seen here within
        /// `limits::EMBRYO_TIMEOUT_NS` (a spoofed ACK or RST, a flow whose
        /// state was lost, another gateway's flow): sent to the backend its
        /// Maglev slot names, without tracking it (see `crate::embryo`).
        REDIRECT_UNTRACKED = 42 => "redirect_untracked",
        /// A packet that opens a flow (a TCP SYN, a UDP flow's first
        /// datagram) from a client over its VIP's `new_connections_per_second`
        /// (`[vip.limits]`, see `crate::client_limits`): dropped.
        DROP_LIMITED_RATE = 43 => "drop_limited_rate",
        /// A packet that opens a flow from a client that has its VIP's
        /// `max_connections_per_client` flows already: dropped.
        DROP_LIMITED_CONNECTIONS = 44 => "drop_limited_connections",
        /// Over a per-client limit of a VIP whose limits answer (`action =
        /// "rst"`): a TCP SYN answered with a RST.
        TX_RST_LIMITED = 45 => "tx_rst_limited",
        /// Over a per-client limit of a VIP whose limits answer: a UDP
        /// datagram answered with ICMP port unreachable.
        TX_ICMP_UNREACHABLE_LIMITED = 46 => "tx_icmp_unreachable_limited",
        /// Over a per-client limit of a VIP whose limits answer, and over
        /// the answers' own rate limit too: dropped unanswered.
        DROP_LIMITED_UNANSWERED = 47 => "drop_limited_unanswered",
    }
}

/// What happened to entries of the connection table: an index into
/// `CONNTRACK_EVENTS`, which counts them per CPU. Unlike verdicts these are
/// not one per packet.
pub mod conntrack_event {
    /// A key entered the table: a new flow. LRU evictions are invisible to
    /// the program, but nothing else removes entries, so evictions ≈
    /// inserted − entries present.
    pub const INSERTED: u32 = 0;
    /// A flow idle past its timeout was balanced anew by its next packet.
    pub const EXPIRED: u32 = 1;
    /// A SYN after FIN or RST on a 5-tuple started a new flow before the
    /// old one's timeout.
    pub const REOPENED: u32 = 2;
    /// Number of events; the size of `CONNTRACK_EVENTS`.
    pub const COUNT: u32 = 3;

    /// Names for metrics, indexed by event.
    pub const NAMES: [&str; COUNT as usize] = ["inserted", "expired", "reopened"];
}

#[cfg(test)]
mod tests {
    use super::reason::{HELP, NAMES};

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

    #[test]
    fn every_reason_says_what_it_means() {
        for (name, help) in NAMES.iter().zip(HELP) {
            assert!(help.len() > 20 && !help.starts_with(' ') && !help.contains("  "), "{name}: {help:?}");
        }
    }
}
