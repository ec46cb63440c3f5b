//! The last stage, which writes the packet: rewrite a balanced packet and
//! send it to its next hop, or refuse it with an answer built in place.
//!
//! The stages before it (`crate::dispatch`: parse, find the VIP or the
//! flow, pick the backend) end by writing a [`Plan`], what to rewrite to
//! what or which refusal to send, into this CPU's `FORWARD_PLAN` slot and
//! returning [`ACTION_FORWARD`]; `lb_xdp` then calls [`stage`], which asks
//! for the next hop (`nexthop`), rewrites and redirects (`rewrite`, `v6`),
//! or answers the sender when the packet is too big for that hop; or
//! refuses it (`answer`, `answer6`).
//!
//! verifier: the split is about the 512 bytes of stack BPF allows along a
//! call chain. The next-hop lookup is a call of its own
//! (`nexthop::lookup_call`); made from inside a stage that also holds the
//! flow's keys, their frames together outgrew the limit. From here the
//! chain is `lb_xdp` → this stage → the lookup, and the keys' stage has
//! already returned. The answers' builders (checksums over quoted headers)
//! need many registers, whose spills took room too. Packet pointers may
//! not be stored in a map, so the plan holds offsets and this stage checks
//! each pointer again.

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::{
    PROTO_TCP, handshake,
    stats::{direction, reason},
};

use lb_common::flow::FlowKey;

use aya_ebpf::bindings::xdp_action;

use crate::{
    Verdict, answer, answer6, conntrack, guard, lookup,
    maps::{FORWARD_PLAN, HOPS_BY_BACKEND, HOPS_BY_CLIENT},
    nexthop,
    parse::{self, L4, Packet, Ports},
    parse6::{Ipv6Hdr, Packet6},
    rewrite::{self, Side},
    stats, v6,
};

/// Not an XDP action (those are 0..=4): the packet goes on to [`stage`].
pub const ACTION_FORWARD: u32 = 0xff;

/// What the forward stage does with the packet; one per CPU, written by the
/// stage that decided and read by [`stage`] right after.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Plan {
    /// The new address of the rewritten end (IPv4 in word 0).
    pub addr_be: [u32; 4],
    /// Where a "too big" answer comes from: the address the sender used.
    pub icmp_from_be: [u32; 4],
    /// `conntrack::now_ns` of this packet.
    pub now: u64,
    /// Counted when the packet is redirected.
    pub redirect_reason: u32,
    /// Counted as traffic of this VIP and backend.
    pub vip_id: u32,
    pub backend_id: u32,
    /// The new port of the rewritten end.
    pub port_be: u16,
    /// Offsets from the start of the frame; `check_off` 0 when the L4
    /// header has no checksum to fix (UDP without one).
    pub l3_off: u16,
    pub l4_off: u16,
    pub l4_len: u16,
    pub check_off: u16,
    /// 1: the source is rewritten (a reply); 0: the destination.
    pub source: u8,
    pub ipv6: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub first_fragment: u8,
    /// `FORWARD`, `REFUSE_*` or `UNMATCHED`.
    pub kind: u8,
    pub _pad: [u8; 6],
}

/// A plan that forwards.
pub const FORWARD: u8 = 0;
/// A plan that refuses: no backend up (`answer::NO_BACKEND`).
pub const REFUSE_NO_BACKEND: u8 = 1;
/// A plan that refuses: no VIP of the address serves the port or protocol
/// (`answer::NO_SERVICE`).
pub const REFUSE_NO_SERVICE: u8 = 2;
/// A TCP/UDP packet to no VIP and from no backend's service: a direct
/// flow's packet (`guard::direct`), one to a VIP address's unserved port
/// (refused), or another host's (passed).
pub const UNMATCHED: u8 = 3;
/// A plan that refuses: the client is over its VIP's new-connection rate
/// (`answer::LIMITED_RATE`).
pub const REFUSE_LIMITED_RATE: u8 = 4;
/// A plan that refuses: the client has its VIP's most concurrent flows
/// (`answer::LIMITED_CONNECTIONS`).
pub const REFUSE_LIMITED_CONNECTIONS: u8 = 5;

/// How a refusal of a client → VIP packet (`why`, a drop reason) is
/// answered, if it is: no backend up always is; a client over a limit is
/// when its VIP's limits say so.
#[inline(always)]
pub fn refusal_of(why: u32, vip_id: u32) -> Option<u8> {
    match why {
        reason::DROP_NO_BACKEND => Some(REFUSE_NO_BACKEND),
        reason::DROP_LIMITED_RATE if crate::client_limits::answers(vip_id) => Some(REFUSE_LIMITED_RATE),
        reason::DROP_LIMITED_CONNECTIONS if crate::client_limits::answers(vip_id) => Some(REFUSE_LIMITED_CONNECTIONS),
        _ => None,
    }
}

