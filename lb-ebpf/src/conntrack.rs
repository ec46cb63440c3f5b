//! The connection table's lifecycle in the data path; the rules and their
//! reasons are in `lb_common::timeouts`. Whether a pinned flow still holds,
//! marking it active, pinning a new one, and what a reply does to it: a
//! reply is translated from its backend's service entry (no per-flow reply
//! state), refreshes its flow's one entry, and is dropped if that entry
//! names another backend by now.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use lb_common::{
    backend::{BACKEND_F_SHARED, BackendInfo},
    flow::{FLOW_F_CLOSING, FLOW_F_COUNTED, FLOW_F_SHARED, FlowKey, FlowState, ReplyNat},
    stats::{conntrack_event, reason},
    timeouts::{TOUCH_INTERVAL_NS, idle_ns, is_expired},
};

use crate::{
    Verdict, client_limits,
    maps::{CONNTRACK, VIP_TIMEOUTS},
    parse::{L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// What the table says about a client → VIP flow.
pub enum Pinned {
    /// No entry: a new flow, or one LRU evicted.
    None,
    /// An entry that still holds (its backend's health is the caller's
    /// business); points into the map.
    Live(*mut FlowState),
    /// An entry that no longer holds, and why: `conntrack_event::EXPIRED`
    /// or `REOPENED`.
    Ended(u32),
}

/// The clock every timestamp of the data path is kept in:
/// CLOCK_MONOTONIC_COARSE, which lags CLOCK_MONOTONIC by at most a tick
/// (4 ms at HZ=250). Every timeout it serves is a second or more (the
/// embryo's clock counts in ms units), and it is read on every balanced
/// packet: the coarse clock reads the last tick's time instead of the TSC,
/// and the bench measured it cheaper (see BENCHMARKS.md).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The time a flow's entry is stamped with at `now`: `now`, except for a
/// flow to a service several VIPs share (`FLOW_F_SHARED`), whose replies
/// go back from the VIP of the most recently active of its client's flows
/// (`guard::shared_call` compares their stamps): a client that asks one VIP
/// and then another within a tick would leave two equal coarse stamps, so
/// these rare flows are stamped with the fine clock (at most a tick ahead
/// of the coarse one, which counts as idle 0).
#[inline(always)]
fn stamp(flags: u32, now: u64) -> u64 {
    if flags & FLOW_F_SHARED != 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        now
    }
}

/// Looks up a client → VIP flow and applies the lifecycle rules to it.
#[inline(always)]
pub fn pinned(flow: &FlowKey, l4: &L4, now: u64) -> Pinned {
    let Some(state) = CONNTRACK.get_ptr_mut(flow) else {
        return Pinned::None;
    };
    // SAFETY: a valid map value; copied out once.
    let current = unsafe { *state };
    if is_expired(&current, flow.proto, now) {
        return Pinned::Ended(conntrack_event::EXPIRED);
    }
    if current.flags & FLOW_F_CLOSING != 0 && l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Pinned::Ended(conntrack_event::REOPENED);
    }
    Pinned::Live(state)
}

/// The flag a packet adds to its flow: FIN or RST mean it is closing.
#[inline(always)]
fn flags_of(l4: &L4) -> u32 {
    if l4.tcp_flags & (TCP_FIN | TCP_RST) != 0 { FLOW_F_CLOSING } else { 0 }
}

