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

/// An 802.1Q (or 802.1ad) tag, after the MACs: what follows it.
#[repr(C)]
pub struct VlanHdr {
    /// Priority, DEI and VLAN id; kept as it is.
    pub tci_be: u16,
    /// The ethertype of what follows the tag, network byte order.
    pub ether_type_be: u16,
}

/// The first 4 bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    pub src_be: u16,
    pub dst_be: u16,
}

const ETH_HLEN: usize = size_of::<EthHdr>();
const VLAN_HLEN: usize = size_of::<VlanHdr>();
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// 802.1Q VLAN tag (a customer tag, or the inner tag of QinQ).
const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
/// 802.1ad service tag: the outer tag of QinQ.
const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();
/// More-fragments flag and fragment offset, network byte order.
const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();
/// Fragment offset alone, network byte order.
const IP_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();
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

/// The end of the frame, read so that the compiler cannot treat it as the
/// `data_end` every `ptr_at` reads.
///
/// verifier: a length rule checked against `data_end` (the payload lies
/// inside the frame) lets LLVM prove later fixed-size `ptr_at` checks
/// redundant and delete them; the verifier cannot follow that proof and
/// refuses the reads. Checked against this value instead, the rule tells
/// LLVM nothing, and every bounds check stays.
#[inline(always)]
pub fn opaque_data_end(ctx: &XdpContext) -> usize {
    // SAFETY: ctx.ctx points at the program's xdp_md.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ctx).data_end)) as usize }
}

/// An IPv4 TCP/UDP packet whose IP header has been validated; its L4 header
/// has only been checked far enough to read the ports.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    /// Offset of the IP header: 14, 18 or 22.
    pub l3_off: usize,
    /// Offset of the L4 header from the start of the frame (bounded by 82:
    /// two VLAN tags and 60 bytes of IP header).
    pub l4_off: usize,
    /// IP total length minus header length: the L4 segment's length (of
    /// this fragment, for a first fragment), at least 4 (the ports).
    pub l4_len: usize,
    pub proto: u8,
    /// The first piece of a fragmented datagram: its TCP/UDP header is
    /// here, the rest of its segment follows in later fragments.
    pub first_fragment: bool,
}

/// An IPv4 header checked against the rules in [`parse_ipv4`]: version 4,
/// IHL at least 5, total length covering the header and inside the frame.
pub struct Ipv4 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Offset of the IP header: 14, 18 or 22 (no, one or two VLAN tags).
    pub l3_off: usize,
    /// IHL × 4: 20..=60.
    pub ihl_bytes: usize,
    /// The datagram's total length; bytes after it are Ethernet padding.
    pub tot_len: usize,
}

impl Ipv4 {
    /// A piece of a fragmented datagram: more-fragments set or a non-zero
    /// offset. (Don't-fragment alone is not.)
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        // SAFETY: bounds checked in parse_ipv4.
        let frag_off_be = unsafe { (*self.ip).frag_off_be };
        frag_off_be & IP_MF_OFFSET_MASK_BE != 0
    }

    /// A fragment after the first (offset ≠ 0): it carries no ports.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        // SAFETY: bounds checked in parse_ipv4.
        let frag_off_be = unsafe { (*self.ip).frag_off_be };
        frag_off_be & IP_OFFSET_MASK_BE != 0
    }
}

/// The Ethernet header and any VLAN tags stepped over: where the network
/// header starts and which ethertype it has.
pub struct L2 {
    pub eth: *mut EthHdr,
    /// Offset of the network header: 14, 18 or 22 (no, one or two VLAN tags).
    pub l3_off: usize,
    /// The ethertype after the tags, network byte order.
    pub ether_type_be: u16,
}

impl L2 {
    #[inline(always)]
    pub fn is_ipv6(&self) -> bool {
        self.ether_type_be == ETH_P_IPV6_BE
    }
}

/// Parses Ethernet through up to two VLAN tags.
#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Result<L2, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(reason::PASS_NOT_IP))?;
    let (l3_off, ether_type_be) = skip_vlan_tags(ctx, eth)?;
    Ok(L2 { eth, l3_off, ether_type_be })
}