/// What a stage decided about a packet of a balanced flow, before it is
/// written down as a [`Plan`].
pub struct Decision {
    pub side: Side,
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub icmp_from_be: [u32; 4],
    pub redirect_reason: u32,
    pub vip_id: u32,
    pub backend_id: u32,
    pub now: u64,
}

/// Hands an IPv4 packet to the forward stage.
#[inline(always)]
pub fn plan_v4(ctx: &XdpContext, pkt: &Packet, l4: &L4, d: &Decision) -> Verdict {
    write(ctx, d, l4, 0, pkt.proto, pkt.l3_off, pkt.l4_off, pkt.l4_len, pkt.first_fragment, FORWARD)
}

/// Hands an IPv6 packet to the forward stage.
#[inline(always)]
pub fn plan_v6(ctx: &XdpContext, pkt: &Packet6, l4: &L4, d: &Decision) -> Verdict {
    write(ctx, d, l4, 1, pkt.proto, pkt.l3_off, pkt.l4_off, pkt.l4_len, false, FORWARD)
}

/// Hands an IPv4 packet to the forward stage to be refused (`REFUSE_*`).
#[inline(always)]
pub fn refuse_v4(ctx: &XdpContext, pkt: &Packet, l4: &L4, refusal: u8) -> Verdict {
    write(ctx, &Decision::NONE, l4, 0, pkt.proto, pkt.l3_off, pkt.l4_off, pkt.l4_len, pkt.first_fragment, refusal)
}

/// Hands an IPv6 packet to the forward stage to be refused (`REFUSE_*`).
#[inline(always)]
pub fn refuse_v6(ctx: &XdpContext, pkt: &Packet6, l4: &L4, refusal: u8) -> Verdict {
    write(ctx, &Decision::NONE, l4, 1, pkt.proto, pkt.l3_off, pkt.l4_off, pkt.l4_len, false, refusal)
}

/// Hands an IPv4 packet that matched nothing to the forward stage
/// (`UNMATCHED`): its L4 header is not checked yet.
#[inline(always)]
pub fn unmatched_v4(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    let l4 = L4 { check: pkt.ports.cast(), has_check: false, tcp_flags: 0 };
    write(ctx, &Decision::NONE, &l4, 0, pkt.proto, pkt.l3_off, pkt.l4_off, pkt.l4_len, pkt.first_fragment, UNMATCHED)
}

/// Hands an IPv6 packet that matched nothing to the forward stage
/// (`UNMATCHED`): its L4 header is not checked yet.
#[inline(always)]
pub fn unmatched_v6(ctx: &XdpContext, pkt: &Packet6) -> Verdict {
    let l4 = L4 { check: pkt.ports.cast(), has_check: false, tcp_flags: 0 };
    write(ctx, &Decision::NONE, &l4, 1, pkt.proto, pkt.l3_off, pkt.l4_off, pkt.l4_len, false, UNMATCHED)
}

