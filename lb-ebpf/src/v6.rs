//! The IPv6 data path: the IPv4 pipeline for packets without extension
//! headers. VIP lookup with `FAMILY_V6`, the same connection table and
//! Maglev pick, destination (or, for replies, source) address and port
//! rewritten with the L4 checksum updated incrementally (IPv6 has no header
//! checksum; the pseudo-header covers the 128-bit addresses), hop limit
//! decremented, next hop from `bpf_fib_lookup` (AF_INET6), then redirected.
//!
//! ICMPv6 goes to `icmp6` (echo replies, errors of balanced flows). A VIP
//! with no backend up answers like IPv4 (`answer6`: RST, or ICMPv6 port
//! unreachable), and a packet too big for its next hop gets ICMPv6 packet
//! too big (IPv6 routers never fragment). Backends must be IPv6 too; a
//! VIP's IPv4 backend is refused (`drop_bad_backend`).

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, programs::XdpContext};
use lb_common::{
    FAMILY_V6, PROTO_UDP,
    flow::{FlowKey, ReplyNat},
    limits::reply_bucket,
    stats::reason,
    vip::{VipInfo, VipKey},
};

use crate::{
    Verdict, answer, answer6, conntrack, csum, forward,
    guard::{self, Reply},
    icmp6, lookup,
    maps::NextHop,
    maps::VIPS,
    nexthop::{self, Answer, Hop, Query},
    parse::{self, EthHdr, L2, L4},
    parse6::{self, IPV6_HLEN, Ipv6Hdr, PROTO_ICMPV6, Packet6},
    rewrite::{self, Side},
};

/// Traffic class and flow label of the first header word, network byte order.
const IPV6_FLOWINFO_MASK_BE: u32 = 0x0fff_ffffu32.to_be();

/// Everything after the Ethernet header and tags of an IPv6 frame.
#[inline(always)]
pub fn process(ctx: &XdpContext, l2: &L2) -> Result<Verdict, Verdict> {
    let v6 = parse6::ipv6_header(ctx, l2)?;
    if v6.next_header == PROTO_ICMPV6 {
        // Not what the dispatcher saw: not ours to judge.
        return Err(Verdict::pass(reason::PASS_MALFORMED_IP));
    }
    let pkt = parse6::transport(&v6)?;
    // SAFETY: bounds checked in ipv6_header.
    let (saddr, daddr) = unsafe { ((*v6.ip).saddr_be, (*v6.ip).daddr_be) };
    if !lookup::may_be_ours(&saddr, &daddr) {
        return Ok(Verdict::pass(reason::PASS_NOT_VIP));
    }
    if let Some(vip) = vip(&pkt) {
        return match to_backend(ctx, &pkt, &vip) {
            // No backend up (or a client over a limit that answers): tell
            // the client at once rather than let it time out.
            Err(v) => match forward::refusal_of(v.reason, vip.vip_id) {
                Some(kind) => {
                    let l4 = parse::l4_checked_at(ctx, pkt.proto, pkt.l4_off, pkt.l4_len, false)?;
                    Err(forward::refuse_v6(ctx, &pkt, &l4, kind))
                }
                None => Err(v),
            },
            other => other,
        };
    }
    match guard::reply(&tuple(&pkt)) {
        Reply::Translate(nat) => to_client(ctx, &pkt, &nat),
        Reply::Direct => Ok(Verdict::pass(reason::PASS_DIRECT_FLOW)),
        Reply::NoFlow => Err(Verdict::drop(reason::DROP_REPLY_NO_FLOW)),
        // A direct flow's packet, one to a VIP address's unserved port, or another host's.
        Reply::NotOurs => Ok(forward::unmatched_v6(ctx, &pkt)),
    }
}

/// An ICMPv6 frame.
#[inline(always)]
pub fn process_icmp(ctx: &XdpContext, l2: &L2) -> Result<Verdict, Verdict> {
    let v6 = parse6::ipv6_header(ctx, l2)?;
    if v6.next_header != PROTO_ICMPV6 {
        return Err(Verdict::pass(reason::PASS_MALFORMED_IP));
    }
    Err(icmp6::process(ctx, &v6))
}

#[inline(always)]
fn vip(pkt: &Packet6) -> Option<VipInfo> {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse6.
    let (daddr, dport) = unsafe { ((*pkt.ip).daddr_be, (*pkt.ports).dst_be) };
    let key = VipKey { addr_be: daddr, port_be: dport, proto: pkt.proto, family: FAMILY_V6 };
    // SAFETY: the value is copied out at once; VIPS entries are only replaced whole.
    unsafe { VIPS.get(&key) }.copied()
}

