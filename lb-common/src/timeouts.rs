//! Connection-table lifecycle: idle timeouts per protocol.
//!
//! LRU eviction alone never expires anything: in a table with room to spare
//! an idle flow stays pinned forever, so a client that reuses its 5-tuple
//! minutes later (or after a ring change, or a drain) lands on the old
//! backend. So every `CONNTRACK` entry carries `last_seen_ns`, and the data
//! path treats an entry idle for longer than its protocol's timeout as absent:
//! the next client packet is balanced anew and the entry overwritten (counted
//! as `expired`). Expiry is decided where the entry is read, so correctness
//! needs no userspace sweep; LRU eviction reclaims the space of flows that
//! never come back.
//!
//! - A packet in either direction keeps a flow alive. Replies refresh the
//!   client → VIP entry too (the reply path derives its key from the
//!   backend's service entry).
//! - `last_seen_ns` is rewritten at most once per [`TOUCH_INTERVAL_NS`] (or
//!   when the flags change), so a busy flow's entry is read by every packet
//!   but written about once a second: requests and replies of one flow run on
//!   different CPUs, and a store per packet would bounce the entry's cache
//!   line between them (the kernel's LRU sets its own "referenced" bit only
//!   when clear, for the same reason). The price is a timeout up to one
//!   interval late.
//! - TCP after FIN or RST (either direction) has a short timeout, and a SYN
//!   without ACK on such a flow starts a new one at once (`reopened`).

use crate::{
    PROTO_TCP,
    flow::{FLOW_F_CLOSING, FlowState},
};

/// Longest idle timeout `[vip.timeouts]` may set: what fits a flow's entry.
pub const MAX_TIMEOUT_SECS: u16 = u16::MAX;

const SECOND_NS: u64 = 1_000_000_000;

/// Idle timeout of an established TCP flow.
pub const TCP_ESTABLISHED_NS: u64 = 300 * SECOND_NS;
/// Idle timeout of a TCP flow after a FIN or RST.
pub const TCP_CLOSING_NS: u64 = 10 * SECOND_NS;
/// Idle timeout of a UDP flow.
pub const UDP_NS: u64 = 30 * SECOND_NS;
/// `last_seen_ns` is rewritten only when at least this old.
pub const TOUCH_INTERVAL_NS: u64 = SECOND_NS;

/// The idle timeout of a flow of `proto` in `state`: its VIP's
/// (`[vip.timeouts]`, copied in when it was pinned), else the default.
#[inline(always)]
pub fn timeout_ns(state: &FlowState, proto: u8) -> u64 {
    let secs = if state.flags & FLOW_F_CLOSING != 0 && proto == PROTO_TCP {
        state.timeouts.closing_secs
    } else {
        state.timeouts.idle_secs
    };
    if secs == 0 { idle_timeout_ns(proto, state.flags) } else { u64::from(secs) * SECOND_NS }
}

/// The default idle timeout of a flow of `proto` with `flags`.
#[inline(always)]
pub fn idle_timeout_ns(proto: u8, flags: u32) -> u64 {
    if proto != PROTO_TCP {
        UDP_NS
    } else if flags & FLOW_F_CLOSING != 0 {
        TCP_CLOSING_NS
    } else {
        TCP_ESTABLISHED_NS
    }
}

/// How long the flow has been idle at `now_ns`. A `last_seen_ns` after `now`
/// counts as 0: another CPU may refresh it between our clock read and our
/// look at the entry.
#[inline(always)]
pub fn idle_ns(state: &FlowState, now_ns: u64) -> u64 {
    now_ns.saturating_sub(state.last_seen_ns)
}

/// Whether a flow of `proto` in `state` has been idle past its timeout.
#[inline(always)]
pub fn is_expired(state: &FlowState, proto: u8, now_ns: u64) -> bool {
    idle_ns(state, now_ns) > timeout_ns(state, proto)
}

/// Whether a direct flow (`crate::guard::DirectFlow`) of `proto` has been
/// idle past its timeout; the same rules as the connection table's.
#[inline(always)]
pub fn direct_is_expired(flow: &crate::guard::DirectFlow, proto: u8, now_ns: u64) -> bool {
    now_ns.saturating_sub(flow.last_seen_ns) > idle_timeout_ns(proto, flow.flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PROTO_UDP;

    fn state(last_seen_ns: u64, flags: u32) -> FlowState {
        FlowState { backend_id: 1, vip_id: 1, last_seen_ns, flags, timeouts: crate::flow::FlowTimeouts::default() }
    }

    #[test]
    fn each_protocol_expires_after_its_own_timeout() {
        let now = 1_000 * SECOND_NS;
        for (proto, flags, timeout) in
            [(PROTO_UDP, 0, UDP_NS), (PROTO_TCP, 0, TCP_ESTABLISHED_NS), (PROTO_TCP, FLOW_F_CLOSING, TCP_CLOSING_NS)]
        {
            assert!(!is_expired(&state(now - timeout, flags), proto, now), "{proto} {flags}: at the timeout");
            assert!(is_expired(&state(now - timeout - 1, flags), proto, now), "{proto} {flags}: past it");
        }
    }

    #[test]
    fn a_vips_own_timeouts_replace_the_defaults() {
        let now = 1_000 * SECOND_NS;
        let own = crate::flow::FlowTimeouts { idle_secs: 5, closing_secs: 2 };
        let with = |flags| FlowState { timeouts: own, ..state(now - 3 * SECOND_NS, flags) };
        assert!(!is_expired(&with(0), PROTO_TCP, now), "3 s of 5");
        assert!(is_expired(&with(FLOW_F_CLOSING), PROTO_TCP, now), "3 s of 2 after a FIN");
        assert!(!is_expired(&with(0), PROTO_UDP, now), "UDP takes idle_secs");
        assert!(is_expired(&with(0), PROTO_UDP, now + 3 * SECOND_NS));
    }

    #[test]
    fn a_last_seen_in_the_future_is_not_idle() {
        assert_eq!(idle_ns(&state(5 * SECOND_NS, 0), SECOND_NS), 0);
        assert!(!is_expired(&state(u64::MAX, 0), PROTO_UDP, SECOND_NS));
    }
}