/// Marks a packet of a live flow (`flow`, client → VIP), either direction.
/// The entry is rewritten only when its flags change or `last_seen_ns` is a
/// touch interval old (see `lb_common::timeouts` for why), or on every
/// packet of a flow to a shared service (`FLOW_F_SHARED`); returns whether
/// it was. A counted flow's first FIN or RST takes it off its client's count.
#[inline(always)]
pub fn touch(state: *mut FlowState, flow: &FlowKey, l4: &L4, now: u64) -> bool {
    // SAFETY: a valid map value. A concurrent touch from another CPU writes
    // the same kind of values; either result is right.
    unsafe {
        let old = (*state).flags;
        let flags = old | flags_of(l4);
        let shared = flags & FLOW_F_SHARED != 0;
        if flags == old && !shared && idle_ns(&*state, now) < TOUCH_INTERVAL_NS {
            return false;
        }
        (*state).last_seen_ns = stamp(flags, now);
        (*state).flags = flags;
        if flags != old && old & (FLOW_F_CLOSING | FLOW_F_COUNTED) == FLOW_F_COUNTED {
            client_limits::closed(flow, (*state).vip_id);
        }
    }
    true
}

/// Pins a flow to `backend_id`, replacing `previous`, and counts the table
/// event that was. A failed insert only costs a re-pick on the next packet,
/// which Maglev answers the same way. Replies need no entry of their own.
/// `limited`: the VIP has per-client limits, and a new flow counts toward
/// its client's (a rescheduled one already does).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn pin(
    flow: &FlowKey,
    vip_id: u32,
    limited: bool,
    backend_id: u32,
    backend: &BackendInfo,
    l4: &L4,
    now: u64,
    previous: &Pinned,
) {
    let shared = if backend.flags & BACKEND_F_SHARED != 0 { FLOW_F_SHARED } else { 0 };
    let closing = flags_of(l4);
    let counted = limited && closing == 0;
    let flags = closing | shared | if counted { FLOW_F_COUNTED } else { 0 };
    let timeouts = VIP_TIMEOUTS.get(vip_id).copied().unwrap_or_default();
    let state = FlowState { backend_id, vip_id, last_seen_ns: stamp(shared, now), flags, timeouts };
    if CONNTRACK.insert(flow, &state, 0).is_ok() {
        match previous {
            Pinned::None => stats::count_conntrack_event(conntrack_event::INSERTED),
            // A UDP flow's datagram after its entry ended (a TCP flow's was
            // counted by the SYN that removed it).
            Pinned::Ended(event) => stats::count_conntrack_event(*event),
            Pinned::Live(_) => {}
        }
        if counted && !matches!(previous, Pinned::Live(_)) {
            client_limits::opened(flow, vip_id);
        }
    }
}

/// A backend's packet `reply` of a flow that `nat` (its service's entry)
/// translates: refreshes the client → VIP entry (an expired one too: the
/// flow is evidently alive on this backend); returns whether there was one.
/// If the flow is pinned to another backend now, the reply is stale and
/// dropped.
///
/// A reply never creates an entry: a packet from a backend's address may be
/// spoofed (issue 15), and only a client's packet to a VIP opens a flow.
/// Without one, the client's next packet is balanced again, to the same
/// backend while the ring is unchanged.
#[inline(always)]
pub fn reply_seen(reply: &FlowKey, nat: &ReplyNat, l4: &L4, now: u64) -> Result<bool, Verdict> {
    let flow = FlowKey {
        src_be: reply.dst_be,
        dst_be: nat.vip_addr_be,
        src_port_be: reply.dst_port_be,
        dst_port_be: nat.vip_port_be,
        proto: reply.proto,
        family: reply.family,
        _pad: [0; 2],
    };
    if let Some(state) = CONNTRACK.get_ptr_mut(&flow) {
        // SAFETY: a valid map value.
        if unsafe { (*state).backend_id } != nat.backend_id {
            return Err(Verdict::drop(reason::DROP_STALE_REPLY));
        }
        touch(state, &flow, l4, now);
        return Ok(true);
    }
    Ok(false)
}

/// The key replies of `flow` carry once it goes to `backend`.
#[inline(always)]
pub fn reply_key(flow: &FlowKey, backend: &BackendInfo) -> FlowKey {
    FlowKey {
        src_be: backend.addr_be,
        dst_be: flow.src_be,
        src_port_be: backend.port_be,
        dst_port_be: flow.src_port_be,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}
