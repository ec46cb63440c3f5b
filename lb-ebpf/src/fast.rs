//! The fast path: the packets a gateway sees most, handled in one short
//! call before the staged pipeline (`crate::dispatch`) is entered at all.
//!
//! It takes untagged TCP and UDP over IPv4 without options or
//! fragmentation, or over IPv6 without extension headers, whose headers
//! pass the same checks as in the pipeline, and only:
//! - a packet of a live, pinned flow to a VIP whose backend is up and whose
//!   next hop this CPU learned within the last second (`HOPS_BY_BACKEND`);
//! - a backend's reply from its service, on a flow pinned to that backend,
//!   when no direct flow to the backend was seen lately (`DIRECT_SEEN`), to a
//!   client whose next hop this CPU learned within the last second
//!   (`HOPS_BY_CLIENT`);
//! - a packet whose addresses are neither a VIP's nor a backend's (passed).
//!
//! Anything else, or any doubt (no entry, an expired one, a SYN, a backend
//! not up, a next hop not cached, a packet too big for it), falls back to
//! the pipeline, which decides as before and fills the caches this path
//! reads. So the fast path never decides differently from the pipeline; it
//! only skips the lookups whose answers it has cached.
//!
//! The two families share the code through [`Family`]; each is a
//! BPF-to-BPF call of its own (verifier: so its frame is not on the
//! pipeline's chain of calls, see `crate::dispatch`).

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::{
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
    backend::BACKEND_STATE_UP,
    flow::{FlowKey, ReplyNat, SERVICE_F_SHARED},
    guard::ServiceKey,
    handshake,
    limits::NEXT_HOP_TTL_NS,
    stats::{direction, reason},
    timeouts::is_expired,
};

use crate::{
    Verdict, conntrack, guard,
    maps::{BACKEND_SERVICES, BACKENDS, CONNTRACK, HOPS_BY_BACKEND, HOPS_BY_CLIENT, NextHop},
    nexthop::client_slot,
    parse::{EthHdr, Ipv4Hdr, L4, Packet, Ports, TCP_SYN, opaque_data_end, ptr_at},
    parse6::{IPV6_HLEN, Ipv6Hdr, Packet6},
    rewrite::{self, Side},
    stats, v6,
};

/// What a stage returns when the pipeline must decide.
pub const FALLBACK: u64 = u64::MAX;

const ETH_HLEN: usize = 14;
/// Ethertypes, network byte order.
pub const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();

/// A parsed packet: `(packet, source, destination, L4 length)`.
type Parsed<P> = (P, [u32; 4], [u32; 4], usize);

/// What the fast path needs of an address family.
trait Family {
    const FAMILY: u8;
    /// The packet, as the family's rewrite functions take it.
    type Packet;

    /// The plain header after the Ethernet header, checked: `(packet,
    /// source, destination, L4 length)`, or `None` for anything the
    /// pipeline must see.
    fn parse(ctx: &XdpContext, eth: *mut EthHdr) -> Option<Parsed<Self::Packet>>;
    fn proto(pkt: &Self::Packet) -> u8;
    fn ports(pkt: &Self::Packet) -> *mut Ports;
    /// Whether the address filter has the address's slot.
    fn filter_has(addr_be: &[u32; 4]) -> bool;
    /// Rewrites one end, with checksums.
    fn nat(pkt: &Self::Packet, l4: &L4, side: Side, addr_be: [u32; 4], port_be: u16);
    /// Hop limit, MACs, redirect.
    fn send(pkt: &Self::Packet, hop: &NextHop, redirect_reason: u32) -> Verdict;
}

struct V4;
struct V6;

impl Family for V4 {
    const FAMILY: u8 = FAMILY_V4;
    type Packet = Packet;

