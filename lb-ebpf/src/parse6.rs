//! IPv6 header parsing: the extension-header-free fast path.
//!
//! Only a fixed 40-byte header followed directly by TCP or UDP is balanced.
//! Extension headers are not walked: a packet whose next header is anything
//! but TCP, UDP or ICMPv6 and whose destination is a VIP address is passed
//! untouched (`pass_ipv6_ext_header`); to other addresses, `pass_not_vip`.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V6, PROTO_TCP, PROTO_UDP, stats::reason, vip_addr::VipAddrKey};

use crate::{
    Verdict,
    maps::VIP_ADDRS,
    parse::{EthHdr, L2, Ports, ptr_at},
};

/// IP protocol number (next header) of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// The fixed IPv6 header.
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version, traffic class and flow label, network byte order.
    pub vtc_flow_be: u32,
    pub payload_len_be: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
}

const IPV6_HLEN: usize = size_of::<Ipv6Hdr>();

/// An IPv6 TCP/UDP packet without extension headers; its L4 header has only
/// been checked far enough to read the ports.
pub struct Packet6 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    pub ports: *mut Ports,
    /// Offset of the L4 header: the IP header's offset + 40.
    pub l4_off: usize,
    /// The payload length: the L4 segment's length, at least 4.
    pub l4_len: usize,
    pub proto: u8,
}

/// Parses the IPv6 header after `l2` and locates TCP or UDP right after it.
///
/// Header cut off or version ≠ 6: `pass_malformed_ip`. Payload beyond the
/// frame: `pass_truncated_ip`. ICMPv6: `pass_not_vip`. Any other next
/// header (an extension header) to a VIP address: `pass_ipv6_ext_header`,
/// otherwise `pass_not_vip`. Segment too short for the ports: `pass_short_l4`.
#[inline(always)]
pub fn parse_ipv6(ctx: &XdpContext, l2: &L2) -> Result<Packet6, Verdict> {
    let malformed = Verdict::pass(reason::PASS_MALFORMED_IP);
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off).ok_or(malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow_be, payload_len_be, proto) = unsafe { ((*ip).vtc_flow_be, (*ip).payload_len_be, (*ip).next_header) };
    if u32::from_be(vtc_flow_be) >> 28 != 6 {
        return Err(malformed);
    }
    let l4_len = u16::from_be(payload_len_be) as usize;
    let l4_off = l2.l3_off + IPV6_HLEN;
    // verifier: the ports' own bounds check comes before the length check,
    // which implies it; placed after, the compiler removes it and the
    // verifier then refuses the read (as in `parse::transport`).
    let ports: Option<*mut Ports> = ptr_at(ctx, l4_off);
    // Bytes after the payload are Ethernet padding; a payload beyond the frame is not.
    if ctx.data() + l2.l3_off + IPV6_HLEN + l4_len > ctx.data_end() {
        return Err(Verdict::pass(reason::PASS_TRUNCATED_IP));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        if proto == PROTO_ICMPV6 {
            return Err(Verdict::pass(reason::PASS_NOT_VIP));
        }
        // SAFETY: bounds checked by ptr_at.
        let daddr = unsafe { (*ip).daddr_be };
        let key = VipAddrKey { addr_be: daddr, family: FAMILY_V6, _pad: [0; 3] };
        // SAFETY: only tested for presence.
        if unsafe { VIP_ADDRS.get(key) }.is_some() {
            return Err(Verdict::pass(reason::PASS_IPV6_EXT_HEADER));
        }
        return Err(Verdict::pass(reason::PASS_NOT_VIP));
    }
    let short = Verdict::pass(reason::PASS_SHORT_L4);
    let ports = ports.ok_or(short)?;
    if l4_len < size_of::<Ports>() {
        return Err(short);
    }
    Ok(Packet6 { eth: l2.eth, ip, ports, l4_off, l4_len, proto })
}

/// Hop limit ≤ 1: left to the kernel, which answers ICMPv6 time exceeded.
#[inline(always)]
pub fn check_hop_limit(pkt: &Packet6) -> Result<(), Verdict> {
    // SAFETY: pkt.ip was bounds checked in parse_ipv6.
    if unsafe { (*pkt.ip).hop_limit } <= 1 {
        return Err(Verdict::pass(reason::PASS_TTL_EXPIRED));
    }
    Ok(())
}
