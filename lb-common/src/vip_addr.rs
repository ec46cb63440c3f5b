//! The VIP address map: which addresses (and protocols) have a VIP on some
//! port. Packets that carry no port, IPv4 fragments after the first, are
//! judged by it.

use bytemuck::{Pod, Zeroable};

use crate::{PROTO_TCP, PROTO_UDP};

/// Key of `VIP_ADDRS`: an address some VIP listens on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipAddrKey {
    /// Address, network byte order; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VipAddrKey>() == 20);

/// Value of `VIP_ADDRS`: `VIP_ADDR_*` bits, one per protocol that has at
/// least one VIP on the address. The agent keeps it equal to what `VIPS`
/// holds; an address with no VIP left has no entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipAddrInfo {
    pub protos: u32,
}
const _: () = assert!(core::mem::size_of::<VipAddrInfo>() == 4);

/// A TCP VIP listens on the address.
pub const VIP_ADDR_TCP: u32 = 1 << 0;
/// A UDP VIP listens on the address.
pub const VIP_ADDR_UDP: u32 = 1 << 1;

/// The `VIP_ADDR_*` bit of an IP protocol number; 0 for protocols no VIP
/// can have.
#[inline(always)]
pub const fn proto_bit(proto: u8) -> u32 {
    match proto {
        PROTO_TCP => VIP_ADDR_TCP,
        PROTO_UDP => VIP_ADDR_UDP,
        _ => 0,
    }
}

#[cfg(feature = "user")]
impl VipAddrKey {
    /// The key of an address (also the key of `ADDR_ROLES`).
    #[must_use]
    pub fn new(ip: core::net::IpAddr) -> Self {
        VipAddrKey { addr_be: crate::addr::words(ip), family: crate::addr::family(ip), _pad: [0; 3] }
    }
}

crate::user_pod!(VipAddrKey, VipAddrInfo);
