//! Answers the gateway sends itself (not replies of balanced flows, which
//! `reply` translates), built in place from the packet that
//! asked and sent back out the device it came in on (`Verdict::send_back`), always from
//! the VIP's address:
//!
//! - a TCP segment to a VIP with no backend up gets a RST (RFC 793's reset
//!   generation: if the segment has ACK, `seq = its ack`; otherwise RST+ACK
//!   with `seq = 0`, `ack = its seq + its length`, SYN and FIN counting
//!   one); options and payload are cut off. A RST is never answered.
//! - a UDP datagram to a VIP with no backend up gets ICMP destination
//!   unreachable, port unreachable (type 3 code 3), quoting its IP header
//!   and first 8 bytes (RFC 792).
//! - an ICMP echo request to a VIP address gets an echo reply.
//! - a packet of a balanced flow too big for its next hop, with
//!   don't-fragment set, gets ICMP fragmentation needed (type 3 code 4) with
//!   the hop's MTU (RFC 1191), from the VIP, quoting it like an unreachable.
//!
//! - a TCP segment or UDP datagram to a VIP address on a port no VIP of
//!   that address serves gets a RST or port unreachable like the above.
//!
//! Each kind has its own token bucket per CPU (`limits::reply_bucket`), so
//! pings cannot starve path MTU discovery; over it the packet is dropped
//! and counted, except a packet too big for its next hop, which then goes
//! to the kernel (rewritten), whose own ICMP rate limits apply.
//! Rebuilt replies carry TTL 64, IP id 0 and don't-fragment; checksums of rebuilt headers are
//! computed from scratch; the echo reply keeps its IP header but for the
//! swapped addresses and TTL 64, its checksums updated incrementally.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, PROTO_ICMP, PROTO_TCP, limits::reply_bucket, stats::reason, vip_addr::VipAddrKey};

use crate::{
    Verdict, conntrack, csum, guard,
    maps::{REPLY_BUCKETS, VIP_ADDRS},
    parse::{EthHdr, Ipv4, L4, Packet, TCP_RST, ptr_at},
};

pub(crate) const REPLY_TTL: u8 = 64;
/// ICMP header plus the new IP header an unreachable puts before the quote.
const ICMP_ERR_HDRS: usize = 28;
/// Largest quote: a 60-byte IP header and 8 bytes, in 16-bit words.
const MAX_QUOTE_WORDS: usize = 34;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

// The RST header arithmetic lives in lb-common, where it is tested on the host.
pub(crate) use lb_common::tcp::{rst_header, word as w};

/// Takes one reply's worth of credit from this CPU's bucket for `kind`
/// (`reply_bucket::*`); false when there is not enough. Credit refills with
/// elapsed time, capped at the kind's burst.
#[inline(always)]
pub(crate) fn allow_reply(kind: u32) -> bool {
    // verifier: bound the index before using it (kind is a constant at every call site).
    let kind = kind.min(reply_bucket::COUNT - 1);
    let ns_per_reply = 1_000_000_000 / reply_bucket::RATE_PER_SEC[kind as usize];
    let cap_ns = ns_per_reply * reply_bucket::BURST[kind as usize];
    let Some(bucket) = REPLY_BUCKETS.get_ptr_mut(kind) else { return false };
    let now = conntrack::now_ns();
    // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
    unsafe {
        let [credit, last] = &mut *bucket;
        let refilled = credit.saturating_add(now.saturating_sub(*last)).min(cap_ns);
        *last = now;
        if refilled < ns_per_reply {
            *credit = refilled;
            return false;
        }
        *credit = refilled - ns_per_reply;
    }
    true
}

/// The swapped MACs of the frame: (new destination, new source).
#[inline(always)]
pub(crate) fn macs(eth: *mut EthHdr) -> ([u8; 6], [u8; 6]) {
    // SAFETY: eth was bounds checked in parse_ipv4.
    unsafe { ((*eth).src, (*eth).dst) }
}

#[inline(always)]
pub(crate) fn write_macs(ctx: &XdpContext, dst: [u8; 6], src: [u8; 6]) -> Option<()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
    }
    Some(())
}

