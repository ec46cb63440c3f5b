//! Packet rewriting: NAT of addresses and ports with checksum fix-ups, then
//! MACs and TTL for the next hop, and the redirect.
//!
//! The next hop is asked of the kernel's FIB *before* anything is written,
//! with the addresses the packet will carry: a packet that cannot go on
//! (larger than the next hop's MTU with don't-fragment set) is then still as
//! it arrived, and the client or backend that sent it is told with an ICMP
//! "fragmentation needed" quoting it (`respond::frag_needed`), as a router
//! would, so path MTU discovery works through the gateway.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::stats::reason;

use crate::{
    Verdict, csum,
    parse::{EthHdr, Ipv4Hdr, L4, Packet},
    respond,
};

const AF_INET: u8 = 2;
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

/// What the FIB says about a packet's next hop.
pub enum Fib {
    /// Found: egress device and MACs are in the params.
    Ready,
    /// Route found, neighbour not resolved yet.
    NoNeigh,
    /// Larger than the route's MTU, which it carries.
    TooBig(u16),
    /// No route, or another failure.
    Failed,
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
) -> Verdict {
    // SAFETY: pkt.ip was bounds checked in parse_ipv4.
    let (saddr, daddr, frag_off_be) = unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, (*pkt.ip).frag_off_be) };
    let (src, dst) = if side == Side::Destination { (saddr, addr_be) } else { (addr_be, daddr) };
    // SAFETY: FibParams is plain old data; all-zero is a valid start.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    let hop = lookup(ctx, &mut fib, pkt.ip, src, dst);
    if let Fib::TooBig(mtu) = hop
        && frag_off_be & IP_DF_BE != 0
    {
        return respond::frag_needed(ctx, pkt, icmp_from_be, mtu);
    }
    nat(pkt, l4, side, addr_be, port_be);
    match hop {
        Fib::Ready => send(pkt.eth, pkt.ip, &fib, redirect_reason),
        Fib::NoNeigh => Verdict::pass(reason::PASS_NO_NEIGH),
        Fib::TooBig(_) => Verdict::pass(reason::PASS_TOO_BIG),
        Fib::Failed => Verdict::pass(reason::PASS_FIB_FAILED),
    }
}

/// Sends an IPv4 packet already rewritten to its next hop; handed to the
/// kernel as it is when that cannot be done here.
#[inline(always)]
pub fn forward(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr, redirect_reason: u32) -> Verdict {
    // SAFETY: ip was bounds checked in parse_ipv4.
    let (src, dst) = unsafe { ((*ip).saddr_be, (*ip).daddr_be) };
    // SAFETY: FibParams is plain old data; all-zero is a valid start.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    match lookup(ctx, &mut fib, ip, src, dst) {
        Fib::Ready => send(eth, ip, &fib, redirect_reason),
        Fib::NoNeigh => Verdict::pass(reason::PASS_NO_NEIGH),
        Fib::TooBig(_) => Verdict::pass(reason::PASS_TOO_BIG),
        Fib::Failed => Verdict::pass(reason::PASS_FIB_FAILED),
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
fn nat(pkt: &Packet, l4: &L4, side: Side, new_addr: u32, new_port: u16) {
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
    let Some(check) = l4.check else { return };
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

/// Asks the kernel's FIB for the next hop of the IPv4 packet at `ip` as it
/// will be once it goes from `src_be` to `dst_be`, looked up from the
/// interface it came in on. The FIB checks the route's MTU against the
/// packet's total length.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, fib: &mut FibParams, ip: *const Ipv4Hdr, src_be: u32, dst_be: u32) -> Fib {
    // SAFETY: ip was bounds checked in parse_ipv4.
    unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = (*ip).proto;
        fib.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len_be);
        fib.__bindgen_anon_2.tos = (*ip).tos;
        fib.__bindgen_anon_3.ipv4_src = src_be;
        fib.__bindgen_anon_4.ipv4_dst = dst_be;
    }
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: fib is a valid, writable bpf_fib_lookup for the helper.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibParams>() as i32, 0) };
    fib_result(rc, fib)
}

/// What `bpf_fib_lookup`'s return code `rc` means, for either family.
#[inline(always)]
pub fn fib_result(rc: i64, fib: &FibParams) -> Fib {
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Fib::Ready
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Fib::NoNeigh
    } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the helper wrote the MTU over tot_len.
        Fib::TooBig(unsafe { fib.__bindgen_anon_1.mtu_result })
    } else {
        Fib::Failed
    }
}

/// Sends a (rewritten) IPv4 packet to the next hop `fib` names: the TTL
/// drops by one, as at any router, and the MACs become the hop's.
/// `redirect_reason` is counted on success.
#[inline(always)]
pub fn send(eth: *mut EthHdr, ip: *mut Ipv4Hdr, fib: &FibParams, redirect_reason: u32) -> Verdict {
    decrement_ttl(ip);
    // SAFETY: eth was bounds checked in parse_l2.
    unsafe {
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
    }
    // SAFETY: plain helper call; flags 0.
    let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
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
