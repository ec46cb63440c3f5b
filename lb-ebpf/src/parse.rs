//! Header parsing with one bounds check per read.
//!
//! Headers are read in place: every pointer handed out has been checked
//! against `data_end`, the only proof the verifier accepts.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, PROTO_UDP, stats::reason};

use crate::Verdict;

/// Ethernet header.
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub ether_type_be: u16,
}

/// IPv4 header without options.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    /// Checksum, as stored (ones' complement sums are byte-order neutral).
    pub check: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

/// The first 4 bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    pub src_be: u16,
    pub dst_be: u16,
}

const ETH_HLEN: usize = size_of::<EthHdr>();
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset, network byte order.
const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
/// Offset of the checksum field inside TCP and UDP headers.
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;

/// Returns a pointer to a `T` at `offset`, or `None` when it would end past
/// the frame. The one bounds check every header read goes through.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// An IPv4 TCP/UDP packet whose IP header has been validated; its L4 header
/// has only been checked far enough to read the ports.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    /// Offset of the L4 header from the start of the frame (bounded by 74).
    pub l4_off: usize,
    /// IP total length minus header length: the L4 segment's length.
    pub l4_len: usize,
    pub proto: u8,
}

/// Parses Ethernet, IPv4 (with options) and the L4 ports.
///
/// Frames that are not for us are returned as `Err` with a pass verdict:
/// this program never drops traffic it does not own.
#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(reason::PASS_NOT_IPV4))?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type_be } != ETH_P_IPV4_BE {
        return Err(Verdict::pass(reason::PASS_NOT_IPV4));
    }
    let malformed = Verdict::pass(reason::PASS_MALFORMED_IP);
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let version_ihl = unsafe { (*ip).version_ihl };
    let ihl_bytes = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl_bytes < size_of::<Ipv4Hdr>() {
        return Err(malformed);
    }
    // SAFETY: bounds checked by ptr_at.
    let tot_len = u16::from_be(unsafe { (*ip).tot_len_be }) as usize;
    // Trailing bytes past tot_len (Ethernet padding) are allowed; a length
    // beyond the frame is not.
    if tot_len < ihl_bytes || ctx.data() + ETH_HLEN + tot_len > ctx.data_end() {
        return Err(malformed);
    }
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*ip).frag_off_be } & IP_MF_OFFSET_MASK_BE != 0 {
        return Err(Verdict::pass(reason::PASS_FRAGMENT));
    }
    // SAFETY: bounds checked by ptr_at.
    let proto = unsafe { (*ip).proto };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(reason::PASS_NOT_VIP));
    }
    // verifier: ihl_bytes is at most 60, so l4_off is a bounded offset.
    let l4_off = ETH_HLEN + (ihl_bytes & 0x3c);
    // A header too short to hold ports cannot name a VIP: not ours.
    let ports: *mut Ports = ptr_at(ctx, l4_off).ok_or(malformed)?;
    Ok(Packet { eth, ip, ports, l4_off, l4_len: tot_len - ihl_bytes, proto })
}

/// The L4 header of a packet we are about to rewrite, fully validated.
pub struct L4 {
    /// The checksum field; `None` for UDP sent without a checksum.
    pub check: Option<*mut u16>,
}

/// Validates the whole TCP or UDP header of a packet we own, and locates its
/// checksum. A malformed header on a balanced flow is dropped, never
/// forwarded half-rewritten.
#[inline(always)]
pub fn l4_checked(ctx: &XdpContext, pkt: &Packet) -> Result<L4, Verdict> {
    let malformed = Verdict::drop(reason::DROP_MALFORMED_L4);
    if pkt.proto == PROTO_TCP {
        if pkt.l4_len < TCP_HDR_LEN {
            return Err(malformed);
        }
        let hdr: *mut [u8; TCP_HDR_LEN] = ptr_at(ctx, pkt.l4_off).ok_or(malformed)?;
        // SAFETY: bounds checked by ptr_at; byte 12 holds the data offset.
        let doff_bytes = ((unsafe { (*hdr)[12] } >> 4) as usize) * 4;
        if doff_bytes < TCP_HDR_LEN || doff_bytes > pkt.l4_len {
            return Err(malformed);
        }
        let check = (hdr as usize + TCP_CHECK_OFF) as *mut u16;
        Ok(L4 { check: Some(check) })
    } else {
        let hdr: *mut [u16; 4] = ptr_at(ctx, pkt.l4_off).ok_or(malformed)?;
        // SAFETY: bounds checked by ptr_at; word 2 is the UDP length.
        let udp_len = u16::from_be(unsafe { (*hdr)[2] }) as usize;
        if udp_len < UDP_HDR_LEN || udp_len > pkt.l4_len {
            return Err(malformed);
        }
        let check = (hdr as usize + UDP_CHECK_OFF) as *mut u16;
        // SAFETY: bounds checked by ptr_at (the whole 8-byte header).
        let zero = unsafe { *check } == 0;
        Ok(L4 { check: if zero { None } else { Some(check) } })
    }
}

/// A packet whose TTL would expire here is left to the kernel, which answers
/// with ICMP time exceeded (so traceroute through the gateway works).
#[inline(always)]
pub fn check_ttl(pkt: &Packet) -> Result<(), Verdict> {
    // SAFETY: pkt.ip was bounds checked in parse_ipv4.
    if unsafe { (*pkt.ip).ttl } <= 1 {
        return Err(Verdict::pass(reason::PASS_TTL_EXPIRED));
    }
    Ok(())
}
