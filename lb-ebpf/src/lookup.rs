//! VIP and connection-table lookups: which service a packet is for, and
//! which backend its flow is pinned to.

use lb_common::{
    FAMILY_V4, PROTO_TCP, addr_filter,
    backend::{BACKEND_STATE_UP, BackendInfo},
    flow::FlowKey,
    stats::reason,
    vip::{VIP_F_LIMITED, VipInfo, VipKey},
    vip_addr::VipAddrKey,
};

use crate::{
    Verdict, client_limits,
    conntrack::{self, Pinned},
    embryo, guard, maglev,
    maps::{ADDR_FILTER, BACKENDS, VIP_ADDRS, VIPS},
    parse::{L4, Packet, TCP_ACK, TCP_SYN},
    stats,
};

/// Whether the packet could be to a VIP or from a backend: false when the
/// address filter has neither address (see `lb_common::addr_filter`), and
/// the packet can pass without a map lookup.
#[inline(always)]
pub fn may_be_ours(src_be: &[u32; 4], dst_be: &[u32; 4]) -> bool {
    let set = |addr: &[u32; 4]| ADDR_FILTER.get(addr_filter::slot(addr)).is_some_and(|&v| v != 0);
    set(dst_be) || set(src_be)
}

/// Whether the address filter has the IPv4 address `addr_be`'s slot.
#[inline(always)]
pub fn filter_has(addr_be: u32) -> bool {
    ADDR_FILTER.get(addr_filter::slot(&[addr_be, 0, 0, 0])).is_some_and(|&v| v != 0)
}

/// Whether some VIP listens on `addr_be` (any port or protocol).
#[inline(always)]
pub fn is_vip_addr(addr_be: [u32; 4], family: u8) -> bool {
    if !ADDR_FILTER.get(addr_filter::slot(&addr_be)).is_some_and(|&v| v != 0) {
        return false;
    }
    let key = VipAddrKey { addr_be, family, _pad: [0; 3] };
    // SAFETY: only tested for presence.
    unsafe { VIP_ADDRS.get(&key) }.is_some()
}

/// Whether a packet to `daddr_be` that no VIP serves (no VIP has its port
/// or protocol) must be answered or dropped here: it is to a VIP address
/// the gateway does not own itself. Passed on, the gateway would route it
/// back out by its default route, to the router that sent it, and round
/// again until its TTL ran out.
#[inline(always)]
pub fn refuses_unserved(daddr_be: [u32; 4], family: u8) -> bool {
    is_vip_addr(daddr_be, family) && !guard::is_local(daddr_be, family)
}

/// Whether the IPv4 packet could be ours (see [`may_be_ours`]).
#[inline(always)]
pub fn may_be_ours_v4(pkt: &Packet) -> bool {
    // SAFETY: pkt.ip was bounds checked in parse_ipv4.
    let (saddr, daddr) = unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be) };
    may_be_ours(&[saddr, 0, 0, 0], &[daddr, 0, 0, 0])
}

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
pub fn packet_tuple(pkt: &Packet) -> FlowKey {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv4.
    let (saddr, daddr, sport, dport) =
        unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, (*pkt.ports).src_be, (*pkt.ports).dst_be) };
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

/// Whether the packet opens a flow, as per-client limits count flows: a
/// TCP SYN, or any UDP datagram of a flow the table does not hold.
#[inline(always)]
fn opens_flow(flow: &FlowKey, l4: &L4) -> bool {
    flow.proto != PROTO_TCP || l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Where a client → VIP packet goes: its backend, and whether its flow is
/// tracked (pinned in `CONNTRACK`).
pub struct Pick {
    pub backend_id: u32,
    pub backend: BackendInfo,
    pub tracked: bool,
}

/// The backend for a client → VIP flow: its pinned one while the entry
/// holds (see `conntrack::pinned`) and that backend is up, otherwise a fresh
/// Maglev pick. UDP flows are pinned at once; TCP flows from their first ACK
/// after a SYN seen here (`embryo`), and a flow rescheduled off a backend
/// that went down is pinned again. A flow is never opened from the
/// gateway's own or a backend's address, nor when its replies would collide
/// with a direct flow's (`guard`).
#[inline(always)]
pub fn backend_for_flow(flow: &FlowKey, vip: &VipInfo, l4: &L4, now: u64) -> Result<Pick, Verdict> {
    let pinned = conntrack::pinned(flow, l4, now);
    if let Pinned::Live(state) = pinned {
        // SAFETY: a valid map value.
        let backend_id = unsafe { (*state).backend_id };
        if let Some(backend) = BACKENDS.get(backend_id)
            && backend.state == BACKEND_STATE_UP
        {
            conntrack::touch(state, flow, l4, now);
            return Ok(Pick { backend_id, backend: *backend, tracked: true });
        }
    }
    // Rescheduled: the flow was live, on a backend that is down.
    let rescheduled = matches!(pinned, Pinned::Live(_));
    let limited = vip.flags & VIP_F_LIMITED != 0;
    if limited && !rescheduled && opens_flow(flow, l4) {
        client_limits::check(flow, vip.vip_id, now)?;
    }
    let backend_id = maglev::pick(vip, flow);
    let Some(backend) = BACKENDS.get(backend_id).copied() else {
        return Err(Verdict::drop(reason::DROP_BAD_BACKEND));
    };
    // Slot 0 and backends marked down between a health change and the ring
    // update that follows it take no new flows.
    if backend_id == 0 || backend.state != BACKEND_STATE_UP {
        return Err(Verdict::drop(reason::DROP_NO_BACKEND));
    }
    guard::check_new_flow(flow, backend_id, &backend, now)?;
    if flow.proto == PROTO_TCP && !rescheduled && !embryo::track(flow, l4, now, &pinned) {
        return Ok(Pick { backend_id, backend, tracked: false });
    }
    conntrack::pin(flow, vip.vip_id, limited, backend_id, &backend, l4, now, &pinned);
    stats::count_new_flow(backend_id, rescheduled);
    Ok(Pick { backend_id, backend, tracked: true })
}
