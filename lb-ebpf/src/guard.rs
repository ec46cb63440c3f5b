//! The data path's guards against being turned against its own side (the
//! rules and their reasons are in `lb_common::guard`): sources that may not
//! open balanced flows, replies translated without per-flow state, and
//! flows that reach a backend's service directly.

use lb_common::{
    backend::BackendInfo,
    flow::{FLOW_F_CLOSING, FlowKey, ReplyNat, SERVICE_F_SHARED},
    guard::{ADDR_ROLE_LOCAL, DirectFlow, ServiceKey},
    limits::MAX_SHARED_VIPS,
    stats::reason,
    timeouts::{TCP_ESTABLISHED_NS, TOUCH_INTERVAL_NS, direct_is_expired},
    vip_addr::VipAddrKey,
};

use crate::{
    Verdict,
    maps::{ADDR_ROLES, BACKEND_SERVICES, CONNTRACK, DIRECT_FLOWS, DIRECT_SEEN, SHARED_SERVICES},
    parse::{L4, TCP_FIN, TCP_RST},
};

/// The `ADDR_ROLE_*` bits of an address; 0 for one that is neither the
/// gateway's nor a backend's.
#[inline(always)]
pub fn roles(addr_be: [u32; 4], family: u8) -> u32 {
    let key = VipAddrKey { addr_be, family, _pad: [0; 3] };
    // SAFETY: the value is copied out at once.
    unsafe { ADDR_ROLES.get(&key) }.map_or(0, |r| r.roles)
}

/// Whether `addr_be` is one of the gateway's own addresses.
#[inline(always)]
pub fn is_local(addr_be: [u32; 4], family: u8) -> bool {
    roles(addr_be, family) & ADDR_ROLE_LOCAL != 0
}

/// A packet to a VIP that would open a flow `flow` to `backend`: refused
/// when its source is the gateway's own address or a backend's, or when
/// its replies would look like those of a live direct flow (so the direct
/// flow's replies stay untranslated).
#[inline(always)]
pub fn check_new_flow(flow: &FlowKey, backend_id: u32, backend: &BackendInfo, now: u64) -> Result<(), Verdict> {
    match new_flow_call(flow, backend_id, backend, now) {
        0 => Ok(()),
        why => Err(Verdict::drop(why)),
    }
}

/// [`check_new_flow`] as a BPF-to-BPF call: 0, or the drop reason.
///
/// verifier: not inlined, so its keys take no slots in the main frame,
/// which has little room left under the 512-byte stack limit it shares
/// with `nexthop::lookup_call` (new flows only, so the call costs little).
#[inline(never)]
fn new_flow_call(flow: &FlowKey, backend_id: u32, backend: &BackendInfo, now: u64) -> u32 {
    if roles(flow.src_be, flow.family) != 0 {
        return reason::DROP_SPOOFED_SOURCE;
    }
    // Only a backend with a direct flow lately can have one to collide with
    // (its service serves this one VIP, so its id is this backend's).
    if direct_seen_lately(backend_id, now) && direct_is_live(&crate::conntrack::reply_key(flow, backend), now) {
        return reason::DROP_FLOW_COLLISION;
    }
    0
}

/// Whether a direct flow to backend `backend_id`'s service passed within the
/// longest idle timeout a flow has (so one may still be live).
#[inline(always)]
pub fn direct_seen_lately(backend_id: u32, now: u64) -> bool {
    DIRECT_SEEN.get(backend_id).is_some_and(|&seen| seen != 0 && now.saturating_sub(seen) <= TCP_ESTABLISHED_NS)
}

/// The VIP a backend's service (`addr`:`port`, `proto`) answers for.
#[inline(always)]
pub fn service(addr_be: [u32; 4], port_be: u16, proto: u8, family: u8) -> Option<ReplyNat> {
    let key = ServiceKey { addr_be, port_be, proto, family };
    // SAFETY: the value is copied out at once.
    unsafe { BACKEND_SERVICES.get(&key) }.copied()
}

