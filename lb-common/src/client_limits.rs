//! Per-client limits on new connections, per VIP (`[vip.limits]`): a rate
//! (a token bucket) and a ceiling on concurrent flows, enforced in the data
//! path on the packet that opens a flow, a TCP SYN or a UDP flow's first
//! datagram. A client is its address masked to `prefix_len` bits, so a
//! whole /24 or /64 may share one budget.
//!
//! - **Rate.** The bucket is kept as GCRA (the generic cell rate
//!   algorithm): one timestamp per client, the "theoretical arrival time"
//!   of its next connection. It is a token bucket of `burst` tokens
//!   refilled at `rate` per second, stored in one word so that one map
//!   write updates it. Two CPUs admitting the same client at the same
//!   instant may both read the old time; each race admits one connection
//!   more than the bucket would. Clients spread by RSS over CPUs rarely race.
//! - **Concurrent flows.** A client's count goes up when one of its flows
//!   enters the connection table (a TCP flow at its first ACK, see
//!   `crate::embryo`) and down when that flow first sees a FIN or RST. The
//!   count is checked on the SYN, so handshakes in flight are not yet
//!   counted: a client that sends N SYNs at once gets up to N flows over its
//!   limit (its limit holds again once they are established). Flows that end
//!   without FIN or RST (idle timeout, LRU eviction) are not decremented
//!   here: the agent recounts the table every few seconds and writes the
//!   true counts (see the agent's `control::limits`).
//! - The table of clients (`CLIENTS`) is an LRU of `CLIENT_CAPACITY`
//!   entries. A flood from more sources than that evicts clients' states,
//!   which resets their buckets and counts: limits then fail open, never
//!   closed.
//! - Clients in the VIP's allow-list (`LIMIT_ALLOW`, CIDRs) are exempt.

use bytemuck::{Pod, Zeroable};

/// Entries of `CLIENTS`: clients (per VIP) whose bucket and count are kept.
pub const CLIENT_CAPACITY: u32 = 1 << 17;
/// Entries of `LIMIT_ALLOW`: allow-listed CIDRs, all VIPs together.
pub const ALLOW_CAPACITY: u32 = 4096;

/// Over its limit the opening packet is answered (a TCP RST, or ICMP port
/// unreachable for UDP, within the answers' rate limit) instead of dropped.
pub const LIMIT_F_RST: u8 = 1 << 0;
/// The VIP has an allow-list: look the client up in `LIMIT_ALLOW` first.
pub const LIMIT_F_ALLOW_LIST: u8 = 1 << 1;

/// The limits, as `LIMITED` counts them (index `vip_id * LIMIT_KINDS + kind`).
pub mod limit {
    /// New connections per second (the token bucket).
    pub const RATE: u32 = 0;
    /// Concurrent flows per client.
    pub const CONNECTIONS: u32 = 1;
    /// How many kinds there are.
    pub const COUNT: u32 = 2;
    /// Their names, as metrics label them.
    pub const NAMES: [&str; COUNT as usize] = ["new_connections_per_second", "max_connections_per_client"];
}

/// Value of `VIP_LIMITS`, indexed by VIP id: the VIP's limits. A VIP with
/// none has the `VIP_F_LIMITED` bit clear and its slot is not read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipLimits {
    /// Nanoseconds per new connection at the limit's rate (1e9 / rate); 0:
    /// no rate limit.
    pub interval_ns: u64,
    /// How far ahead of now a client's next connection time may run:
    /// `interval_ns * burst`.
    pub tolerance_ns: u64,
    /// Most concurrent flows per client; 0: no limit.
    pub max_connections: u32,
    /// Bits of the client's address that name a client (32 or 128: the
    /// address itself).
    pub prefix_len: u8,
    /// `LIMIT_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<VipLimits>() == 24);

/// Key of `CLIENTS`: a VIP and a client of it (its masked address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ClientKey {
    /// The client's address masked to the VIP's `prefix_len`, network byte
    /// order; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
    pub vip_id: u32,
}
const _: () = assert!(core::mem::size_of::<ClientKey>() == 20);

