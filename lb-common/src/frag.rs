//! The fragment table: where the later pieces of a fragmented datagram go.
//!
//! Only the first fragment of a datagram carries the ports, so only it can
//! be balanced. When it is, the data path records the datagram (addresses,
//! protocol, IP id) with the address its pieces are rewritten to; later
//! fragments of the datagram look it up and follow the first to the same
//! backend (or, for a backend's fragmented reply, leave with the VIP as
//! their source). A later fragment with no entry, because its first piece
//! has not arrived (yet) or was not balanced, cannot be placed: to a VIP
//! address it is dropped, otherwise passed.

use bytemuck::{Pod, Zeroable};

/// Key of `FRAGS`: one datagram, as its fragments name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    /// Source address, network byte order; IPv4 uses word 0 only.
    pub src_be: [u32; 4],
    /// Destination address, network byte order; IPv4 uses word 0 only.
    pub dst_be: [u32; 4],
    /// The IP identification field, network byte order (IPv4: low 16 bits).
    pub id_be: u32,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Value of `FRAGS`: how the datagram's later fragments are rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FragState {
    /// The new address, network byte order; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
    /// For counting the pieces as the flow's traffic.
    pub vip_id: u32,
    pub backend_id: u32,
    /// `FRAG_REWRITE_*`: which address `addr_be` replaces.
    pub rewrite: u32,
    pub _pad: u32,
    /// When the first fragment was balanced (CLOCK_MONOTONIC_COARSE).
    pub first_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FragState>() == 40);

/// The pieces go to a backend: their destination (the VIP) is rewritten.
pub const FRAG_REWRITE_DESTINATION: u32 = 0;
/// The pieces are a backend's reply: their source becomes the VIP.
pub const FRAG_REWRITE_SOURCE: u32 = 1;

/// How long after its first fragment a datagram's entry is followed. A
/// datagram's pieces travel together, milliseconds apart; an old entry must
/// not catch a later datagram that reuses the IP id (16 bits per source,
/// destination and protocol) whose own first piece was lost.
pub const FRAG_TIMEOUT_NS: u64 = 5_000_000_000;

crate::user_pod!(FragKey, FragState);