/// The packet's 5-tuple, in its own direction.
#[inline(always)]
pub fn tuple(pkt: &Packet6) -> FlowKey {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse6.
    let (saddr, daddr, sport, dport) =
        unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, (*pkt.ports).src_be, (*pkt.ports).dst_be) };
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
    let l4 = parse::l4_checked_at(ctx, pkt.proto, pkt.l4_off, pkt.l4_len, false)?;
    parse6::check_hop_limit(pkt)?;
    let flow = tuple(pkt);
    let now = conntrack::now_ns();
    // No backend up: tell the client at once rather than let it time out.
    let lookup::Pick { backend_id, backend, tracked } = lookup::backend_for_flow(&flow, vip, &l4, now)?;
    if backend.family != FAMILY_V6 {
        return Err(Verdict::drop(reason::DROP_BAD_BACKEND));
    }
    let decision = forward::Decision {
        side: Side::Destination,
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        // A "packet too big" for the client comes from the address it sent to.
        icmp_from_be: flow.dst_be,
        redirect_reason: if tracked || l4.tcp_flags & parse::TCP_SYN != 0 {
            reason::REDIRECT_TO_BACKEND
        } else {
            reason::REDIRECT_UNTRACKED
        },
        vip_id: vip.vip_id,
        backend_id,
        now,
    };
    Ok(forward::plan_v6(ctx, pkt, &l4, &decision))
}

/// Backend → client: the source becomes the VIP again (see `reply`).
#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet6, nat: &ReplyNat) -> Result<Verdict, Verdict> {
    let l4 = parse::l4_checked_at(ctx, pkt.proto, pkt.l4_off, pkt.l4_len, false)?;
    parse6::check_hop_limit(pkt)?;
    let now = conntrack::now_ns();
    let tracked = conntrack::reply_seen(&tuple(pkt), nat, &l4, now)?;
    let vip = nat.vip_addr_be;
    let sent = if tracked { reason::REDIRECT_TO_CLIENT } else { reason::REDIRECT_TO_CLIENT_STATELESS };
    let decision = forward::Decision {
        side: Side::Source,
        addr_be: vip,
        port_be: nat.vip_port_be,
        icmp_from_be: vip,
        redirect_reason: sent,
        vip_id: nat.vip_id,
        backend_id: nat.backend_id,
        now,
    };
    Ok(forward::plan_v6(ctx, pkt, &l4, &decision))
}

/// Rewrites one end of the packet to `addr`:`port` and sends it to its next
/// hop; the IPv6 twin of `rewrite::translate_and_forward`. IPv6 routers
/// never fragment: a packet too big for the next hop is answered with ICMPv6
/// packet too big from `icmp_from` (it stays as it came).
#[inline(always)]
pub fn translate_and_forward(
    ctx: &XdpContext,
    pkt: &Packet6,
    l4: &L4,
    side: Side,
    addr_be: [u32; 4],
    port_be: u16,
    icmp_from_be: [u32; 4],
    redirect_reason: u32,
    now: u64,
) -> Verdict {
    // SAFETY: pkt.ip was bounds checked in parse6.
    let (saddr, daddr) = unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be) };
    let (src, dst) = if side == Side::Destination { (saddr, addr_be) } else { (addr_be, daddr) };
    let Some((hop, answer)) = nexthop::lookup(ctx, query(pkt.ip, src, dst), now) else {
        return Verdict::pass(reason::PASS_FIB_FAILED);
    };
    match hop {
        Hop::Local => return rewrite::local_next_hop(side),
        Hop::TooBig => {
            if answer::allow_reply(reply_bucket::FRAG_NEEDED) {
                return answer6::packet_too_big(ctx, pkt, icmp_from_be, answer.get().mtu);
            }
            nat(pkt, l4, side, addr_be, port_be);
            return Verdict::pass(reason::PASS_FRAG_NEEDED_RATE_LIMITED);
        }
        _ => {}
    }
    nat(pkt, l4, side, addr_be, port_be);
    finish(pkt.eth, pkt.ip, hop, answer, redirect_reason)
}