    #[inline(always)]
    fn parse(ctx: &XdpContext, eth: *mut EthHdr) -> Option<Parsed<Packet>> {
        /// Version 4, IHL 5: no options.
        const VERSION_IHL_PLAIN: u8 = 0x45;
        /// More-fragments flag and fragment offset, network byte order.
        const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();
        let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        let (version_ihl, proto, frag_off_be, ttl, tot_len_be, saddr, daddr) = unsafe {
            (
                (*ip).version_ihl,
                (*ip).proto,
                (*ip).frag_off_be,
                (*ip).ttl,
                (*ip).tot_len_be,
                (*ip).saddr_be,
                (*ip).daddr_be,
            )
        };
        // ICMP (errors quote balanced flows), options, fragments, expiring
        // TTLs: the pipeline's.
        if version_ihl != VERSION_IHL_PLAIN || frag_off_be & IP_MF_OFFSET_MASK_BE != 0 || ttl <= 1 {
            return None;
        }
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let tot_len = usize::from(u16::from_be(tot_len_be));
        if tot_len < 20 || ctx.data() + ETH_HLEN + tot_len > opaque_data_end(ctx) {
            return None;
        }
        let l4_off = ETH_HLEN + 20;
        let ports = ptr_at(ctx, l4_off)?;
        let pkt =
            Packet { eth, ip, ports, l3_off: ETH_HLEN, l4_off, l4_len: tot_len - 20, proto, first_fragment: false };
        Some((pkt, [saddr, 0, 0, 0], [daddr, 0, 0, 0], tot_len - 20))
    }

    #[inline(always)]
    fn proto(pkt: &Packet) -> u8 {
        pkt.proto
    }

    #[inline(always)]
    fn ports(pkt: &Packet) -> *mut Ports {
        pkt.ports
    }

    #[inline(always)]
    fn filter_has(addr_be: &[u32; 4]) -> bool {
        crate::lookup::filter_has(addr_be[0])
    }

    #[inline(always)]
    fn nat(pkt: &Packet, l4: &L4, side: Side, addr_be: [u32; 4], port_be: u16) {
        rewrite::nat(pkt, l4, side, addr_be[0], port_be);
    }

    #[inline(always)]
    fn send(pkt: &Packet, hop: &NextHop, redirect_reason: u32) -> Verdict {
        rewrite::send(pkt.eth, pkt.ip, hop, redirect_reason)
    }
}

impl Family for V6 {
    const FAMILY: u8 = FAMILY_V6;
    type Packet = Packet6;

    #[inline(always)]
    fn parse(ctx: &XdpContext, eth: *mut EthHdr) -> Option<Parsed<Packet6>> {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at.
        let (vtc_flow_be, payload_len_be, proto, hop_limit, saddr, daddr) = unsafe {
            (
                (*ip).vtc_flow_be,
                (*ip).payload_len_be,
                (*ip).next_header,
                (*ip).hop_limit,
                (*ip).saddr_be,
                (*ip).daddr_be,
            )
        };
        // ICMPv6, extension headers, expiring hop limits: the pipeline's.
        if u32::from_be(vtc_flow_be) >> 28 != 6 || hop_limit <= 1 || (proto != PROTO_TCP && proto != PROTO_UDP) {
            return None;
        }
        let payload_len = usize::from(u16::from_be(payload_len_be));
        if ctx.data() + ETH_HLEN + IPV6_HLEN + payload_len > opaque_data_end(ctx) {
            return None;
        }
        let l4_off = ETH_HLEN + IPV6_HLEN;
        let ports = ptr_at(ctx, l4_off)?;
        let pkt = Packet6 { eth, ip, ports, l3_off: ETH_HLEN, l4_off, l4_len: payload_len, proto };
        Some((pkt, saddr, daddr, payload_len))
    }

    #[inline(always)]
    fn proto(pkt: &Packet6) -> u8 {
        pkt.proto
    }

    #[inline(always)]
    fn ports(pkt: &Packet6) -> *mut Ports {
        pkt.ports
    }

    #[inline(always)]
    fn filter_has(addr_be: &[u32; 4]) -> bool {
        crate::lookup::may_be_ours(&[0; 4], addr_be)
    }