/// Cuts the frame to `len` bytes (never grows it).
#[inline(always)]
pub(crate) fn truncate(ctx: &XdpContext, len: usize) -> Option<()> {
    let cur = ctx.data_end() - ctx.data();
    if cur > len {
        // SAFETY: the helper checks the new length itself.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((cur - len) as i32)) } != 0 {
            return None;
        }
    }
    Some(())
}

/// A new IPv4 header (no options) with its checksum.
#[inline(always)]
fn ip_header(tot_len: u16, frag_be: u16, proto: u8, saddr: u32, daddr: u32) -> [u16; 10] {
    let mut h = [
        w(0x45, 0),
        tot_len.to_be(),
        0,
        frag_be,
        w(REPLY_TTL, proto),
        0,
        saddr as u16,
        (saddr >> 16) as u16,
        daddr as u16,
        (daddr >> 16) as u16,
    ];
    h[5] = csum::finish(csum::add_words(0, &h));
    h
}

/// Why the gateway refuses a TCP segment or UDP datagram itself, and the
/// reasons and rate limit that go with it.
#[derive(Clone, Copy)]
pub struct Refusal {
    /// `reply_bucket::*`.
    pub bucket: u32,
    /// Not answered (a RST, or the answer could not be built).
    pub dropped: u32,
    pub rate_limited: u32,
    pub rst_sent: u32,
    pub unreachable_sent: u32,
}

/// A VIP with no backend up.
pub const NO_BACKEND: Refusal = Refusal {
    bucket: reply_bucket::NO_BACKEND,
    dropped: reason::DROP_NO_BACKEND,
    rate_limited: reason::DROP_NO_BACKEND_RATE_LIMITED,
    rst_sent: reason::TX_RST_NO_BACKEND,
    unreachable_sent: reason::TX_ICMP_UNREACHABLE_NO_BACKEND,
};

/// A VIP address, on a port or protocol none of its VIPs serves.
pub const NO_SERVICE: Refusal = Refusal {
    bucket: reply_bucket::NO_SERVICE,
    dropped: reason::DROP_NO_SERVICE,
    rate_limited: reason::DROP_NO_SERVICE_RATE_LIMITED,
    rst_sent: reason::TX_RST_NO_SERVICE,
    unreachable_sent: reason::TX_ICMP_UNREACHABLE_NO_SERVICE,
};

/// A client over its VIP's new-connection rate (`[vip.limits]`).
pub const LIMITED_RATE: Refusal = Refusal {
    bucket: reply_bucket::LIMITED,
    dropped: reason::DROP_LIMITED_RATE,
    rate_limited: reason::DROP_LIMITED_UNANSWERED,
    rst_sent: reason::TX_RST_LIMITED,
    unreachable_sent: reason::TX_ICMP_UNREACHABLE_LIMITED,
};

/// A client with its VIP's most concurrent flows (`[vip.limits]`).
pub const LIMITED_CONNECTIONS: Refusal = Refusal {
    bucket: reply_bucket::LIMITED,
    dropped: reason::DROP_LIMITED_CONNECTIONS,
    rate_limited: reason::DROP_LIMITED_UNANSWERED,
    rst_sent: reason::TX_RST_LIMITED,
    unreachable_sent: reason::TX_ICMP_UNREACHABLE_LIMITED,
};

/// Answers a TCP segment with a RST, a UDP datagram with ICMP port
/// unreachable, within `why`'s rate limit; a RST is never answered.
#[inline(always)]
pub fn refuse(ctx: &XdpContext, pkt: &Packet, l4: &L4, why: &Refusal) -> Verdict {
    let not_answered = Verdict::drop(why.dropped);
    if pkt.proto == PROTO_TCP && l4.tcp_flags & TCP_RST != 0 {
        return not_answered;
    }
    if !allow_reply(why.bucket) {
        return Verdict::drop(why.rate_limited);
    }
    let sent = if pkt.proto == PROTO_TCP {
        tcp_rst(ctx, pkt, l4, why.rst_sent)
    } else {
        port_unreachable(ctx, pkt, why.unreachable_sent)
    };
    sent.unwrap_or(not_answered)
}

