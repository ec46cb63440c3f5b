//! Packet rewriting: NAT of addresses and ports with checksum fix-ups, then
//! MACs and TTL for the next hop, and the redirect.
//!
//! The next hop (`nexthop`: the kernel's FIB, cached per CPU for a second)
//! is looked up *before* anything is written,
//! with the addresses the packet will carry: a packet that cannot go on
//! (larger than the next hop's MTU with don't-fragment set) is then still as
//! it arrived, and the client or backend that sent it is told with an ICMP
//! "fragmentation needed" quoting it (`answer::frag_needed`), as a router
//! would, so path MTU discovery works through the gateway.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, programs::XdpContext};
use lb_common::{limits::reply_bucket, stats::reason};

use crate::{
    Verdict, answer, conntrack, csum,
    maps::NextHop,
    nexthop::{self, Answer, Hop, Query},
    parse::{EthHdr, Ipv4Hdr, L4, Packet},
};
/// Don't-fragment, network byte order.
const IP_DF_BE: u16 = 0x4000u16.to_be();

/// Which end of the packet NAT rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client → VIP becomes client → backend.
    Destination,
    /// Backend → client becomes VIP → client.
    Source,
}

/// Rewrites one end of a TCP/UDP packet to `addr`:`port` and sends it to
/// its next hop, or, when it is too big for that hop and may not be
/// fragmented, answers its sender with ICMP fragmentation needed from
/// `icmp_from` instead (the packet stays as it came).
///
/// Without a neighbour entry yet, or without a route, the packet goes to
/// the kernel rewritten: it resolves the neighbour (ARP) and forwards it
/// itself; later packets take the fast path. Too big without
/// don't-fragment: rewritten and handed to the kernel, which fragments it.
/// Too big with don't-fragment and over the rate limit of "fragmentation
/// needed": rewritten and handed to the kernel, which answers it.
///
/// A packet whose next hop would be the gateway itself is never rewritten
/// ([`local_next_hop`]).
#[inline(always)]
pub fn translate_and_forward(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &L4,
    side: Side,
    addr_be: u32,
    port_be: u16,
    icmp_from_be: u32,
    redirect_reason: u32,
    now: u64,
) -> Verdict {
    // SAFETY: pkt.ip was bounds checked in parse_ipv4.
    let (saddr, daddr, frag_off_be) = unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, (*pkt.ip).frag_off_be) };
    let (src, dst) = if side == Side::Destination { (saddr, addr_be) } else { (addr_be, daddr) };
    let Some((hop, answer)) = nexthop::lookup(ctx, query(pkt.ip, src, dst), now) else {
        return Verdict::pass(reason::PASS_FIB_FAILED);
    };
    match hop {
        Hop::Local => return local_next_hop(side),
        Hop::TooBig if frag_off_be & IP_DF_BE != 0 => {
            if answer::allow_reply(reply_bucket::FRAG_NEEDED) {
                return answer::frag_needed(ctx, pkt, icmp_from_be, answer.get().mtu);
            }
            nat(pkt, l4, side, addr_be, port_be);
            return Verdict::pass(reason::PASS_FRAG_NEEDED_RATE_LIMITED);
        }
        _ => {}
    }
    nat(pkt, l4, side, addr_be, port_be);
    finish(pkt.eth, pkt.ip, hop, answer, redirect_reason)
}

/// A packet whose translated destination is the gateway itself. A reply
/// (`Side::Source`) to one of the gateway's own addresses is the answer to
/// the gateway's own connection to a backend (a health probe): it goes to
/// the kernel untranslated, to the socket that is waiting for it. A packet
/// to a VIP whose backend is the gateway is dropped: passed as it came, the
/// gateway would route it back out (it does not own the VIP address).
#[inline(always)]
pub fn local_next_hop(side: Side) -> Verdict {
    if side == Side::Destination {
        Verdict::drop(reason::DROP_LOCAL_NEXT_HOP)
    } else {
        Verdict::pass(reason::PASS_LOCAL_DESTINATION)
    }
}

/// Sends a rewritten packet the way `hop` says, or hands it to the kernel.
#[inline(always)]
fn finish(eth: *mut EthHdr, ip: *mut Ipv4Hdr, hop: Hop, answer: Answer, redirect_reason: u32) -> Verdict {
    match hop {
        Hop::Ready => send(eth, ip, answer.get(), redirect_reason),
        Hop::NoNeigh => Verdict::pass(reason::PASS_NO_NEIGH),
        Hop::TooBig => Verdict::pass(reason::PASS_TOO_BIG),
        Hop::Local => Verdict::pass(reason::PASS_LOCAL_DESTINATION),
        Hop::Failed => Verdict::pass(reason::PASS_FIB_FAILED),
    }
}

