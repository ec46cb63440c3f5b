//! Answers the gateway sends itself over IPv6, the twins of `answer`'s,
//! built in place and sent back out the device the packet came in on
//! (`Verdict::send_back`), from the VIP's address, hop limit 64:
//!
//! - TCP to a VIP with no backend up: a RST, by the same rule as IPv4.
//! - UDP to a VIP with no backend up: ICMPv6 destination unreachable, port
//!   unreachable (type 1 code 4).
//! - A packet of a balanced flow too big for its next hop: ICMPv6 packet
//!   too big (type 2) with the hop's MTU. IPv6 routers never fragment, so
//!   this is the only answer.
//! - An ICMPv6 echo request to a VIP address: an echo reply.
//!
//! The two ICMPv6 errors quote the packet's 40-byte header and its first
//! 8 bytes: what a receiver needs to find its socket (the ports, and TCP's
//! sequence number). RFC 4443 asks for as much as fits in 1280 bytes; the
//! shorter quote keeps the reply a fixed size the verifier can prove.
//! Each kind has `answer`'s per-CPU token bucket of its kind.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{PROTO_TCP, limits::reply_bucket, stats::reason};

use crate::{
    Verdict,
    answer::{REPLY_TTL, Refusal, allow_reply, macs, rst_header, truncate, w, write_macs},
    csum,
    parse::{L4, TCP_RST, ptr_at},
    parse6::{IPV6_HLEN, Ipv6, Ipv6Hdr, PROTO_ICMPV6, Packet6},
};

/// New IPv6 header and ICMPv6 header put before a quote.
const ICMP6_ERR_HDRS: usize = IPV6_HLEN + 8;
/// What an ICMPv6 error quotes: the header and 8 bytes, in 16-bit words.
const QUOTE_WORDS: usize = (IPV6_HLEN + 8) / 2;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
/// Version 6, traffic class and flow label 0, as stored.
const VTC_FLOW_BE: u32 = 0x6000_0000u32.to_be();

/// The IPv6 twin of `answer::refuse`: a RST for TCP, ICMPv6 port
/// unreachable for UDP, within `why`'s rate limit.
#[inline(always)]
pub fn refuse(ctx: &XdpContext, pkt: &Packet6, l4: &L4, why: &Refusal) -> Verdict {
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
        // SAFETY: pkt.ip bounds checked in parse6.
        let vip = unsafe { (*pkt.ip).daddr_be };
        let code = w(ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH);
        icmp6_error(ctx, pkt, code, 0, vip, why.unreachable_sent)
    };
    sent.unwrap_or(not_answered)
}

/// The answer to a packet too big for its next hop (`mtu` bytes): ICMPv6
/// packet too big from `from_be`, sent back the way the packet came. The
/// caller has taken the credit (`allow_reply(reply_bucket::FRAG_NEEDED)`).
#[inline(always)]
pub fn packet_too_big(ctx: &XdpContext, pkt: &Packet6, from_be: [u32; 4], mtu: u16) -> Verdict {
    let code = w(ICMP6_PACKET_TOO_BIG, 0);
    icmp6_error(ctx, pkt, code, u32::from(mtu), from_be, reason::TX_ICMP_FRAG_NEEDED)
        // Could not be built (no headroom): the kernel gets it as it came.
        .unwrap_or(Verdict::pass(reason::PASS_TOO_BIG))
}

/// Rewrites a TCP segment into the RST that answers it (see
/// `answer::tcp_rst` for the sequence numbers).
#[inline(always)]
fn tcp_rst(ctx: &XdpContext, pkt: &Packet6, l4: &L4, sent: u32) -> Option<Verdict> {
    // verifier: the mask keeps the offset visibly small (14, 18 or 22).
    let l3_off = pkt.l3_off & 0x1f;
    let tcp: *mut [u16; 10] = ptr_at(ctx, l3_off + IPV6_HLEN)?;
    let (dst_mac, src_mac) = macs(pkt.eth);
    // SAFETY: pkt.ip bounds checked in parse6, tcp by ptr_at.
    let (saddr, daddr, t) = unsafe { ((*pkt.ip).saddr_be, (*pkt.ip).daddr_be, *tcp) };
    let mut th = rst_header(&t, l4.tcp_flags, pkt.l4_len);

    truncate(ctx, l3_off + IPV6_HLEN + 20)?;
    write_macs(ctx, dst_mac, src_mac)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3_off)?;
    let out: *mut [u16; 10] = ptr_at(ctx, l3_off + IPV6_HLEN)?;
    // The reply goes from the VIP (the segment's destination) back to its source.
    th[8] = csum::finish(csum::add_words(pseudo_header(daddr, saddr, 20, PROTO_TCP), &th));
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        write_header(ip, 20, PROTO_TCP, daddr, saddr);
        *out = th;
    }
    Some(Verdict::send_back(ctx, sent))
}