    #[inline(always)]
    fn nat(pkt: &Packet6, l4: &L4, side: Side, addr_be: [u32; 4], port_be: u16) {
        v6::nat(pkt, l4, side, addr_be, port_be);
    }

    #[inline(always)]
    fn send(pkt: &Packet6, hop: &NextHop, redirect_reason: u32) -> Verdict {
        v6::send(pkt.eth, pkt.ip, hop, redirect_reason)
    }
}

/// The fast path for an untagged IPv4 frame: a packed verdict, or [`FALLBACK`].
#[inline(never)]
pub fn stage_v4(raw: *mut xdp_md) -> u64 {
    stage::<V4>(raw)
}

/// The fast path for an untagged IPv6 frame: a packed verdict, or [`FALLBACK`].
#[inline(never)]
pub fn stage_v6(raw: *mut xdp_md) -> u64 {
    stage::<V6>(raw)
}

#[inline(always)]
fn stage<F: Family>(raw: *mut xdp_md) -> u64 {
    let ctx = XdpContext::new(raw);
    match try_fast::<F>(&ctx) {
        Some(verdict) => verdict.pack(),
        None => FALLBACK,
    }
}

#[inline(always)]
fn try_fast<F: Family>(ctx: &XdpContext) -> Option<Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let (pkt, saddr, daddr, l4_len) = F::parse(ctx, eth)?;
    let (to_vip, from_backend) = (F::filter_has(&daddr), F::filter_has(&saddr));
    if !to_vip && !from_backend {
        return Some(Verdict::pass(reason::PASS_NOT_VIP));
    }
    let proto = F::proto(&pkt);
    let l4 = l4(ctx, proto, ETH_HLEN + (if F::FAMILY == FAMILY_V6 { IPV6_HLEN } else { 20 }), l4_len)?;
    let ports = F::ports(&pkt);
    // SAFETY: bounds checked when the packet was parsed.
    let (sport, dport) = unsafe { ((*ports).src_be, (*ports).dst_be) };
    let key = FlowKey {
        src_be: saddr,
        dst_be: daddr,
        src_port_be: sport,
        dst_port_be: dport,
        proto,
        family: F::FAMILY,
        _pad: [0; 2],
    };
    let tot_len = l4_len + if F::FAMILY == FAMILY_V6 { IPV6_HLEN } else { 20 };
    let now = conntrack::now_ns();
    if to_vip && let Some(verdict) = to_backend::<F>(ctx, &pkt, &l4, &key, tot_len, now) {
        return Some(verdict);
    }
    if from_backend {
        return to_client::<F>(ctx, &pkt, &l4, &key, tot_len, now);
    }
    None
}

/// The TCP or UDP header at `l4_off`, checked as `parse::l4_checked` does:
/// its length, and the checksum's place.
#[inline(always)]
fn l4(ctx: &XdpContext, proto: u8, l4_off: usize, l4_len: usize) -> Option<L4> {
    if proto == PROTO_TCP {
        let hdr: *mut [u8; 20] = ptr_at(ctx, l4_off)?;
        // SAFETY: bounds checked by ptr_at; byte 12 holds the data offset.
        let doff = usize::from(unsafe { (*hdr)[12] } >> 4) * 4;
        if l4_len < 20 || doff < 20 || doff > l4_len {
            return None;
        }
        // SAFETY: as above; byte 13 holds the flags.
        let tcp_flags = unsafe { (*hdr)[13] };
        let check = (hdr as usize + 16) as *mut u16;
        Some(L4 { check, has_check: true, tcp_flags })
    } else {
        let hdr: *mut [u16; 4] = ptr_at(ctx, l4_off)?;
        // SAFETY: bounds checked by ptr_at; word 2 is the UDP length.
        let udp_len = usize::from(u16::from_be(unsafe { (*hdr)[2] }));
        if udp_len < 8 || l4_len < 8 || udp_len > l4_len {
            return None;
        }
        let check = (hdr as usize + 6) as *mut u16;
        // SAFETY: bounds checked by ptr_at.
        let has_check = unsafe { *check } != 0;
        Some(L4 { check, has_check, tcp_flags: 0 })
    }
}

