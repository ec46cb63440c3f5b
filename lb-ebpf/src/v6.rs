//! The IPv6 data path: the IPv4 pipeline for packets without extension
//! headers. VIP lookup with `FAMILY_V6`, the same connection table and
//! Maglev pick, destination (or, for replies, source) address and port
//! rewritten with the L4 checksum updated incrementally (IPv6 has no header
//! checksum; the pseudo-header covers the 128-bit addresses), hop limit
//! decremented, next hop from `bpf_fib_lookup` (AF_INET6), then redirected.
//!
//! Not (yet) for IPv6: the gateway's own answers (no-backend RST or ICMPv6
//! unreachable, echo replies): a flow to a VIP with no backend up is dropped
//! (`drop_no_backend`), ICMPv6 passes (`pass_not_vip`). Backends must be
//! IPv6 too; a VIP's IPv4 backend is refused (`drop_bad_backend`).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V6, PROTO_UDP,
    flow::{FlowKey, ReplyNat},
    stats::reason,
    vip::{VipInfo, VipKey},
};

use crate::{
    Verdict, conntrack, csum, lookup,
    maps::{REPLY_NAT, VIPS},
    parse::{self, L2, L4},
    parse6::{self, Packet6},
    stats,
};

const AF_INET6: u8 = 10;
/// Traffic class and flow label of the first header word, network byte order.
const IPV6_FLOWINFO_MASK_BE: u32 = 0x0fff_ffffu32.to_be();

/// Everything after the Ethernet header and tags of an IPv6 frame.
#[inline(always)]
pub fn process(ctx: &XdpContext, l2: &L2) -> Result<Verdict, Verdict> {
    let pkt = parse6::parse_ipv6(ctx, l2)?;
    if let Some(vip) = vip(&pkt) {
        return to_backend(ctx, &pkt, &vip);
    }
    // SAFETY: the value is copied out at once.
    if let Some(nat) = unsafe { REPLY_NAT.get(&tuple(&pkt)) }.copied() {
        return to_client(ctx, &pkt, &nat);
    }
    Ok(Verdict::pass(reason::PASS_NOT_VIP))
}

#[inline(always)]
fn vip(pkt: &Packet6) -> Option<VipInfo> {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv6.
    let (daddr, dport) = unsafe { ((*pkt.ip).daddr_be, (*pkt.ports).dst_be) };
    let key = VipKey { addr_be: daddr, port_be: dport, proto: pkt.proto, family: FAMILY_V6 };
    // SAFETY: the value is copied out at once; VIPS entries are only replaced whole.
    unsafe { VIPS.get(&key) }.copied()
}

/// The packet's 5-tuple, in its own direction.
#[inline(always)]
fn tuple(pkt: &Packet6) -> FlowKey {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv6.
    let (saddr, daddr, sport, dport) = unsafe {
        ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, (*pkt.ports).src_be, (*pkt.ports).dst_be)
    };
    FlowKey {
        src_be: saddr,
        dst_be: daddr,
        src_port_be: sport,
        dst_port_be: dport,
        proto: pkt.proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

/// Client → VIP: pin the flow, rewrite the destination to the backend, send it on.
#[inline(always)]
fn to_backend(ctx: &XdpContext, pkt: &Packet6, vip: &VipInfo) -> Result<Verdict, Verdict> {
    let l4 = parse::l4_checked_at(ctx, pkt.proto, pkt.l4_off, pkt.l4_len)?;
    parse6::check_hop_limit(pkt)?;
    let flow = tuple(pkt);
    let (backend_id, backend) = lookup::backend_for_flow(&flow, vip, &l4, conntrack::now_ns())?;
    if backend.family != FAMILY_V6 {
        return Err(Verdict::drop(reason::DROP_BAD_BACKEND));
    }
    stats::count_traffic(vip.vip_id, backend_id, ctx);
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv6.
    unsafe {
        let old_addr = (*pkt.ip).daddr_be;
        let old_port = (*pkt.ports).dst_be;
        (*pkt.ip).daddr_be = backend.addr_be;
        (*pkt.ports).dst_be = backend.port_be;
        fix_l4_check(pkt, &l4, old_addr, backend.addr_be, old_port, backend.port_be);
    }
    Ok(forward(ctx, pkt, reason::REDIRECT_TO_BACKEND))
}

/// Backend → client: the source becomes the VIP again.
#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet6, nat: &ReplyNat) -> Result<Verdict, Verdict> {
    let l4 = parse::l4_checked_at(ctx, pkt.proto, pkt.l4_off, pkt.l4_len)?;
    parse6::check_hop_limit(pkt)?;
    conntrack::reply_seen(&tuple(pkt), nat, &l4, conntrack::now_ns())?;
    stats::count_traffic(nat.vip_id, nat.backend_id, ctx);
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv6.
    unsafe {
        let old_addr = (*pkt.ip).saddr_be;
        let old_port = (*pkt.ports).src_be;
        (*pkt.ip).saddr_be = nat.vip_addr_be;
        (*pkt.ports).src_be = nat.vip_port_be;
        fix_l4_check(pkt, &l4, old_addr, nat.vip_addr_be, old_port, nat.vip_port_be);
    }
    Ok(forward(ctx, pkt, reason::REDIRECT_TO_CLIENT))
}

