//! The connection table's lifecycle in the data path; the rules and their
//! reasons are in `lb_common::timeouts`. Whether a pinned flow still holds,
//! marking it active, pinning a new one, and keeping `CONNTRACK` and
//! `REPLY_NAT` in step: a reply is translated only while the flow's
//! `CONNTRACK` entry names the backend it comes from, activity in either
//! direction refreshes that one entry, and each map puts back the other's
//! entry if LRU evicted it.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use lb_common::{
    backend::BackendInfo,
    flow::{FLOW_F_CLOSING, FlowKey, FlowState, ReplyNat},
    stats::{conntrack_event, reason},
    timeouts::{TOUCH_INTERVAL_NS, idle_ns, is_expired},
};

use crate::{
    Verdict,
    maps::{CONNTRACK, REPLY_NAT},
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

/// The clock `last_seen_ns` is kept in (CLOCK_MONOTONIC).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
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

/// Marks a packet of a live flow, either direction. The entry is rewritten
/// only when its flags change or `last_seen_ns` is a touch interval old
/// (see `lb_common::timeouts` for why); returns whether it was.
#[inline(always)]
pub fn touch(state: *mut FlowState, l4: &L4, now: u64) -> bool {
    // SAFETY: a valid map value. A concurrent touch from another CPU writes
    // the same kind of values; either result is right.
    unsafe {
        let flags = (*state).flags | flags_of(l4);
        if flags == (*state).flags && idle_ns(&*state, now) < TOUCH_INTERVAL_NS {
            return false;
        }
        (*state).last_seen_ns = now;
        (*state).flags = flags;
    }
    true
}

/// Pins a flow to `backend_id` in both directions, replacing `previous`,
/// and counts the table event that was. A failed insert only costs a
/// re-pick on the next packet, which Maglev answers the same way.
#[inline(always)]
pub fn pin(flow: &FlowKey, vip_id: u32, backend_id: u32, backend: &BackendInfo, l4: &L4, now: u64, previous: &Pinned) {
    let state = FlowState { backend_id, vip_id, last_seen_ns: now, flags: flags_of(l4), _pad: 0 };
    if CONNTRACK.insert(flow, &state, 0).is_ok() {
        match previous {
            Pinned::None => stats::count_conntrack_event(conntrack_event::INSERTED),
            Pinned::Ended(event) => stats::count_conntrack_event(*event),
            Pinned::Live(_) => {}
        }
    }
    let (key, nat) = (reply_key(flow, backend), reply_nat(flow, vip_id, backend_id));
    let _ = REPLY_NAT.insert(&key, &nat, 0);
}

/// Puts the flow's `REPLY_NAT` entry back if LRU evicted it. Called when an
/// active flow's entry is rewritten (about once a second), so replies that
/// stopped being translated recover within a second; the lookup also marks
/// the entry recently used.
#[inline(always)]
pub fn keep_reply_nat(flow: &FlowKey, vip_id: u32, backend_id: u32, backend: &BackendInfo) {
    let key = reply_key(flow, backend);
    // SAFETY: only tested for presence.
    if unsafe { REPLY_NAT.get(&key) }.is_none() {
        let nat = reply_nat(flow, vip_id, backend_id);
        let _ = REPLY_NAT.insert(&key, &nat, 0);
    }
}

/// A backend's packet `reply` of the flow `nat` translates: refreshes the
/// client → VIP entry (an expired one too: the flow is evidently alive on
/// this backend), or, if `restore`, puts it back if LRU evicted it. If the
/// flow is pinned to another backend now, the reply is stale and dropped.
///
/// A reply translated without per-flow state (`guard::Reply::Stateless`)
/// does not restore: its destination may be the gateway itself (the
/// answer to a health probe), which must never get balancing state.
#[inline(always)]
pub fn reply_seen(reply: &FlowKey, nat: &ReplyNat, l4: &L4, now: u64, restore: bool) -> Result<(), Verdict> {
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
        touch(state, l4, now);
        return Ok(());
    }
    if !restore {
        return Ok(());
    }
    let state =
        FlowState { backend_id: nat.backend_id, vip_id: nat.vip_id, last_seen_ns: now, flags: flags_of(l4), _pad: 0 };
    // NOEXIST: a client packet pinning the flow meanwhile wins.
    if CONNTRACK.insert(&flow, &state, u64::from(BPF_NOEXIST)).is_ok() {
        stats::count_conntrack_event(conntrack_event::INSERTED);
        stats::count_conntrack_event(conntrack_event::RESTORED);
    }
    Ok(())
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

#[inline(always)]
fn reply_nat(flow: &FlowKey, vip_id: u32, backend_id: u32) -> ReplyNat {
    ReplyNat { vip_addr_be: flow.dst_be, vip_port_be: flow.dst_port_be, _pad: 0, vip_id, backend_id }
}