/// Rewrites a TCP segment into the RST that answers it.
#[inline(always)]
fn tcp_rst(ctx: &XdpContext, pkt: &Packet, l4: &L4, sent: u32) -> Option<Verdict> {
    // verifier: the masks keep offsets visibly small (14, 18 or 22; ≤ 82).
    let l3_off = pkt.l3_off & 0x1f;
    let tcp: *mut [u16; 10] = ptr_at(ctx, pkt.l4_off & 0x7f)?;
    let (dst_mac, src_mac) = macs(pkt.eth);
    // SAFETY: pkt.ip bounds checked in parse_ipv4, tcp by ptr_at.
    let (saddr, daddr, t) = unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, *tcp) };
    let th = rst_header(&t, l4.tcp_flags, pkt.l4_len);

    truncate(ctx, l3_off + 40)?;
    write_macs(ctx, dst_mac, src_mac)?;
    // The reply goes from the VIP (the segment's destination) back to its source.
    let ip = ip_header(40, 0x4000u16.to_be(), PROTO_TCP, daddr, saddr);
    let mut th = th;
    let pseudo =
        csum::add32(csum::add32(0, daddr), saddr) + u32::from(u16::from(PROTO_TCP).to_be()) + u32::from(20u16.to_be());
    th[8] = csum::finish(csum::add_words(pseudo, &th));
    let out: *mut [[u16; 10]; 2] = ptr_at(ctx, l3_off)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *out = [ip, th] };
    Some(Verdict::send_back(ctx, sent))
}

/// Turns a UDP datagram into the ICMP port unreachable that answers it.
#[inline(always)]
fn port_unreachable(ctx: &XdpContext, pkt: &Packet, sent: u32) -> Option<Verdict> {
    // SAFETY: pkt.ip bounds checked in parse_ipv4.
    let vip = unsafe { (*pkt.ip).daddr_be };
    icmp_error(ctx, pkt, w(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH), 0, vip, sent)
}

/// The answer to a packet too big for its next hop (`mtu` bytes) that may
/// not be fragmented: ICMP destination unreachable, fragmentation needed
/// (type 3 code 4) with the next-hop MTU (RFC 1191), from `from_be`, sent
/// back the way the packet came. The caller has taken the credit
/// (`allow_reply(reply_bucket::FRAG_NEEDED)`).
#[inline(always)]
pub fn frag_needed(ctx: &XdpContext, pkt: &Packet, from_be: u32, mtu: u16) -> Verdict {
    let code = w(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED);
    icmp_error(ctx, pkt, code, mtu, from_be, reason::TX_ICMP_FRAG_NEEDED)
        // Could not be built (no headroom): the kernel gets it as it came.
        .unwrap_or(Verdict::pass(reason::PASS_TOO_BIG))
}

