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
    /// Not IPv4 (ARP, IPv6, other ethertypes): passed to the kernel.
    pub const PASS_NOT_IPV4: u32 = 0;
    /// IPv4 but neither to a VIP nor a reply of a balanced flow: passed.
    pub const PASS_NOT_VIP: u32 = 1;
    /// IPv4 fragment: passed; fragments are not balanced yet.
    pub const PASS_FRAGMENT: u32 = 2;
    /// IPv4 header too short, bad version or IHL, or length beyond the frame: passed
    /// untouched, and the kernel drops it.
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
    /// To a VIP whose ring has no backend up: dropped.
    pub const DROP_NO_BACKEND: u32 = 9;
    /// To a VIP with a truncated or invalid TCP/UDP header: dropped.
    pub const DROP_MALFORMED_L4: u32 = 10;
    /// A flow or map entry names a backend id the array does not hold: dropped.
    pub const DROP_BAD_BACKEND: u32 = 11;
    /// Number of reasons; the size of `VERDICTS`.
    pub const COUNT: u32 = 12;

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
    ];
}
