//! ICMP (IPv4) through the gateway: echo requests to a VIP address are
//! answered (`answer::echo`); errors about packets of balanced flows are
//! translated so they reach the host whose socket they concern.
//!
//! An ICMP error (destination unreachable, fragmentation needed among them;
//! time exceeded; parameter problem) quotes the IP header and at least the
//! first 8 bytes of the packet that caused it (RFC 792): enough for the
//! ports, which is all this needs, so errors quoting no more than that are
//! translated too.
//!
//! - To a VIP, quoting a packet the gateway sent from the VIP (a reply, VIP
//!   → client): a router on the client's side could not deliver it, e.g.
//!   fragmentation needed. The flow is found in `CONNTRACK` (client → VIP)
//!   and the error is steered to the flow's backend: the outer destination
//!   and the quoted source become the backend's address and port, so the
//!   backend's kernel finds its socket and lowers its path MTU.
//! - To a client, quoting a packet the gateway sent to a backend (client →
//!   backend): found by its backend's service; the quoted destination becomes the VIP
//!   again, and the outer source too if the backend itself sent the error,
//!   so the client's kernel matches it to its connection to the VIP.
//!
//! Checksums: the outer IP header's, the quoted IP header's, the quoted
//! TCP/UDP checksum when it is inside the quote, and the ICMP checksum over
//! all of it, each updated incrementally. An error to a VIP address that
//! names no balanced flow is dropped (no host owns the VIP);
//! one to another address that is not about a balanced flow passes.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_V4, PROTO_TCP, PROTO_UDP,
    backend::{BACKEND_STATE_UNUSED, BackendInfo},
    flow::{FlowKey, ReplyNat},
    handshake,
    stats::{direction, reason},
    vip_addr::VipAddrKey,
};

