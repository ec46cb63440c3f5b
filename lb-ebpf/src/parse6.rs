//! IPv6 header parsing: the extension-header-free fast path.
//!
//! Only a fixed 40-byte header followed directly by TCP or UDP is balanced
//! (ICMPv6 right after it goes to `icmp6`). Extension headers are not
//! walked: a packet whose next header is anything else and whose destination
//! is a VIP address (not the gateway's own) is dropped
//! (`drop_ipv6_ext_header`, or `drop_no_service` for another protocol);
//! to other addresses it passes (`pass_not_vip`).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V6, PROTO_TCP, PROTO_UDP, stats::reason, vip_addr::VipAddrKey};

use crate::{
    Verdict, lookup,
    maps::VIP_ADDRS,
    parse::{EthHdr, L2, Ports, opaque_data_end, ptr_at},
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

pub const IPV6_HLEN: usize = size_of::<Ipv6Hdr>();

/// An IPv6 TCP/UDP packet without extension headers; its L4 header has only
/// been checked far enough to read the ports.
pub struct Packet6 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    pub ports: *mut Ports,
    /// Offset of the IPv6 header: 14, 18 or 22.
    pub l3_off: usize,
    /// Offset of the L4 header: the IP header's offset + 40.
    pub l4_off: usize,
    /// The payload length: the L4 segment's length, at least 4.
    pub l4_len: usize,
    pub proto: u8,
}

/// A fixed IPv6 header checked by [`ipv6_header`]: version 6, payload
/// inside the frame.
pub struct Ipv6 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    /// Offset of the IPv6 header: 14, 18 or 22 (no, one or two VLAN tags).
    pub l3_off: usize,
    /// The payload length; bytes after it are Ethernet padding.
    pub payload_len: usize,
    pub next_header: u8,
    /// The first 8 bytes after the fixed header, if the frame holds them
    /// (whether the payload does is for the caller to check).
    pub l4_head: Option<*mut [u16; 4]>,
}

/// Parses the fixed IPv6 header after `l2`.
///
/// Header cut off or version ≠ 6: `pass_malformed_ip`. Payload beyond the
/// frame: `pass_truncated_ip`.
#[inline(always)]
pub fn ipv6_header(ctx: &XdpContext, l2: &L2) -> Result<Ipv6, Verdict> {
    let malformed = Verdict::pass(reason::PASS_MALFORMED_IP);
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off).ok_or(malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow_be, payload_len_be, next_header) =
        unsafe { ((*ip).vtc_flow_be, (*ip).payload_len_be, (*ip).next_header) };
    if u32::from_be(vtc_flow_be) >> 28 != 6 {
        return Err(malformed);
    }
    let payload_len = u16::from_be(payload_len_be) as usize;
    let l4_head = ptr_at(ctx, l2.l3_off + IPV6_HLEN);
    if ctx.data() + l2.l3_off + IPV6_HLEN + payload_len > opaque_data_end(ctx) {
        return Err(Verdict::pass(reason::PASS_TRUNCATED_IP));
    }
    Ok(Ipv6 { eth: l2.eth, ip, l3_off: l2.l3_off, payload_len, next_header, l4_head })
}

/// Locates TCP or UDP right after the fixed header of `v6`.
///
/// Any other next header (an extension header) to a VIP address:
/// `pass_ipv6_ext_header`, otherwise `pass_not_vip`. Segment too short for
/// the ports: `pass_short_l4`. (ICMPv6 is handled before, in `icmp6`.)
#[inline(always)]
pub fn transport(v6: &Ipv6) -> Result<Packet6, Verdict> {
    let proto = v6.next_header;
    let l4_off = v6.l3_off + IPV6_HLEN;
    // SAFETY: bounds checked in ipv6_header.
    let daddr = unsafe { (*v6.ip).daddr_be };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        if !lookup::refuses_unserved(daddr, FAMILY_V6) {
            return Err(Verdict::pass(reason::PASS_NOT_VIP));
        }
        let why = if is_extension_header(proto) { reason::DROP_IPV6_EXT_HEADER } else { reason::DROP_NO_SERVICE };
        return Err(Verdict::drop(why));
    }
    let short = || {
        if lookup::refuses_unserved(daddr, FAMILY_V6) {
            Verdict::drop(reason::DROP_NO_SERVICE)
        } else {
            Verdict::pass(reason::PASS_SHORT_L4)
        }
    };
    let ports: *mut Ports = v6.l4_head.ok_or_else(short)?.cast();
    if v6.payload_len < size_of::<Ports>() {
        return Err(short());
    }
    Ok(Packet6 { eth: v6.eth, ip: v6.ip, ports, l3_off: v6.l3_off, l4_off, l4_len: v6.payload_len, proto })
}

/// Whether `next_header` is an IPv6 extension header (RFC 8200 section 4,
/// and AH and Mobility, which chain the same way).
#[inline(always)]
fn is_extension_header(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

/// Whether some VIP listens on the IPv6 address `addr_be`.
#[inline(always)]
pub fn is_vip_addr(addr_be: [u32; 4]) -> bool {
    let key = VipAddrKey { addr_be, family: FAMILY_V6, _pad: [0; 3] };
    // SAFETY: only tested for presence.
    unsafe { VIP_ADDRS.get(&key) }.is_some()
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