/// A packet of a pinned flow to a VIP: rewritten to its backend.
#[inline(always)]
fn to_backend<F: Family>(
    ctx: &XdpContext,
    pkt: &F::Packet,
    l4: &L4,
    key: &FlowKey,
    tot_len: usize,
    now: u64,
) -> Option<Verdict> {
    if l4.tcp_flags & TCP_SYN != 0 {
        return None;
    }
    let state = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a valid map value; copied out once.
    let current = unsafe { *state };
    if is_expired(&current, key.proto, now) {
        return None;
    }
    let backend = BACKENDS.get(current.backend_id)?;
    if backend.state != BACKEND_STATE_UP || backend.family != F::FAMILY {
        return None;
    }
    let hop = fresh(HOPS_BY_BACKEND.get(current.backend_id)?, now, tot_len)?;
    conntrack::touch(state, key, l4, now);
    F::nat(pkt, l4, Side::Destination, backend.addr_be, backend.port_be);
    let verdict = F::send(pkt, hop, reason::REDIRECT_TO_BACKEND);
    stats::count_traffic(current.backend_id, direction::IN, ctx);
    Some(verdict)
}

/// A backend's reply from its service: translated to the VIP it serves.
#[inline(always)]
fn to_client<F: Family>(
    ctx: &XdpContext,
    pkt: &F::Packet,
    l4: &L4,
    key: &FlowKey,
    tot_len: usize,
    now: u64,
) -> Option<Verdict> {
    // A SYN+ACK or RST: counted for passive health by the pipeline
    // (`lb_common::handshake`), so never taken here.
    if handshake::may_count(l4.tcp_flags) {
        return None;
    }
    let service = ServiceKey { addr_be: key.src_be, port_be: key.src_port_be, proto: key.proto, family: F::FAMILY };
    // SAFETY: the value is copied out at once.
    let nat: ReplyNat = unsafe { BACKEND_SERVICES.get(&service) }.copied()?;
    // A service several VIPs share: the pipeline finds which.
    if nat.flags & SERVICE_F_SHARED != 0 {
        return None;
    }
    // A direct flow to this backend within a connection's lifetime: its
    // replies may be untranslated; the pipeline tells them apart.
    if guard::direct_seen_lately(nat.backend_id, now) {
        return None;
    }
    // The flow pinned to another backend (a stale reply), or not at all: the
    // pipeline's to judge. A reply keeps its flow alive.
    let flow = FlowKey {
        src_be: key.dst_be,
        dst_be: nat.vip_addr_be,
        src_port_be: key.dst_port_be,
        dst_port_be: nat.vip_port_be,
        proto: key.proto,
        family: F::FAMILY,
        _pad: [0; 2],
    };
    let state = CONNTRACK.get_ptr_mut(&flow)?;
    // SAFETY: a valid map value.
    if unsafe { (*state).backend_id } != nat.backend_id {
        return None;
    }
    let cached = HOPS_BY_CLIENT.get(client_slot(&key.dst_be))?;
    if cached.dst_be != key.dst_be || cached.ipv6 != u32::from(F::FAMILY == FAMILY_V6) {
        return None;
    }
    let hop = fresh(&cached.hop, now, tot_len)?;
    conntrack::touch(state, &flow, l4, now);
    F::nat(pkt, l4, Side::Source, nat.vip_addr_be, nat.vip_port_be);
    let verdict = F::send(pkt, hop, reason::REDIRECT_TO_CLIENT);
    stats::count_traffic(nat.backend_id, direction::OUT, ctx);
    Some(verdict)
}

/// A cached next hop still within its time and big enough for the packet.
#[inline(always)]
fn fresh(hop: &NextHop, now: u64, tot_len: usize) -> Option<&NextHop> {
    let learned = hop.ifindex != 0 && now.saturating_sub(hop.refreshed_ns) < NEXT_HOP_TTL_NS;
    (learned && tot_len <= usize::from(hop.mtu)).then_some(hop)
}
