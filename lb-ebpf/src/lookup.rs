//! VIP and connection-table lookups: which service a packet is for, and
//! which backend its flow is pinned to.

use lb_common::{
    FAMILY_V4,
    backend::{BACKEND_STATE_UP, BackendInfo},
    flow::{FlowKey, FlowState, ReplyNat, flow_hash},
    stats::reason,
    vip::{VipInfo, VipKey},
};

use crate::{
    Verdict, maglev,
    maps::{BACKENDS, CONNTRACK, REPLY_NAT, VIPS},
    parse::{L4, Packet},
    stats,
};

/// The VIP this packet is addressed to, if any.
#[inline(always)]
pub fn vip(pkt: &Packet) -> Option<VipInfo> {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv4.
    let (daddr, dport) = unsafe { ((*pkt.ip).daddr_be, (*pkt.ports).dst_be) };
    let key = VipKey { addr_be: [daddr, 0, 0, 0], port_be: dport, proto: pkt.proto, family: FAMILY_V4 };
    // SAFETY: the value is copied out at once; VIPS entries are only replaced whole.
    unsafe { VIPS.get(&key) }.copied()
}

/// The packet's 5-tuple, in its own direction.
#[inline(always)]
pub fn flow_key(pkt: &Packet, _l4: &L4) -> FlowKey {
    packet_tuple(pkt)
}

#[inline(always)]
fn packet_tuple(pkt: &Packet) -> FlowKey {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv4.
    let (saddr, daddr, sport, dport) = unsafe {
        ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, (*pkt.ports).src_be, (*pkt.ports).dst_be)
    };
    FlowKey {
        src_be: [saddr, 0, 0, 0],
        dst_be: [daddr, 0, 0, 0],
        src_port_be: sport,
        dst_port_be: dport,
        proto: pkt.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// The reply translation for a backend → client packet of a balanced flow.
#[inline(always)]
pub fn reply_nat(pkt: &Packet) -> Option<ReplyNat> {
    let key = packet_tuple(pkt);
    // SAFETY: the value is copied out at once.
    unsafe { REPLY_NAT.get(&key) }.copied()
}

/// The backend for a client → VIP flow: its pinned one while that is up,
/// otherwise a fresh Maglev pick, which is then pinned (with its reply
/// translation) for the rest of the flow.
#[inline(always)]
pub fn backend_for_flow(flow: &FlowKey, vip: &VipInfo) -> Result<(u32, BackendInfo), Verdict> {
    // SAFETY: the value is copied out at once.
    let pinned = unsafe { CONNTRACK.get(flow) }.copied();
    if let Some(state) = pinned
        && let Some(backend) = BACKENDS.get(state.backend_id)
        && backend.state == BACKEND_STATE_UP
    {
        return Ok((state.backend_id, *backend));
    }
    let backend_id = maglev::pick(vip, flow_hash(flow));
    let Some(backend) = BACKENDS.get(backend_id).copied() else {
        return Err(Verdict::drop(reason::DROP_BAD_BACKEND));
    };
    // Slot 0 and backends marked down between a health change and the ring
    // update that follows it take no new flows.
    if backend_id == 0 || backend.state != BACKEND_STATE_UP {
        return Err(Verdict::drop(reason::DROP_NO_BACKEND));
    }
    pin_flow(flow, vip, backend_id, &backend);
    stats::count_new_flow(vip.vip_id, backend_id, pinned.is_some());
    Ok((backend_id, backend))
}

/// Records the flow in both directions. A failed insert only costs a
/// re-pick on the next packet, which Maglev answers the same way.
#[inline(always)]
fn pin_flow(flow: &FlowKey, vip: &VipInfo, backend_id: u32, backend: &BackendInfo) {
    let state = FlowState { backend_id, vip_id: vip.vip_id };
    let _ = CONNTRACK.insert(flow, &state, 0);
    let reply_key = FlowKey {
        src_be: backend.addr_be,
        dst_be: flow.src_be,
        src_port_be: backend.port_be,
        dst_port_be: flow.src_port_be,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    let nat = ReplyNat {
        vip_addr_be: flow.dst_be,
        vip_port_be: flow.dst_port_be,
        _pad: 0,
        vip_id: vip.vip_id,
        backend_id,
    };
    let _ = REPLY_NAT.insert(&reply_key, &nat, 0);
}
