//! Packet rewriting: NAT of addresses and ports with checksum fix-ups, then
//! MACs and TTL for the next hop, and the redirect.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::backend::BackendInfo;

use crate::{
    Verdict, csum,
    parse::{L4, Packet},
};

const AF_INET: u8 = 2;

/// Client → VIP becomes client → backend: destination address and port.
#[inline(always)]
pub fn destination(pkt: &Packet, l4: &L4, backend: &BackendInfo) {
    let new_addr = backend.addr_be[0];
    let new_port = backend.port_be;
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv4.
    unsafe {
        let old_addr = (*pkt.ip).daddr_be;
        let old_port = (*pkt.ports).dst_be;
        (*pkt.ip).daddr_be = new_addr;
        (*pkt.ip).check = csum::replace32((*pkt.ip).check, old_addr, new_addr);
        (*pkt.ports).dst_be = new_port;
        fix_l4_check(pkt, l4, old_addr, new_addr, old_port, new_port);
    }
}

/// Backend → client becomes VIP → client: source address and port.
#[inline(always)]
pub fn source(pkt: &Packet, l4: &L4, addr_be: u32, port_be: u16) {
    // SAFETY: pkt.ip and pkt.ports were bounds checked in parse_ipv4.
    unsafe {
        let old_addr = (*pkt.ip).saddr_be;
        let old_port = (*pkt.ports).src_be;
        (*pkt.ip).saddr_be = addr_be;
        (*pkt.ip).check = csum::replace32((*pkt.ip).check, old_addr, addr_be);
        (*pkt.ports).src_be = port_be;
        fix_l4_check(pkt, l4, old_addr, addr_be, old_port, port_be);
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

/// Sends a rewritten packet to its next hop: the kernel's FIB names the
/// egress interface and MACs; the TTL drops by one, as at any router.
///
/// Without a neighbour entry yet, the packet goes to the kernel, which
/// resolves it (ARP) and forwards this packet itself; later ones take the
/// fast path. `redirect_reason` is counted on success.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, redirect_reason: u32) -> Verdict {
    use lb_common::stats::reason;

    // SAFETY: FibParams is plain old data; all-zero is a valid start.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: pkt.ip was bounds checked in parse_ipv4.
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = (*pkt.ip).proto;
        params.__bindgen_anon_1.tot_len = u16::from_be((*pkt.ip).tot_len_be);
        params.__bindgen_anon_2.tos = (*pkt.ip).tos;
        params.__bindgen_anon_3.ipv4_src = (*pkt.ip).saddr_be;
        params.__bindgen_anon_4.ipv4_dst = (*pkt.ip).daddr_be;
    }
    params.ifindex = ctx.ingress_ifindex() as u32;

    // SAFETY: params is a valid, writable bpf_fib_lookup for the helper.
    let rc = unsafe {
        bpf_fib_lookup(ctx.ctx.cast(), &mut params, size_of::<FibParams>() as i32, 0)
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Verdict::pass(reason::PASS_NO_NEIGH);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Verdict::pass(reason::PASS_FIB_FAILED);
    }
    decrement_ttl(pkt);
    // SAFETY: pkt.eth was bounds checked in parse_ipv4.
    unsafe {
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

/// TTL shares a 16-bit checksum word with the protocol byte.
#[inline(always)]
fn decrement_ttl(pkt: &Packet) {
    // SAFETY: pkt.ip was bounds checked in parse_ipv4; ttl was checked > 1.
    unsafe {
        let word = (pkt.ip as usize + 8) as *const u16;
        let old = core::ptr::read_unaligned(word);
        (*pkt.ip).ttl -= 1;
        let new = core::ptr::read_unaligned(word);
        (*pkt.ip).check = csum::replace16((*pkt.ip).check, old, new);
    }
}