/// Sends a rewritten packet the way `hop` says, or hands it to the kernel.
#[inline(always)]
fn finish(eth: *mut EthHdr, ip: *mut Ipv6Hdr, hop: Hop, answer: Answer, redirect_reason: u32) -> Verdict {
    match hop {
        Hop::Ready => send(eth, ip, answer.get(), redirect_reason),
        Hop::NoNeigh => Verdict::pass(reason::PASS_NO_NEIGH),
        Hop::TooBig => Verdict::pass(reason::PASS_TOO_BIG),
        Hop::Local => Verdict::pass(reason::PASS_LOCAL_DESTINATION),
        Hop::Failed => Verdict::pass(reason::PASS_FIB_FAILED),
    }
}

/// What the FIB needs of the IPv6 packet at `ip`, once it goes from `src`
/// to `dst`.
#[inline(always)]
fn query(ip: *const Ipv6Hdr, src: [u32; 4], dst: [u32; 4]) -> Query {
    // SAFETY: ip was bounds checked in parse6.
    let (next_header, payload_len_be, vtc_flow_be) =
        unsafe { ((*ip).next_header, (*ip).payload_len_be, (*ip).vtc_flow_be) };
    Query {
        src_be: src,
        dst_be: dst,
        tos_or_flowinfo_be: vtc_flow_be & IPV6_FLOWINFO_MASK_BE,
        tot_len: (IPV6_HLEN + u16::from_be(payload_len_be) as usize) as u16,
        l4_protocol: next_header,
        ipv6: 1,
    }
}

/// Rewrites one end's address and port, with the L4 checksum.
#[inline(always)]
pub fn nat(pkt: &Packet6, l4: &L4, side: Side, new_addr: [u32; 4], new_port: u16) {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse6.
    unsafe {
        let (old_addr, old_port) = if side == Side::Destination {
            let old = ((*pkt.ip).daddr_be, (*pkt.ports).dst_be);
            (*pkt.ip).daddr_be = new_addr;
            (*pkt.ports).dst_be = new_port;
            old
        } else {
            let old = ((*pkt.ip).saddr_be, (*pkt.ports).src_be);
            (*pkt.ip).saddr_be = new_addr;
            (*pkt.ports).src_be = new_port;
            old
        };
        fix_l4_check(pkt, l4, old_addr, new_addr, old_port, new_port);
    }
}

/// The L4 checksum covers the pseudo-header's 128-bit addresses and the ports.
///
/// # Safety
/// `l4.check` must point inside the packet (checked by `l4_checked_at`).
#[inline(always)]
unsafe fn fix_l4_check(pkt: &Packet6, l4: &L4, old: [u32; 4], new: [u32; 4], old_port: u16, new_port: u16) {
    let Some(check) = l4.check() else { return };
    // SAFETY: the caller guarantees check is in bounds.
    let mut sum = csum::replace128(unsafe { *check }, old, new);
    sum = csum::replace16(sum, old_port, new_port);
    if pkt.proto == PROTO_UDP {
        sum = csum::udp_nonzero(sum);
    }
    // SAFETY: as above.
    unsafe { *check = sum };
}

/// Sends a (rewritten) IPv6 packet to `hop`; the hop limit drops by one.
#[inline(always)]
pub fn send(eth: *mut EthHdr, ip: *mut Ipv6Hdr, hop: &NextHop, redirect_reason: u32) -> Verdict {
    // SAFETY: ip and eth were bounds checked in parse6; hop limit checked > 1.
    unsafe {
        (*ip).hop_limit -= 1;
        (*eth).dst = hop.dmac;
        (*eth).src = hop.smac;
    }
    // SAFETY: plain helper call; flags 0.
    let action = unsafe { bpf_redirect(hop.ifindex, 0) } as u32;
    if action == xdp_action::XDP_REDIRECT {
        Verdict { action, reason: redirect_reason }
    } else {
        Verdict::pass(reason::PASS_FIB_FAILED)
    }
}

/// Sends an IPv6 packet already rewritten to its next hop; handed to the
/// kernel as it is when that cannot be done here.
#[inline(always)]
pub fn forward(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv6Hdr, redirect_reason: u32) -> Verdict {
    // SAFETY: ip was bounds checked in parse6.
    let (src, dst) = unsafe { ((*ip).saddr_be, (*ip).daddr_be) };
    match nexthop::lookup(ctx, query(ip, src, dst), conntrack::now_ns()) {
        Some((hop, answer)) => finish(eth, ip, hop, answer, redirect_reason),
        None => Verdict::pass(reason::PASS_FIB_FAILED),
    }
}