/// Value of `CLIENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClientState {
    /// GCRA's theoretical arrival time of the next connection (CLOCK_MONOTONIC ns).
    pub next_ns: u64,
    /// Flows of this client in the connection table, as far as the data path
    /// knows (see the module's notes).
    pub connections: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ClientState>() == 16);

/// Data of an `LIMIT_ALLOW` key (an LPM trie; the prefix length counts the
/// VIP id's 32 bits, then the address's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AllowKey {
    /// Matched in full: every prefix starts with its 32 bits.
    pub vip_id: u32,
    /// Network byte order; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<AllowKey>() == 20);

/// The client `addr_be` names at `prefix_len` bits: the address with the
/// rest cleared (words are in network byte order).
#[inline(always)]
pub fn masked(addr_be: &[u32; 4], prefix_len: u8) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let first_bit = (i as u32) * 32;
        let bits = u32::from(prefix_len).saturating_sub(first_bit).min(32);
        let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
        out[i] = addr_be[i] & mask.to_be();
        i += 1;
    }
    out
}

/// GCRA: whether a connection at `now_ns` is admitted by a bucket whose
/// next connection time is `next_ns`; if it is, the bucket's new time.
/// A bucket never seen has `next_ns` 0 and admits `burst` connections at
/// once.
#[inline(always)]
pub fn admit(next_ns: u64, now_ns: u64, limits: &VipLimits) -> Option<u64> {
    let start = if next_ns > now_ns { next_ns } else { now_ns };
    let next = start.saturating_add(limits.interval_ns);
    (next - now_ns <= limits.tolerance_ns).then_some(next)
}

#[cfg(feature = "user")]
impl VipLimits {
    /// The limits of `rate` connections per second (0: none) with `burst`,
    /// at most `max_connections` at once (0: no limit), per client of
    /// `prefix_len` bits.
    #[must_use]
    pub fn new(rate: u32, burst: u32, max_connections: u32, prefix_len: u8, flags: u8) -> Self {
        let interval_ns = if rate == 0 { 0 } else { 1_000_000_000 / u64::from(rate) };
        VipLimits {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst.max(1))),
            max_connections,
            prefix_len,
            flags,
            _pad: [0; 2],
        }
    }
}

crate::user_pod!(VipLimits, ClientKey, ClientState, AllowKey);

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u64, burst: u64) -> VipLimits {
        VipLimits {
            interval_ns: 1_000_000_000 / rate,
            tolerance_ns: 1_000_000_000 / rate * burst,
            ..VipLimits::default()
        }
    }

    /// Connections admitted out of `attempts` spread evenly over `secs`.
    fn admitted(l: &VipLimits, attempts: u64, secs: u64) -> u64 {
        let (mut next, mut ok) = (0, 0);
        let start = 5_000_000_000;
        for i in 0..attempts {
            if let Some(n) = admit(next, start + i * secs * 1_000_000_000 / attempts, l) {
                next = n;
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn a_burst_is_admitted_at_once_and_no_more() {
        let l = limits(10, 5);
        assert_eq!(admitted(&l, 100, 0), 5);
    }

    #[test]
    fn five_times_the_rate_is_held_to_the_rate_plus_the_burst() {
        let l = limits(20, 5);
        let ok = admitted(&l, 1000, 10);
        assert!((200..=206).contains(&ok), "{ok}");
    }

    #[test]
    fn half_the_rate_is_never_refused() {
        let l = limits(20, 1);
        assert_eq!(admitted(&l, 100, 10), 100);
    }

    #[test]
    fn masks_keep_the_prefix_in_network_order() {
        let a = [u32::from_ne_bytes([198, 18, 7, 9]), 0, 0, 0];
        assert_eq!(masked(&a, 24), [u32::from_ne_bytes([198, 18, 7, 0]), 0, 0, 0]);
        assert_eq!(masked(&a, 32), a);
        let b = [u32::from_ne_bytes([0x20, 1, 0x0d, 0xb8]), 0x1234_5678, 0xffff_ffff, 1];
        assert_eq!(masked(&b, 64), [b[0], b[1], 0, 0]);
        assert_eq!(masked(&b, 48), [b[0], u32::from_ne_bytes([0x78, 0x56, 0, 0]) & b[1], 0, 0]);
        assert_eq!(masked(&b, 128), b);
    }
}