use crate::{
    Verdict, answer, csum, guard,
    maps::{BACKENDS, CONNTRACK, VIP_ADDRS},
    parse::{Ipv4, Ipv4Hdr, ptr_at},
    rewrite, stats,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HLEN: usize = 8;
/// Fragment offset, network byte order: a quoted non-first fragment has no ports.
const IP_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();

/// Verdict for an ICMP packet.
#[inline(always)]
pub fn process(ctx: &XdpContext, v4: &Ipv4) -> Verdict {
    let icmp_off = v4.l3_off + (v4.ihl_bytes & 0x3c);
    let icmp_len = v4.tot_len - v4.ihl_bytes;
    let Some(hdr) = ptr_at::<[u8; ICMP_HLEN]>(ctx, icmp_off) else { return answer::echo(ctx, v4) };
    if icmp_len < ICMP_HLEN {
        return answer::echo(ctx, v4);
    }
    // SAFETY: bounds checked by ptr_at.
    let icmp_type = unsafe { (*hdr)[0] };
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_PARAMETER_PROBLEM {
        return answer::echo(ctx, v4);
    }
    // The checksum's pointer is derived from the checked header, so the
    // verifier knows its bounds.
    let icmp_check = (hdr as usize + 2) as *mut u16;
    // SAFETY: bounds checked by ptr_at.
    let unreachable = handshake::is_unreachable(false, icmp_type, unsafe { (*hdr)[1] });
    match error(ctx, v4, icmp_check, icmp_off, icmp_len, unreachable) {
        Ok(v) | Err(v) => v,
    }
}

/// The quoted packet's IP header and ports, and its TCP/UDP checksum if
/// the quote holds it.
struct Quote {
    ip: *mut Ipv4Hdr,
    /// Source and destination port.
    ports: *mut [u16; 2],
    /// `None` for a UDP checksum of 0 (none) or a TCP one cut off.
    check: Option<*mut u16>,
    proto: u8,
}

impl Quote {
    /// The quoted packet's 5-tuple, in its own direction.
    #[inline(always)]
    fn tuple(&self) -> FlowKey {
        // SAFETY: bounds checked in `quote`.
        let (saddr, daddr, [sport, dport]) = unsafe { ((*self.ip).saddr_be, (*self.ip).daddr_be, *self.ports) };
        FlowKey {
            src_be: [saddr, 0, 0, 0],
            dst_be: [daddr, 0, 0, 0],
            src_port_be: sport,
            dst_port_be: dport,
            proto: self.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }
}

#[inline(always)]
fn error(
    ctx: &XdpContext,
    v4: &Ipv4,
    icmp_check: *mut u16,
    icmp_off: usize,
    icmp_len: usize,
    unreachable: bool,
) -> Result<Verdict, Verdict> {
    // SAFETY: bounds checked in parse_ipv4.
    let (outer_saddr, outer_daddr, ttl) = unsafe { ((*v4.ip).saddr_be, (*v4.ip).daddr_be, (*v4.ip).ttl) };
    let Some(q) = quote(ctx, icmp_off, icmp_len) else { return Err(no_flow(outer_daddr)) };
    let quoted = q.tuple();
    // Errors go to the source of the packet they quote.
    if quoted.src_be[0] != outer_daddr {
        return Err(no_flow(outer_daddr));
    }
    if ttl <= 1 {
        return Err(Verdict::pass(reason::PASS_TTL_EXPIRED));
    }
    if let Some((_, backend_id, backend)) = flow_of_reply(&quoted) {
        stats::count_traffic(backend_id, direction::IN, ctx);
        let (addr, port) = (backend.addr_be[0], backend.port_be);
        rewrite_quote(&q, icmp_check, rewrite::Side::Source, addr, port);
        rewrite::set_address(v4.ip, rewrite::Side::Destination, addr);
        return Ok(rewrite::forward(ctx, v4.eth, v4.ip, reason::REDIRECT_ICMP_ERROR_TO_BACKEND));
    }
    if let Some(nat) = flow_of_request(&quoted)? {
        stats::count_traffic(nat.backend_id, direction::OUT, ctx);
        // Passive health: a datagram the backend did not take.
        if unreachable && q.proto == PROTO_UDP {
            stats::count_unreachable(nat.backend_id);
        }
        let vip = nat.vip_addr_be[0];
        rewrite_quote(&q, icmp_check, rewrite::Side::Destination, vip, nat.vip_port_be);
        // From the backend itself (port unreachable, say): from the VIP now.
        if outer_saddr == quoted.dst_be[0] {
            rewrite::set_address(v4.ip, rewrite::Side::Source, vip);
        }
        return Ok(rewrite::forward(ctx, v4.eth, v4.ip, reason::REDIRECT_ICMP_ERROR_TO_CLIENT));
    }
    Err(no_flow(outer_daddr))
}

/// Finds the quoted packet after the 8-byte ICMP header: an IPv4 header
/// (IHL ≥ 5) and at least 8 bytes of TCP or UDP, all inside the ICMP
/// message; not a non-first fragment.
#[inline(always)]
fn quote(ctx: &XdpContext, icmp_off: usize, icmp_len: usize) -> Option<Quote> {
    let ip_off = icmp_off + ICMP_HLEN;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ip_off)?;
    // SAFETY: bounds checked by ptr_at.
    let (version_ihl, frag_off_be, proto) = unsafe { ((*ip).version_ihl, (*ip).frag_off_be, (*ip).proto) };
    let ihl_bytes = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl_bytes < 20 || frag_off_be & IP_OFFSET_MASK_BE != 0 {
        return None;
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // verifier: the mask keeps the offset visibly bounded (≤ 90 + 60), and
    // the bounds check comes before the length check that implies it.
    let l4_off = ip_off + (ihl_bytes & 0x3c);
    let l4: *mut [u16; 4] = ptr_at(ctx, l4_off)?;
    let quoted = icmp_len - ICMP_HLEN;
    if quoted < ihl_bytes + 8 {
        return None;
    }
    let check = if proto == PROTO_UDP {
        let check = (l4 as usize + 6) as *mut u16;
        // SAFETY: inside the 8 bytes checked above.
        (unsafe { *check } != 0).then_some(check)
    } else {
        let check: Option<*mut u16> = ptr_at(ctx, l4_off + 16);
        check.filter(|_| quoted >= ihl_bytes + 18)
    };
    Some(Quote { ip, ports: l4.cast(), check, proto })
}

/// For a quoted VIP → client packet (a translated reply): the flow's VIP id,
/// backend id and backend, from the client → VIP entry of `CONNTRACK`.
#[inline(always)]
fn flow_of_reply(quoted: &FlowKey) -> Option<(u32, u32, BackendInfo)> {
    // SAFETY: the value is copied out at once.
    let state = unsafe { CONNTRACK.get(quoted.reversed()) }.copied()?;
    let backend = BACKENDS.get(state.backend_id).copied()?;
    (backend.state != BACKEND_STATE_UNUSED && backend.family == FAMILY_V4).then_some((
        state.vip_id,
        state.backend_id,
        backend,
    ))
}

/// For a quoted client → backend packet (a translated request): its reply
/// translation from its backend's service, while the flow is still pinned to that
/// backend (otherwise the error is stale, and dropped).
#[inline(always)]
fn flow_of_request(quoted: &FlowKey) -> Result<Option<ReplyNat>, Verdict> {
    guard::quoted_request(quoted)
}

/// Rewrites one end of the quoted packet, with the quoted IP and TCP/UDP
/// checksums and the ICMP checksum, which covers the whole quote.
#[inline(always)]
fn rewrite_quote(q: &Quote, icmp_check: *mut u16, side: rewrite::Side, new_addr: u32, new_port: u16) {
    // SAFETY: q's pointers were bounds checked in `quote`; icmp_check lies
    // in the ICMP header checked in `process`.
    unsafe {
        let (addr, port) = if side == rewrite::Side::Source {
            (core::ptr::addr_of_mut!((*q.ip).saddr_be), core::ptr::addr_of_mut!((*q.ports)[0]))
        } else {
            (core::ptr::addr_of_mut!((*q.ip).daddr_be), core::ptr::addr_of_mut!((*q.ports)[1]))
        };
        let (old_addr, old_port) = (*addr, *port);
        let mut icmp = *icmp_check;
        *addr = new_addr;
        *port = new_port;
        icmp = csum::replace32(icmp, old_addr, new_addr);
        icmp = csum::replace16(icmp, old_port, new_port);
        let old_ip_check = (*q.ip).check;
        let ip_check = csum::replace32(old_ip_check, old_addr, new_addr);
        (*q.ip).check = ip_check;
        icmp = csum::replace16(icmp, old_ip_check, ip_check);
        if let Some(check) = q.check {
            let old = *check;
            let mut new = csum::replace16(csum::replace32(old, old_addr, new_addr), old_port, new_port);
            if q.proto == PROTO_UDP {
                new = csum::udp_nonzero(new);
            }
            *check = new;
            icmp = csum::replace16(icmp, old, new);
        }
        *icmp_check = icmp;
    }
}

/// An error about no balanced flow: dropped if sent to a VIP address,
/// which no host owns; passed otherwise (ordinary routed traffic).
#[inline(always)]
fn no_flow(daddr: u32) -> Verdict {
    let key = VipAddrKey { addr_be: [daddr, 0, 0, 0], family: FAMILY_V4, _pad: [0; 3] };
    // SAFETY: only tested for presence.
    if unsafe { VIP_ADDRS.get(&key) }.is_some() {
        Verdict::drop(reason::DROP_ICMP_ERROR_NO_FLOW)
    } else {
        Verdict::pass(reason::PASS_NOT_VIP)
    }
}