/// Parses the IPv4 header after the Ethernet header and tags of `l2`.
///
/// Frames that are not for us are returned as `Err` with a pass verdict:
/// this program never drops traffic it does not own. A malformed IPv4
/// header is passed untouched too, each rule with its own reason: the
/// kernel drops it, and it cannot be trusted to name a VIP.
#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext, l2: &L2) -> Result<Ipv4, Verdict> {
    if l2.ether_type_be != ETH_P_IPV4_BE {
        return Err(Verdict::pass(reason::PASS_NOT_IP));
    }
    ipv4_header(ctx, l2.eth, l2.l3_off)
}

/// The offset of the network header after the MACs and any VLAN tags, and
/// its ethertype: one 802.1Q tag, or QinQ (an 802.1ad or 802.1Q outer tag,
/// then an 802.1Q one). Tags are only stepped over; they stay in the frame,
/// so a tagged packet leaves with its tags.
#[inline(always)]
fn skip_vlan_tags(ctx: &XdpContext, eth: *mut EthHdr) -> Result<(usize, u16), Verdict> {
    let not_ip = Verdict::pass(reason::PASS_NOT_IP);
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = unsafe { (*eth).ether_type_be };
    let mut off = ETH_HLEN;
    // Unrolled, not a loop: at most two tags, each a fixed offset.
    if ether_type == ETH_P_8021AD_BE || ether_type == ETH_P_8021Q_BE {
        let tag: *mut VlanHdr = ptr_at(ctx, off).ok_or(not_ip)?;
        // SAFETY: bounds checked by ptr_at.
        ether_type = unsafe { (*tag).ether_type_be };
        off += VLAN_HLEN;
        if ether_type == ETH_P_8021Q_BE {
            let tag: *mut VlanHdr = ptr_at(ctx, off).ok_or(not_ip)?;
            // SAFETY: bounds checked by ptr_at.
            ether_type = unsafe { (*tag).ether_type_be };
            off += VLAN_HLEN;
        }
    }
    if ether_type != ETH_P_IPV4_BE && ether_type != ETH_P_IPV6_BE {
        return Err(not_ip);
    }
    Ok((off, ether_type))
}

/// Validates the IPv4 header at `l3_off`: the three rules that make its
/// lengths trustworthy, checked in the order a reader depends on them.
#[inline(always)]
fn ipv4_header(ctx: &XdpContext, eth: *mut EthHdr, l3_off: usize) -> Result<Ipv4, Verdict> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Verdict::pass(reason::PASS_MALFORMED_IP))?;
    // SAFETY: bounds checked by ptr_at.
    let (version_ihl, tot_len_be) = unsafe { ((*ip).version_ihl, (*ip).tot_len_be) };
    if version_ihl >> 4 != 4 {
        return Err(Verdict::pass(reason::PASS_MALFORMED_IP));
    }
    let ihl_bytes = ((version_ihl & 0x0f) as usize) * 4;
    if ihl_bytes < size_of::<Ipv4Hdr>() {
        return Err(Verdict::pass(reason::PASS_BAD_IHL));
    }
    let tot_len = u16::from_be(tot_len_be) as usize;
    if tot_len < ihl_bytes {
        return Err(Verdict::pass(reason::PASS_BAD_TOTAL_LENGTH));
    }
    // Trailing bytes past tot_len (Ethernet padding) are allowed; a length
    // beyond the frame is not. This also proves the options are in the frame.
    if ctx.data() + l3_off + tot_len > ctx.data_end() {
        return Err(Verdict::pass(reason::PASS_TRUNCATED_IP));
    }
    Ok(Ipv4 { eth, ip, l3_off, ihl_bytes, tot_len })
}