/// The L4 checksum covers the pseudo-header's 128-bit addresses and the ports.
///
/// # Safety
/// `l4.check` must point inside the packet (checked by `l4_checked_at`).
#[inline(always)]
unsafe fn fix_l4_check(pkt: &Packet6, l4: &L4, old: [u32; 4], new: [u32; 4], old_port: u16, new_port: u16) {
    let Some(check) = l4.check else { return };
    // SAFETY: the caller guarantees check is in bounds.
    let mut sum = unsafe { *check };
    sum = csum::replace32(sum, old[0], new[0]);
    sum = csum::replace32(sum, old[1], new[1]);
    sum = csum::replace32(sum, old[2], new[2]);
    sum = csum::replace32(sum, old[3], new[3]);
    sum = csum::replace16(sum, old_port, new_port);
    if pkt.proto == PROTO_UDP {
        sum = csum::udp_nonzero(sum);
    }
    // SAFETY: as above.
    unsafe { *check = sum };
}

/// Sends a rewritten packet to the next hop the kernel's FIB names; the hop
/// limit drops by one. No neighbour entry yet: handed to the kernel.
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet6, redirect_reason: u32) -> Verdict {
    // SAFETY: FibParams is plain old data; all-zero is a valid start.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: pkt.ip was bounds checked in parse_ipv6.
    unsafe {
        params.family = AF_INET6;
        params.l4_protocol = pkt.proto;
        params.__bindgen_anon_1.tot_len = (size_of::<parse6::Ipv6Hdr>() + pkt.l4_len) as u16;
        params.__bindgen_anon_2.flowinfo = (*pkt.ip).vtc_flow_be & IPV6_FLOWINFO_MASK_BE;
        params.__bindgen_anon_3.ipv6_src = (*pkt.ip).saddr_be;
        params.__bindgen_anon_4.ipv6_dst = (*pkt.ip).daddr_be;
    }
    params.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: params is a valid, writable bpf_fib_lookup for the helper.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut params, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Verdict::pass(reason::PASS_NO_NEIGH);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Verdict::pass(reason::PASS_FIB_FAILED);
    }
    // SAFETY: pkt.ip and pkt.eth were bounds checked; hop limit checked > 1.
    unsafe {
        (*pkt.ip).hop_limit -= 1;
        (*pkt.eth).dst = params.dmac;
        (*pkt.eth).src = params.smac;
    }
    // SAFETY: plain helper call; flags 0.
    let action = unsafe { bpf_redirect(params.ifindex, 0) } as u32;
    if action == xdp_action::XDP_REDIRECT {
        Verdict { action, reason: redirect_reason }
    } else {
        Verdict::pass(reason::PASS_FIB_FAILED)
    }
}