/// What the FIB needs of the IPv4 packet at `ip`, once it goes from
/// `src_be` to `dst_be`.
#[inline(always)]
fn query(ip: *const Ipv4Hdr, src_be: u32, dst_be: u32) -> Query {
    // SAFETY: ip was bounds checked in parse_ipv4.
    let (proto, tos, tot_len_be) = unsafe { ((*ip).proto, (*ip).tos, (*ip).tot_len_be) };
    Query {
        src_be: [src_be, 0, 0, 0],
        dst_be: [dst_be, 0, 0, 0],
        tos_or_flowinfo_be: u32::from(tos),
        tot_len: u16::from_be(tot_len_be),
        l4_protocol: proto,
        ipv6: 0,
    }
}

/// Sends an IPv4 packet with `side`'s address replaced by `addr_be` (a
/// later fragment, `frag::follow`), looked up before it is rewritten as
/// [`translate_and_forward`] does its first piece: one whose next hop is the
/// gateway itself, or that has no route, is never rewritten.
#[inline(always)]
pub fn set_address_and_forward(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    side: Side,
    addr_be: u32,
    redirect_reason: u32,
) -> Verdict {
    // SAFETY: ip was bounds checked in parse_ipv4.
    let (saddr, daddr) = unsafe { ((*ip).saddr_be, (*ip).daddr_be) };
    let (src, dst) = if side == Side::Destination { (saddr, addr_be) } else { (addr_be, daddr) };
    let Some((hop, answer)) = nexthop::lookup(ctx, query(ip, src, dst), conntrack::now_ns()) else {
        return Verdict::pass(reason::PASS_FIB_FAILED);
    };
    if hop == Hop::Local {
        return local_next_hop(side);
    }
    set_address(ip, side, addr_be);
    finish(eth, ip, hop, answer, redirect_reason)
}

/// Sends an IPv4 packet already rewritten to its next hop; handed to the
/// kernel as it is when that cannot be done here.
#[inline(always)]
pub fn forward(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr, redirect_reason: u32) -> Verdict {
    // SAFETY: ip was bounds checked in parse_ipv4.
    let (src, dst) = unsafe { ((*ip).saddr_be, (*ip).daddr_be) };
    match nexthop::lookup(ctx, query(ip, src, dst), conntrack::now_ns()) {
        Some((hop, answer)) => finish(eth, ip, hop, answer, redirect_reason),
        None => Verdict::pass(reason::PASS_FIB_FAILED),
    }
}

/// Rewrites the source or destination address of an IPv4 header, with its
/// checksum (and nothing else: for packets without ports, or whose L4
/// checksum the caller fixes).
#[inline(always)]
pub fn set_address(ip: *mut Ipv4Hdr, side: Side, new_addr: u32) {
    // SAFETY: bounds checked in parse_ipv4.
    unsafe {
        let old = if side == Side::Source {
            let old = (*ip).saddr_be;
            (*ip).saddr_be = new_addr;
            old
        } else {
            let old = (*ip).daddr_be;
            (*ip).daddr_be = new_addr;
            old
        };
        (*ip).check = csum::replace32((*ip).check, old, new_addr);
    }
}

/// Rewrites one end's address and port, with both checksums.
#[inline(always)]
pub fn nat(pkt: &Packet, l4: &L4, side: Side, new_addr: u32, new_port: u16) {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv4.
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
        (*pkt.ip).check = csum::replace32((*pkt.ip).check, old_addr, new_addr);
        fix_l4_check(pkt, l4, old_addr, new_addr, old_port, new_port);
    }
}

/// The L4 checksum covers the pseudo-header's addresses and the ports.
///
/// # Safety
/// `l4.check` must point inside the packet (checked by `l4_checked`).
#[inline(always)]
unsafe fn fix_l4_check(pkt: &Packet, l4: &L4, old_addr: u32, new_addr: u32, old_port: u16, new_port: u16) {
    let Some(check) = l4.check() else { return };
    // SAFETY: the caller guarantees check is in bounds.
    let mut sum = unsafe { *check };
    sum = csum::replace32(sum, old_addr, new_addr);
    sum = csum::replace16(sum, old_port, new_port);
    if pkt.proto == lb_common::PROTO_UDP {
        sum = csum::udp_nonzero(sum);
    }
    // SAFETY: as above.
    unsafe { *check = sum };
}

/// Sends a (rewritten) IPv4 packet to `hop`: the TTL drops by one, as at
/// any router, and the MACs become the hop's. `redirect_reason` is counted
/// on success.
#[inline(always)]
pub fn send(eth: *mut EthHdr, ip: *mut Ipv4Hdr, hop: &NextHop, redirect_reason: u32) -> Verdict {
    decrement_ttl(ip);
    // SAFETY: eth was bounds checked in parse_l2.
    unsafe {
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

/// TTL shares a 16-bit checksum word with the protocol byte.
#[inline(always)]
fn decrement_ttl(ip: *mut Ipv4Hdr) {
    // SAFETY: ip was bounds checked in parse_ipv4; ttl was checked > 1.
    unsafe {
        let word = (ip as usize + 8) as *const u16;
        let old = core::ptr::read_unaligned(word);
        (*ip).ttl -= 1;
        let new = core::ptr::read_unaligned(word);
        (*ip).check = csum::replace16((*ip).check, old, new);
    }
}