/// Turns a packet into an ICMPv6 error about it (`type_code`, and the
/// 32-bit field after the checksum: 0, or the MTU of packet too big) from
/// `from_be` to the packet's source, quoting its header and 8 bytes.
#[inline(always)]
fn icmp6_error(
    ctx: &XdpContext,
    pkt: &Packet6,
    type_code: u16,
    rest: u32,
    from_be: [u32; 4],
    sent: u32,
) -> Option<Verdict> {
    let l3_off = pkt.l3_off & 0x1f;
    let (dst_mac, src_mac) = macs(pkt.eth);
    // SAFETY: pkt.ip bounds checked in parse6.
    let saddr = unsafe { (*pkt.ip).saddr_be };

    // SAFETY: the helper checks the headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ICMP6_ERR_HDRS as i32)) } != 0 {
        return None;
    }
    truncate(ctx, l3_off + ICMP6_ERR_HDRS + QUOTE_WORDS * 2)?;
    // Move MACs, tags and ethertype (at most 22 bytes) to the new front.
    let from: *mut [u16; 11] = ptr_at(ctx, ICMP6_ERR_HDRS)?;
    let to: *mut [u16; 11] = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at; the two do not overlap (22 < 48).
    unsafe { *to = *from };
    write_macs(ctx, dst_mac, src_mac)?;

    // verifier: one bounds check for the new headers and the quote, and
    // every pointer derived from it. With a check of its own for each, LLVM
    // dropped the headers' checks as implied by the quote's, which the
    // verifier cannot follow ("R9 offset is outside of the packet").
    let all: *mut [u16; ICMP6_ERR_HDRS / 2 + QUOTE_WORDS] = ptr_at(ctx, l3_off)?;
    let quote = (all as usize + ICMP6_ERR_HDRS) as *const [u16; QUOTE_WORDS];
    let ip = all as *mut Ipv6Hdr;
    let icmp = (all as usize + IPV6_HLEN) as *mut [u16; 4];
    let len = (8 + QUOTE_WORDS * 2) as u16;
    let rest_be = rest.to_be();
    let mut sum = pseudo_header(from_be, saddr, len, PROTO_ICMPV6) + u32::from(type_code);
    sum = csum::add32(sum, rest_be);
    // SAFETY: inside the range checked by ptr_at.
    sum = csum::add_words(sum, unsafe { &*quote });
    // SAFETY: inside the range checked by ptr_at.
    unsafe {
        write_header(ip, len, PROTO_ICMPV6, from_be, saddr);
        *icmp = [type_code, csum::finish(sum), rest_be as u16, (rest_be >> 16) as u16];
    }
    Some(Verdict::send_back(ctx, sent))
}

/// An ICMPv6 echo request to a VIP address, answered in place: type 128
/// becomes 129, addresses and MACs swap, hop limit 64. Swapping the
/// addresses leaves the pseudo-header's sum as it was.
#[inline(always)]
pub fn echo(ctx: &XdpContext, v6: &Ipv6, icmp: *mut [u16; 4]) -> Verdict {
    if !allow_reply(reply_bucket::ECHO) {
        return Verdict::drop(reason::DROP_ICMP_ECHO_RATE_LIMITED);
    }
    let (dst_mac, src_mac) = macs(v6.eth);
    let reply = w(ICMP6_ECHO_REPLY, 0);
    // SAFETY: v6.ip, v6.eth and icmp were bounds checked by the caller.
    unsafe {
        let (saddr, daddr) = ((*v6.ip).saddr_be, (*v6.ip).daddr_be);
        // The request's own type and code: its code need not be 0.
        let request = (*icmp)[0];
        (*icmp)[0] = reply;
        (*icmp)[1] = csum::replace16((*icmp)[1], request, reply);
        (*v6.ip).saddr_be = daddr;
        (*v6.ip).daddr_be = saddr;
        (*v6.ip).hop_limit = REPLY_TTL;
        (*v6.eth).dst = dst_mac;
        (*v6.eth).src = src_mac;
    }
    Verdict::send_back(ctx, reason::TX_ICMP_ECHO_REPLY)
}

/// Whether the ICMPv6 type (the first byte of `type_code` as stored) is an
/// echo request.
#[inline(always)]
pub fn is_echo_request(icmp_type: u8) -> bool {
    icmp_type == ICMP6_ECHO_REQUEST
}

/// The sum of the IPv6 pseudo-header: addresses, upper-layer length, next header.
#[inline(always)]
fn pseudo_header(src: [u32; 4], dst: [u32; 4], len: u16, next_header: u8) -> u32 {
    csum::add128(csum::add128(0, src), dst) + u32::from(len.to_be()) + u32::from(u16::from(next_header).to_be())
}

/// Writes a fresh IPv6 header.
///
/// # Safety
/// `ip` must point at 40 bytes inside the packet.
#[inline(always)]
unsafe fn write_header(ip: *mut Ipv6Hdr, payload_len: u16, next_header: u8, src: [u32; 4], dst: [u32; 4]) {
    // SAFETY: the caller guarantees ip is in bounds.
    unsafe {
        (*ip).vtc_flow_be = VTC_FLOW_BE;
        (*ip).payload_len_be = payload_len.to_be();
        (*ip).next_header = next_header;
        (*ip).hop_limit = REPLY_TTL;
        (*ip).saddr_be = src;
        (*ip).daddr_be = dst;
    }
}