/// Locates a TCP or UDP header after the IP header and its options, far
/// enough to read the ports. The ports must lie inside the datagram, not in
/// the Ethernet padding after it.
#[inline(always)]
pub fn transport(ctx: &XdpContext, v4: &Ipv4) -> Result<Packet, Verdict> {
    // SAFETY: bounds checked in ipv4_header.
    let proto = unsafe { (*v4.ip).proto };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(reason::PASS_NOT_VIP));
    }
    let short = Verdict::pass(reason::PASS_SHORT_L4);
    // verifier: the mask keeps ihl_bytes visibly at most 60, so l4_off is a
    // bounded offset the bounds check below can prove. That check comes
    // first: placed after the length check, which implies it, the compiler
    // removes it, and the verifier then refuses the read.
    let l4_off = v4.l3_off + (v4.ihl_bytes & 0x3c);
    let ports: *mut Ports = ptr_at(ctx, l4_off).ok_or(short)?;
    let l4_len = v4.tot_len - v4.ihl_bytes;
    if l4_len < size_of::<Ports>() {
        return Err(short);
    }
    let first_fragment = v4.is_fragment();
    Ok(Packet { eth: v4.eth, ip: v4.ip, ports, l3_off: v4.l3_off, l4_off, l4_len, proto, first_fragment })
}

/// The L4 header of a packet we are about to rewrite, fully validated.
pub struct L4 {
    /// The checksum field, to be updated only when `has_check`.
    ///
    /// verifier: a plain pointer, not an `Option`. The payload of a `None`
    /// is undefined, LLVM spills it all the same when the value crosses a
    /// call, and the verifier refuses to read an uninitialised register
    /// ("R5 !read_ok", kernel 6.18).
    pub check: *mut u16,
    /// False for UDP sent without a checksum (0).
    pub has_check: bool,
    /// TCP flags (`TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
}

impl L4 {
    /// The checksum field, if there is a checksum to update.
    #[inline(always)]
    pub fn check(&self) -> Option<*mut u16> {
        if self.has_check { Some(self.check) } else { None }
    }
}

pub use lb_common::tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// Validates the whole TCP or UDP header of a packet we own, and locates its
/// checksum. A malformed header on a balanced flow is dropped, never
/// forwarded half-rewritten.
#[inline(always)]
pub fn l4_checked(ctx: &XdpContext, pkt: &Packet) -> Result<L4, Verdict> {
    l4_checked_at(ctx, pkt.proto, pkt.l4_off, pkt.l4_len, pkt.first_fragment)
}

/// [`l4_checked`] for the L4 header at `l4_off`, `l4_len` bytes long (the
/// IPv6 path uses it too). In a first fragment the UDP length covers the
/// whole datagram, beyond this piece; the header itself must still be here.
#[inline(always)]
pub fn l4_checked_at(
    ctx: &XdpContext,
    proto: u8,
    l4_off: usize,
    l4_len: usize,
    first_fragment: bool,
) -> Result<L4, Verdict> {
    let malformed = Verdict::drop(reason::DROP_MALFORMED_L4);
    if proto == PROTO_TCP {
        if l4_len < TCP_HDR_LEN {
            return Err(malformed);
        }
        let hdr: *mut [u8; TCP_HDR_LEN] = ptr_at(ctx, l4_off).ok_or(malformed)?;
        // SAFETY: bounds checked by ptr_at; byte 12 holds the data offset.
        let doff_bytes = ((unsafe { (*hdr)[12] } >> 4) as usize) * 4;
        if doff_bytes < TCP_HDR_LEN || doff_bytes > l4_len {
            return Err(malformed);
        }
        let check = (hdr as usize + TCP_CHECK_OFF) as *mut u16;
        // SAFETY: bounds checked by ptr_at; byte 13 holds the flags.
        let tcp_flags = unsafe { (*hdr)[13] };
        Ok(L4 { check, has_check: true, tcp_flags })
    } else {
        let hdr: *mut [u16; 4] = ptr_at(ctx, l4_off).ok_or(malformed)?;
        // SAFETY: bounds checked by ptr_at; word 2 is the UDP length.
        let udp_len = u16::from_be(unsafe { (*hdr)[2] }) as usize;
        if udp_len < UDP_HDR_LEN || l4_len < UDP_HDR_LEN || (udp_len > l4_len && !first_fragment) {
            return Err(malformed);
        }
        let check = (hdr as usize + UDP_CHECK_OFF) as *mut u16;
        // SAFETY: bounds checked by ptr_at (the whole 8-byte header).
        let zero = unsafe { *check } == 0;
        Ok(L4 { check, has_check: !zero, tcp_flags: 0 })
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
