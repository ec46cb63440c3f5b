//! ICMPv6 through the gateway, the twin of `icmp`: echo requests to a VIP
//! address are answered (`answer6::echo`); errors (destination
//! unreachable, packet too big, time exceeded, parameter problem) about
//! packets of balanced flows are translated, steered to the backend or back
//! to the client by the same rules as IPv4. The quote must hold the quoted
//! packet's 40-byte header and 8 bytes of TCP or UDP right after it (no
//! extension headers, as on the fast path).
//!
//! The ICMPv6 checksum also covers a pseudo-header of the outer addresses,
//! so an outer address rewritten is folded into it as well as every quoted
//! change (the quoted TCP/UDP checksum when it is inside the quote).
//! Neighbour discovery and other ICMPv6 pass untouched.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_V6, PROTO_TCP, PROTO_UDP,
    backend::{BACKEND_STATE_UNUSED, BackendInfo},
    flow::{FlowKey, ReplyNat},
    handshake,
    stats::{direction, reason},
};

use crate::{
    Verdict, answer6, csum, guard, lookup,
    maps::{BACKENDS, CONNTRACK},
    parse::ptr_at,
    parse6::{IPV6_HLEN, Ipv6, Ipv6Hdr, is_vip_addr},
    rewrite::Side,
    stats, v6,
};

const ICMP6_HLEN: usize = 8;
/// Error types: destination unreachable, packet too big, time exceeded,
/// parameter problem (RFC 4443); informational ones start at 128.
const ICMP6_ERROR_MAX: u8 = 4;
/// Router solicitation through redirect (RFC 4861): neighbour discovery.
const ICMP6_ND_FIRST: u8 = 133;
const ICMP6_ND_LAST: u8 = 137;

/// Verdict for an ICMPv6 packet.
#[inline(always)]
pub fn process(ctx: &XdpContext, v6: &Ipv6) -> Verdict {
    // SAFETY: bounds checked in ipv6_header.
    let (daddr, hop_limit) = unsafe { ((*v6.ip).daddr_be, (*v6.ip).hop_limit) };
    let icmp_off = v6.l3_off + IPV6_HLEN;
    // Not answered and not balanced, to a VIP address the gateway does not
    // own: dropped, since passed on it would be routed back the way it came.
    let unserved = || {
        if lookup::refuses_unserved(daddr, FAMILY_V6) {
            Verdict::drop(reason::DROP_NO_SERVICE)
        } else {
            Verdict::pass(reason::PASS_NOT_VIP)
        }
    };
    let Some(hdr) = v6.l4_head.filter(|_| v6.payload_len >= ICMP6_HLEN) else { return unserved() };
    // SAFETY: bounds checked by ptr_at.
    let icmp_type = unsafe { (*hdr)[0] }.to_ne_bytes()[0];
    if answer6::is_echo_request(icmp_type) {
        if !is_vip_addr(daddr) {
            return Verdict::pass(reason::PASS_NOT_VIP);
        }
        return answer6::echo(ctx, v6, hdr);
    }
    if (ICMP6_ND_FIRST..=ICMP6_ND_LAST).contains(&icmp_type) {
        // Neighbour discovery is the kernel's, whoever it names.
        return Verdict::pass(reason::PASS_NOT_VIP);
    }
    if icmp_type == 0 || icmp_type > ICMP6_ERROR_MAX {
        return unserved();
    }
    if hop_limit <= 1 {
        return Verdict::pass(reason::PASS_TTL_EXPIRED);
    }
    let icmp_check = (hdr as usize + 2) as *mut u16;
    // SAFETY: bounds checked by ptr_at.
    let code = unsafe { (*hdr)[0] }.to_ne_bytes()[1];
    let unreachable = handshake::is_unreachable(true, icmp_type, code);
    match error(ctx, v6, icmp_check, icmp_off, unreachable) {
        Ok(v) | Err(v) => v,
    }
}

/// The quoted packet's header and ports, and its TCP/UDP checksum if the
/// quote holds it.
struct Quote {
    ip: *mut Ipv6Hdr,
    ports: *mut [u16; 2],
    check: Option<*mut u16>,
    proto: u8,
}

#[inline(always)]
fn error(
    ctx: &XdpContext,
    v6: &Ipv6,
    icmp_check: *mut u16,
    icmp_off: usize,
    unreachable: bool,
) -> Result<Verdict, Verdict> {
    // SAFETY: bounds checked in ipv6_header.
    let (outer_saddr, outer_daddr) = unsafe { ((*v6.ip).saddr_be, (*v6.ip).daddr_be) };
    let Some(q) = quote(ctx, v6, icmp_off) else { return Err(no_flow(outer_daddr)) };
    let quoted = tuple(&q);
    if quoted.src_be != outer_daddr {
        return Err(no_flow(outer_daddr));
    }
    if let Some((_, backend_id, backend)) = flow_of_reply(&quoted) {
        stats::count_traffic(backend_id, direction::IN, ctx);
        rewrite_quote(&q, icmp_check, Side::Source, backend.addr_be, backend.port_be);
        set_outer(v6.ip, icmp_check, Side::Destination, backend.addr_be);
        return Ok(v6::forward(ctx, v6.eth, v6.ip, reason::REDIRECT_ICMP_ERROR_TO_BACKEND));
    }
    if let Some(nat) = flow_of_request(&quoted)? {
        stats::count_traffic(nat.backend_id, direction::OUT, ctx);
        // Passive health: a datagram the backend did not take.
        if unreachable && q.proto == PROTO_UDP {
            stats::count_unreachable(nat.backend_id);
        }
        rewrite_quote(&q, icmp_check, Side::Destination, nat.vip_addr_be, nat.vip_port_be);
        if outer_saddr == quoted.dst_be {
            set_outer(v6.ip, icmp_check, Side::Source, nat.vip_addr_be);
        }
        return Ok(v6::forward(ctx, v6.eth, v6.ip, reason::REDIRECT_ICMP_ERROR_TO_CLIENT));
    }
    Err(no_flow(outer_daddr))
}