/// Turns a packet into an ICMP error about it (`type_code`, and `mtu` in the
/// second half of the rest-of-header word, 0 unless fragmentation needed)
/// from `from_be` to the packet's source: room for a new IP and ICMP header
/// is made in front, the MACs (and VLAN tags) move there, and the packet is
/// cut after its IP header and first 8 bytes (RFC 792).
#[inline(always)]
fn icmp_error(ctx: &XdpContext, pkt: &Packet, type_code: u16, mtu: u16, from_be: u32, sent: u32) -> Option<Verdict> {
    let l3_off = pkt.l3_off & 0x1f;
    let (dst_mac, src_mac) = macs(pkt.eth);
    // SAFETY: pkt.ip bounds checked in parse_ipv4.
    let (saddr, version_ihl) = unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).version_ihl) };
    let quote = ((version_ihl & 0x0f) as usize) * 4 + 8;

    // SAFETY: the helper checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ICMP_ERR_HDRS as i32)) } != 0 {
        return None;
    }
    truncate(ctx, l3_off + ICMP_ERR_HDRS + quote)?;
    // Move MACs, tags and ethertype (at most 22 bytes) to the new front;
    // what this copies past them is overwritten by the new IP header.
    let from: *mut [u16; 11] = ptr_at(ctx, ICMP_ERR_HDRS)?;
    let to: *mut [u16; 11] = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at; the two do not overlap (22 < 28).
    unsafe { *to = *from };
    write_macs(ctx, dst_mac, src_mac)?;

    let mtu_be = mtu.to_be();
    let mut sum = u32::from(type_code) + u32::from(mtu_be);
    // verifier: a bounded loop; every word read is bounds checked.
    for i in 0..MAX_QUOTE_WORDS {
        if i * 2 >= quote {
            break;
        }
        let word: *mut u16 = ptr_at(ctx, l3_off + ICMP_ERR_HDRS + i * 2)?;
        // SAFETY: bounds checked by ptr_at.
        sum += u32::from(unsafe { *word });
    }
    let ip = ip_header((ICMP_ERR_HDRS + quote) as u16, 0x4000u16.to_be(), PROTO_ICMP, from_be, saddr);
    let out: *mut [u16; 14] = ptr_at(ctx, l3_off)?;
    let mut hdrs = [0u16; 14];
    hdrs[..10].copy_from_slice(&ip);
    hdrs[10] = type_code;
    hdrs[11] = csum::finish(sum);
    hdrs[13] = mtu_be;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *out = hdrs };
    Some(Verdict::send_back(ctx, sent))
}

/// An ICMP packet that is not an error of a balanced flow: an echo request
/// to a VIP address is answered in place (type 8 → 0, addresses and MACs
/// swapped, fresh TTL); any other to a VIP address the gateway does not own
/// is dropped (passed on, it would be routed back the way it came);
/// anything else is passed untouched.
#[inline(always)]
pub fn echo(ctx: &XdpContext, v4: &Ipv4) -> Verdict {
    let not_ours = Verdict::pass(reason::PASS_NOT_VIP);
    // SAFETY: v4.ip was bounds checked in parse_ipv4.
    let (saddr, daddr, ttl) = unsafe { ((*v4.ip).saddr_be, (*v4.ip).daddr_be, (*v4.ip).ttl) };
    let key = VipAddrKey { addr_be: [daddr, 0, 0, 0], family: FAMILY_V4, _pad: [0; 3] };
    // SAFETY: the value is copied out at once.
    if unsafe { VIP_ADDRS.get(&key) }.is_none_or(|info| info.protos == 0) {
        return not_ours;
    }
    let unserved =
        if guard::is_local([daddr, 0, 0, 0], FAMILY_V4) { not_ours } else { Verdict::drop(reason::DROP_NO_SERVICE) };
    if v4.tot_len - v4.ihl_bytes < 8 {
        return unserved;
    }
    let Some(icmp) = ptr_at::<[u16; 4]>(ctx, v4.l3_off + (v4.ihl_bytes & 0x3c)) else { return unserved };
    // SAFETY: bounds checked by ptr_at.
    let type_code = unsafe { (*icmp)[0] };
    if type_code.to_ne_bytes()[0] != ICMP_ECHO_REQUEST {
        return unserved;
    }
    if !allow_reply(reply_bucket::ECHO) {
        return Verdict::drop(reason::DROP_ICMP_ECHO_RATE_LIMITED);
    }
    let (dst_mac, src_mac) = macs(v4.eth);
    // SAFETY: all bounds checked above; swapping the addresses leaves the
    // IP checksum as it was, the TTL and type changes are folded in.
    unsafe {
        (*icmp)[0] = 0;
        (*icmp)[1] = csum::replace16((*icmp)[1], type_code, 0);
        let ip = v4.ip;
        (*ip).saddr_be = daddr;
        (*ip).daddr_be = saddr;
        (*ip).ttl = REPLY_TTL;
        (*ip).check = csum::replace16((*ip).check, w(ttl, PROTO_ICMP), w(REPLY_TTL, PROTO_ICMP));
        (*v4.eth).dst = dst_mac;
        (*v4.eth).src = src_mac;
    }
    Verdict::send_back(ctx, reason::TX_ICMP_ECHO_REPLY)
}