impl Decision {
    /// What a refusal carries: nothing to rewrite.
    const NONE: Decision = Decision {
        side: Side::Destination,
        addr_be: [0; 4],
        port_be: 0,
        icmp_from_be: [0; 4],
        redirect_reason: 0,
        vip_id: 0,
        backend_id: 0,
        now: 0,
    };
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the fields of a plan, written in one place")]
fn write(
    ctx: &XdpContext,
    d: &Decision,
    l4: &L4,
    ipv6: u8,
    proto: u8,
    l3_off: usize,
    l4_off: usize,
    l4_len: usize,
    first_fragment: bool,
    kind: u8,
) -> Verdict {
    let Some(plan) = FORWARD_PLAN.get_ptr_mut(0) else { return Verdict::drop(reason::DROP_BAD_BACKEND) };
    let check_off = if l4.has_check { l4.check as usize - ctx.data() } else { 0 };
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    unsafe {
        (*plan).addr_be = d.addr_be;
        (*plan).icmp_from_be = d.icmp_from_be;
        (*plan).now = d.now;
        (*plan).redirect_reason = d.redirect_reason;
        (*plan).vip_id = d.vip_id;
        (*plan).backend_id = d.backend_id;
        (*plan).port_be = d.port_be;
        (*plan).l3_off = l3_off as u16;
        (*plan).l4_off = l4_off as u16;
        (*plan).l4_len = l4_len as u16;
        (*plan).check_off = check_off as u16;
        (*plan).source = u8::from(d.side == Side::Source);
        (*plan).ipv6 = ipv6;
        (*plan).proto = proto;
        (*plan).tcp_flags = l4.tcp_flags;
        (*plan).first_fragment = u8::from(first_fragment);
        (*plan).kind = kind;
    }
    Verdict { action: ACTION_FORWARD, reason: d.redirect_reason }
}

/// The forward stage, as a BPF-to-BPF call; returns its packed verdict.
#[inline(never)]
pub fn stage(raw: *mut xdp_md) -> u64 {
    let ctx = XdpContext::new(raw);
    let not_planned = Verdict::drop(reason::DROP_BAD_BACKEND).pack();
    let Some(plan) = FORWARD_PLAN.get_ptr_mut(0) else { return not_planned };
    // SAFETY: this CPU's slot, written by the stage that just returned.
    let p = unsafe { &*plan };
    let verdict = if p.ipv6 != 0 { forward_v6(&ctx, p) } else { forward_v4(&ctx, p) };
    let Some(verdict) = verdict else { return not_planned };
    if p.kind != FORWARD {
        return verdict.pack();
    }
    if verdict.reason != reason::PASS_LOCAL_DESTINATION && verdict.reason != reason::DROP_LOCAL_NEXT_HOP {
        let dir = if p.source != 0 { direction::OUT } else { direction::IN };
        stats::count_traffic(p.backend_id, dir, &ctx);
        if p.proto == PROTO_TCP && handshake::may_count(p.tcp_flags) {
            count_handshake(&ctx, p);
        }
    }
    if verdict.action == xdp_action::XDP_REDIRECT {
        remember_hop(raw);
    }
    verdict.pack()
}

/// Counts a balanced SYN or RST segment for passive health
/// (`lb_common::handshake`): a client's SYN to its backend, or the
/// backend's SYN+ACK or RST answering one. Only the RST needs its sequence
/// number, read from the packet (the rewrite leaves it alone).
#[inline(always)]
fn count_handshake(ctx: &XdpContext, p: &Plan) {
    let event = if p.source == 0 {
        handshake::request_event(p.tcp_flags)
    } else if p.tcp_flags & parse::TCP_RST != 0 {
        // verifier: bound the offset before using it (≤ 82 + 40).
        let Some(tcp) = parse::ptr_at::<[u32; 2]>(ctx, usize::from(p.l4_off) & 0x7f) else { return };
        // SAFETY: bounds checked by ptr_at; word 1 is the sequence number.
        handshake::reply_event(p.tcp_flags, u32::from_be(unsafe { (*tcp)[1] }))
    } else {
        handshake::reply_event(p.tcp_flags, 1)
    };
    stats::count_handshake(p.backend_id, event);
}

/// Keeps the next hop this packet went to for the fast path (`fast`): by
/// backend for a packet to one, by client for a reply. Reads this CPU's
/// plan and next-hop answer, which nothing has replaced since.
///
/// verifier: a call of its own, copying map value to map value; inlined,
/// its copies took stack the forward stage's chain has no room for.
#[inline(never)]
fn remember_hop(raw: *mut xdp_md) {
    let ctx = XdpContext::new(raw);
    let Some(plan) = FORWARD_PLAN.get_ptr(0) else { return };
    // SAFETY: this CPU's slot.
    let p = unsafe { &*plan };
    let Some(hop) = nexthop::last_answer_ptr() else { return };
    if p.source == 0 {
        if let Some(slot) = HOPS_BY_BACKEND.get_ptr_mut(p.backend_id) {
            // SAFETY: this CPU's slots, distinct maps.
            unsafe { *slot = *hop };
        }
        return;
    }
    // The client is the destination the reply was sent to.
    let l3_off = usize::from(p.l3_off) & 0x1f;
    let client = if p.ipv6 != 0 {
        let Some(ip) = parse::ptr_at::<Ipv6Hdr>(&ctx, l3_off) else { return };
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*ip).daddr_be }
    } else {
        let Some(ip) = parse::ptr_at::<parse::Ipv4Hdr>(&ctx, l3_off) else { return };
        // SAFETY: bounds checked by ptr_at.
        [unsafe { (*ip).daddr_be }, 0, 0, 0]
    };
    if let Some(slot) = HOPS_BY_CLIENT.get_ptr_mut(nexthop::client_slot(&client)) {
        // SAFETY: this CPU's slots, distinct maps.
        unsafe {
            (*slot).dst_be = client;
            (*slot).ipv6 = u32::from(p.ipv6);
            (*slot).hop = *hop;
        }
    }
}