/// How a packet from a backend's address and port (`key`, in its own
/// direction) goes back.
pub enum Reply {
    /// From a backend's service: translated to this VIP.
    Translate(ReplyNat),
    /// A reply of a flow that reached the backend directly: untranslated.
    Direct,
    /// From a service several VIPs share, of a flow the connection table
    /// has under none of them: which VIP it answers for is unknown.
    NoFlow,
    /// Not from a backend's service.
    NotOurs,
}

/// Decides how a packet that may be a backend's reply goes back.
#[inline(always)]
pub fn reply(key: &FlowKey) -> Reply {
    let mut nat = ReplyNat { vip_addr_be: [0; 4], vip_port_be: 0, flags: 0, vip_id: 0, backend_id: 0 };
    match reply_call(key, &mut nat) {
        TRANSLATE => Reply::Translate(nat),
        DIRECT => Reply::Direct,
        NO_FLOW => Reply::NoFlow,
        _ => Reply::NotOurs,
    }
}

const NOT_OURS: u32 = 0;
const TRANSLATE: u32 = 1;
const DIRECT: u32 = 2;
const NO_FLOW: u32 = 3;

/// [`reply`] as a BPF-to-BPF call: `TRANSLATE` with the VIP in `out`,
/// `DIRECT`, `NO_FLOW` or `NOT_OURS`.
///
/// verifier: not inlined, for the main frame's sake (see [`new_flow_call`]).
#[inline(never)]
fn reply_call(key: &FlowKey, out: &mut ReplyNat) -> u32 {
    let Some(nat) = service(key.src_be, key.src_port_be, key.proto, key.family) else { return NOT_OURS };
    let now = crate::conntrack::now_ns();
    if direct_seen_lately(nat.backend_id, now) && direct_is_live(key, now) {
        return DIRECT;
    }
    if nat.flags & SERVICE_F_SHARED == 0 {
        *out = nat;
        return TRANSLATE;
    }
    shared_call(key, out)
}