/// Finds the quoted packet after the ICMPv6 header: a version-6 header
/// whose next header is TCP or UDP, and 8 bytes of it, inside the message.
#[inline(always)]
fn quote(ctx: &XdpContext, v6: &Ipv6, icmp_off: usize) -> Option<Quote> {
    let ip_off = icmp_off + ICMP6_HLEN;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ip_off)?;
    let l4: *mut [u16; 4] = ptr_at(ctx, ip_off + IPV6_HLEN)?;
    let quoted = v6.payload_len - ICMP6_HLEN;
    if quoted < IPV6_HLEN + 8 {
        return None;
    }
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow_be, proto) = unsafe { ((*ip).vtc_flow_be, (*ip).next_header) };
    if u32::from_be(vtc_flow_be) >> 28 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    let check = if proto == PROTO_UDP {
        let check = (l4 as usize + 6) as *mut u16;
        // SAFETY: inside the 8 bytes checked above.
        (unsafe { *check } != 0).then_some(check)
    } else {
        let check: Option<*mut u16> = ptr_at(ctx, ip_off + IPV6_HLEN + 16);
        check.filter(|_| quoted >= IPV6_HLEN + 18)
    };
    Some(Quote { ip, ports: l4.cast(), check, proto })
}

#[inline(always)]
fn tuple(q: &Quote) -> FlowKey {
    // SAFETY: bounds checked in `quote`.
    let (saddr, daddr, [sport, dport]) = unsafe { ((*q.ip).saddr_be, (*q.ip).daddr_be, *q.ports) };
    FlowKey {
        src_be: saddr,
        dst_be: daddr,
        src_port_be: sport,
        dst_port_be: dport,
        proto: q.proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

/// For a quoted VIP → client packet: the flow's ids and backend.
#[inline(always)]
fn flow_of_reply(quoted: &FlowKey) -> Option<(u32, u32, BackendInfo)> {
    // SAFETY: the value is copied out at once.
    let state = unsafe { CONNTRACK.get(quoted.reversed()) }.copied()?;
    let backend = BACKENDS.get(state.backend_id).copied()?;
    (backend.state != BACKEND_STATE_UNUSED && backend.family == FAMILY_V6).then_some((
        state.vip_id,
        state.backend_id,
        backend,
    ))
}

/// For a quoted client → backend packet: its reply translation, while the
/// flow is still pinned to that backend.
#[inline(always)]
fn flow_of_request(quoted: &FlowKey) -> Result<Option<ReplyNat>, Verdict> {
    guard::quoted_request(quoted)
}

/// Rewrites one end of the quoted packet, with its TCP/UDP checksum and the
/// ICMPv6 checksum.
#[inline(always)]
fn rewrite_quote(q: &Quote, icmp_check: *mut u16, side: Side, new_addr: [u32; 4], new_port: u16) {
    // SAFETY: q's pointers were bounds checked in `quote`; icmp_check lies
    // in the ICMPv6 header checked in `process`.
    unsafe {
        let (old_addr, old_port) = if side == Side::Source {
            let old = ((*q.ip).saddr_be, (*q.ports)[0]);
            (*q.ip).saddr_be = new_addr;
            (*q.ports)[0] = new_port;
            old
        } else {
            let old = ((*q.ip).daddr_be, (*q.ports)[1]);
            (*q.ip).daddr_be = new_addr;
            (*q.ports)[1] = new_port;
            old
        };
        let mut icmp = csum::replace128(*icmp_check, old_addr, new_addr);
        icmp = csum::replace16(icmp, old_port, new_port);
        if let Some(check) = q.check {
            let old = *check;
            let mut new = csum::replace16(csum::replace128(old, old_addr, new_addr), old_port, new_port);
            if q.proto == PROTO_UDP {
                new = csum::udp_nonzero(new);
            }
            *check = new;
            icmp = csum::replace16(icmp, old, new);
        }
        *icmp_check = icmp;
    }
}

/// Rewrites an outer address, which the ICMPv6 pseudo-header covers.
#[inline(always)]
fn set_outer(ip: *mut Ipv6Hdr, icmp_check: *mut u16, side: Side, new_addr: [u32; 4]) {
    // SAFETY: bounds checked in ipv6_header and `process`.
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
        *icmp_check = csum::replace128(*icmp_check, old, new_addr);
    }
}

/// An error about no balanced flow: dropped if sent to a VIP address,
/// passed otherwise.
#[inline(always)]
fn no_flow(daddr: [u32; 4]) -> Verdict {
    if is_vip_addr(daddr) {
        Verdict::drop(reason::DROP_ICMP_ERROR_NO_FLOW)
    } else {
        Verdict::pass(reason::PASS_NOT_VIP)
    }
}