/// The L4 header of the plan, found again.
#[inline(always)]
fn l4_of(ctx: &XdpContext, p: &Plan) -> Option<L4> {
    let has_check = p.check_off != 0;
    // Without a checksum the field is never written; the L4 header stands in.
    let off = if has_check { p.check_off } else { p.l4_off };
    // verifier: bound the offset before using it (≤ 82 + 16).
    let check = parse::ptr_at::<u16>(ctx, usize::from(off) & 0x7f)?;
    Some(L4 { check, has_check, tcp_flags: p.tcp_flags })
}

#[inline(always)]
fn refusal(p: &Plan) -> &'static answer::Refusal {
    match p.kind {
        REFUSE_NO_SERVICE => &answer::NO_SERVICE,
        REFUSE_LIMITED_RATE => &answer::LIMITED_RATE,
        REFUSE_LIMITED_CONNECTIONS => &answer::LIMITED_CONNECTIONS,
        _ => &answer::NO_BACKEND,
    }
}

/// A packet to no VIP and from no backend's service (`key`, its 5-tuple):
/// tracked and passed if it goes to a backend's service directly; refused
/// (`refuse_no_service`) if it goes to a VIP address that no VIP of which
/// serves it; passed untouched otherwise. Only packets this stage owns have
/// their L4 header judged.
#[inline(always)]
fn unmatched(ctx: &XdpContext, p: &Plan, key: FlowKey, refuse_no_service: impl FnOnce(&L4) -> Verdict) -> Verdict {
    let l4 =
        parse::l4_checked_at(ctx, p.proto, usize::from(p.l4_off) & 0x7f, usize::from(p.l4_len), p.first_fragment != 0);
    if lookup::may_be_ours(&[0; 4], &key.dst_be)
        && let Ok(l4) = &l4
        && let Some(verdict) = guard::direct(&key, l4, conntrack::now_ns())
    {
        return verdict;
    }
    if !lookup::refuses_unserved(key.dst_be, key.family) {
        return Verdict::pass(reason::PASS_NOT_VIP);
    }
    match l4 {
        Ok(l4) => refuse_no_service(&l4),
        Err(malformed) => malformed,
    }
}

#[inline(always)]
fn side(p: &Plan) -> Side {
    if p.source != 0 { Side::Source } else { Side::Destination }
}

#[inline(always)]
fn forward_v4(ctx: &XdpContext, p: &Plan) -> Option<Verdict> {
    // verifier: bound the offsets before using them (14..22, ≤ 82).
    let (l3_off, l4_off) = (usize::from(p.l3_off) & 0x1f, usize::from(p.l4_off) & 0x7f);
    let pkt = Packet {
        eth: parse::ptr_at(ctx, 0)?,
        ip: parse::ptr_at(ctx, l3_off)?,
        ports: parse::ptr_at::<Ports>(ctx, l4_off)?,
        l3_off,
        l4_off,
        l4_len: usize::from(p.l4_len),
        proto: p.proto,
        first_fragment: p.first_fragment != 0,
    };
    if p.kind == UNMATCHED {
        return Some(unmatched(ctx, p, lookup::packet_tuple(&pkt), |l4| {
            answer::refuse(ctx, &pkt, l4, &answer::NO_SERVICE)
        }));
    }
    let l4 = l4_of(ctx, p)?;
    if p.kind != FORWARD {
        return Some(answer::refuse(ctx, &pkt, &l4, refusal(p)));
    }
    let (addr, from) = (p.addr_be[0], p.icmp_from_be[0]);
    Some(rewrite::translate_and_forward(ctx, &pkt, &l4, side(p), addr, p.port_be, from, p.redirect_reason, p.now))
}

#[inline(always)]
fn forward_v6(ctx: &XdpContext, p: &Plan) -> Option<Verdict> {
    let l3_off = usize::from(p.l3_off) & 0x1f;
    let l4_off = l3_off + crate::parse6::IPV6_HLEN;
    let pkt = Packet6 {
        eth: parse::ptr_at(ctx, 0)?,
        ip: parse::ptr_at::<Ipv6Hdr>(ctx, l3_off)?,
        ports: parse::ptr_at::<Ports>(ctx, l4_off)?,
        l3_off,
        l4_off,
        l4_len: usize::from(p.l4_len),
        proto: p.proto,
    };
    if p.kind == UNMATCHED {
        return Some(unmatched(ctx, p, v6::tuple(&pkt), |l4| answer6::refuse(ctx, &pkt, l4, &answer::NO_SERVICE)));
    }
    let l4 = l4_of(ctx, p)?;
    if p.kind != FORWARD {
        return Some(answer6::refuse(ctx, &pkt, &l4, refusal(p)));
    }
    Some(v6::translate_and_forward(
        ctx,
        &pkt,
        &l4,
        side(p),
        p.addr_be,
        p.port_be,
        p.icmp_from_be,
        p.redirect_reason,
        p.now,
    ))
}