/// The part of [`reply_call`] for a service several VIPs share: the
/// client's flow to each VIP the service serves decides, the one pinned to
/// this service (the most recently active if several are); `TRANSLATE`
/// with its VIP in `out`, or `NO_FLOW`.
///
/// verifier: a call of its own, and the flow key built once and changed
/// per candidate: the candidates' keys and copies took stack the stages'
/// chain has no room for.
#[inline(never)]
fn shared_call(key: &FlowKey, out: &mut ReplyNat) -> u32 {
    let service = ServiceKey { addr_be: key.src_be, port_be: key.src_port_be, proto: key.proto, family: key.family };
    // SAFETY: a valid map value, read in place.
    let Some(shared) = (unsafe { SHARED_SERVICES.get(&service) }) else { return NO_FLOW };
    let mut flow = FlowKey {
        src_be: key.dst_be,
        dst_be: [0; 4],
        src_port_be: key.dst_port_be,
        dst_port_be: 0,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    let mut best = MAX_SHARED_VIPS as usize;
    let mut latest = 0;
    // verifier: a bounded loop over the fixed-size array.
    for i in 0..MAX_SHARED_VIPS as usize {
        if i as u32 >= shared.count {
            break;
        }
        let candidate = &shared.vips[i];
        flow.dst_be = candidate.vip_addr_be;
        flow.dst_port_be = candidate.vip_port_be;
        // SAFETY: read in place at once.
        if let Some(state) = unsafe { CONNTRACK.get(&flow) }
            && state.backend_id == candidate.backend_id
            && (best == MAX_SHARED_VIPS as usize || state.last_seen_ns >= latest)
        {
            best = i;
            latest = state.last_seen_ns;
        }
    }
    // verifier: bound the index before using it.
    if best >= MAX_SHARED_VIPS as usize {
        return NO_FLOW;
    }
    *out = shared.vips[best & (MAX_SHARED_VIPS as usize - 1)];
    TRANSLATE
}

/// For an ICMP error quoting a client → backend packet (`quoted`, a
/// translated request): the VIP its client knows, from the flow's reply
/// state while the flow is still pinned to that backend (otherwise the
/// error is stale, and dropped), or from the backend's service. Not for a
/// direct flow's packet, nor for the gateway's own (a probe's).
#[inline(always)]
pub fn quoted_request(quoted: &FlowKey) -> Result<Option<ReplyNat>, Verdict> {
    let Reply::Translate(nat) = reply(&quoted.reversed()) else { return Ok(None) };
    let flow = FlowKey { dst_be: nat.vip_addr_be, dst_port_be: nat.vip_port_be, ..*quoted };
    // SAFETY: the value is copied out at once.
    match unsafe { CONNTRACK.get(&flow) } {
        Some(state) if state.backend_id != nat.backend_id => Err(Verdict::drop(reason::DROP_STALE_REPLY)),
        Some(_) => Ok(Some(nat)),
        // No flow: translated, unless it quotes the gateway's own packet (a probe's).
        None if is_local(quoted.src_be, quoted.family) => Ok(None),
        None => Ok(Some(nat)),
    }
}

/// Whether a live direct flow has the reply 5-tuple `reply_key`.
#[inline(always)]
pub fn direct_is_live(reply_key: &FlowKey, now: u64) -> bool {
    // SAFETY: the value is copied out at once.
    unsafe { DIRECT_FLOWS.get(reply_key) }.is_some_and(|d| !direct_is_expired(d, reply_key.proto, now))
}

/// A client's packet to a backend's service (`flow`, client → backend),
/// not through a VIP: tracked so its replies pass untranslated, and passed
/// to the kernel untouched. Refused when a live balanced flow to the same
/// backend already has its 5-tuple: balanced flows win. `None` when the
/// destination is no backend's service.
#[inline(always)]
pub fn direct(flow: &FlowKey, l4: &L4, now: u64) -> Option<Verdict> {
    let closing = if l4.tcp_flags & (TCP_FIN | TCP_RST) != 0 { FLOW_F_CLOSING } else { 0 };
    match direct_call(flow, closing, now) {
        NOT_OURS => None,
        PASS => Some(Verdict::pass(reason::PASS_DIRECT_FLOW)),
        why => Some(Verdict::drop(why)),
    }
}

/// What [`direct_call`] returns when it passes the packet; drop reasons are
/// never this large.
const PASS: u32 = u32::MAX;

/// [`direct`] as a BPF-to-BPF call: `NOT_OURS`, `PASS`, or a drop reason.
///
/// verifier: not inlined, for the main frame's sake (see [`new_flow_call`]).
#[inline(never)]
fn direct_call(flow: &FlowKey, closing: u32, now: u64) -> u32 {
    let Some(svc) = service(flow.dst_be, flow.dst_port_be, flow.proto, flow.family) else { return NOT_OURS };
    let balanced = FlowKey { dst_be: svc.vip_addr_be, dst_port_be: svc.vip_port_be, ..*flow };
    // SAFETY: the value is copied out at once.
    if let Some(state) = unsafe { CONNTRACK.get(&balanced) }.copied()
        && state.backend_id == svc.backend_id
        && !lb_common::timeouts::is_expired(&state, flow.proto, now)
    {
        return reason::DROP_FLOW_COLLISION;
    }
    // The fast path leaves this backend's replies to the pipeline from now on.
    if let Some(seen) = DIRECT_SEEN.get_ptr_mut(svc.backend_id) {
        // SAFETY: a valid map value; a concurrent write stores the same kind of value.
        unsafe { *seen = now };
    }
    let reply_key = flow.reversed();
    if let Some(entry) = DIRECT_FLOWS.get_ptr_mut(&reply_key) {
        // SAFETY: a valid map value; a concurrent refresh writes the same kind of values.
        unsafe {
            let flags = (*entry).flags | closing;
            if flags == (*entry).flags && now.saturating_sub((*entry).last_seen_ns) < TOUCH_INTERVAL_NS {
                return PASS;
            }
            if !direct_is_expired(&*entry, flow.proto, now) {
                (*entry).last_seen_ns = now;
                (*entry).flags = flags;
                return PASS;
            }
        }
    }
    let entry = DirectFlow { last_seen_ns: now, flags: closing, _pad: 0 };
    let _ = DIRECT_FLOWS.insert(&reply_key, &entry, 0);
    PASS
}
