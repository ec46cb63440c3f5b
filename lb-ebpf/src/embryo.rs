//! TCP flows are tracked from their first ACK after a SYN seen here (the
//! rules and their reasons are in `lb_common::embryo`).

use lb_common::{embryo, flow::FlowKey};

use crate::{
    conntrack::Pinned,
    maps::{CONNTRACK, EMBRYOS},
    parse::{L4, TCP_ACK, TCP_SYN},
    stats,
};

/// A TCP packet to a VIP whose flow the table does not hold (or holds
/// expired or closed, `pinned`): whether to pin it now. A SYN is recorded
/// in its slot instead (and an ended entry of its 5-tuple removed, so its
/// ACK does not find the old flow, and counted as expired or reopened); a
/// later packet is pinned if its slot still holds its SYN, which it then
/// clears.
#[inline(always)]
pub fn track(flow: &FlowKey, l4: &L4, now: u64, pinned: &Pinned) -> bool {
    let Some(slot) = EMBRYOS.get_ptr_mut(embryo::slot(flow)) else { return false };
    if l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if let Pinned::Ended(event) = pinned {
            let _ = CONNTRACK.remove(flow);
            stats::count_conntrack_event(*event);
        }
        // SAFETY: a valid map value; a concurrent write by another SYN is
        // as good as this one (the loser's flow goes untracked).
        unsafe { *slot = embryo::entry(flow, now) };
        return false;
    }
    // SAFETY: as above.
    let seen = unsafe { *slot };
    if !embryo::matches(seen, flow, now) {
        return false;
    }
    // SAFETY: as above.
    unsafe { *slot = 0 };
    true
}
