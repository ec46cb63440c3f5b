//! The VIP map: which (address, port, protocol) tuples are balanced.

use bytemuck::{Pod, Zeroable};

/// Key of `VIPS`: a virtual service as the packet names it.
///
/// IPv4 addresses use `addr_be[0]` and leave the other words zero; `family`
/// keeps an IPv4 VIP apart from the IPv6 address `::a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VipKey {
    /// Destination address, network byte order.
    pub addr_be: [u32; 4],
    /// Destination port, network byte order.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Value of `VIPS`: where the VIP's Maglev ring lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VipInfo {
    /// Dense id from 1, allocated by the agent; indexes `VIP_LIMITS`, `VIP_TIMEOUTS` and `LIMITED`.
    pub vip_id: u32,
    /// Slots in each of this VIP's rings (prime).
    pub ring_size: u32,
    /// Which of the VIP's two rings packets read: 0 or 1. The agent fills the
    /// other ring, then flips this in one map update, so a packet sees either
    /// the old table or the new one, never a mix.
    pub ring_generation: u32,
    /// `VIP_F_*` bits: per-VIP options the data path reads.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 16);

/// Scheduler `source-hash`: new flows pick their Maglev slot by the client
/// address alone ([`crate::sched::source_hash`]), so every flow of one client
/// goes to the same backend while the VIP's set of backends is stable.
/// Without it, the slot comes from the whole 5-tuple ([`crate::flow::flow_hash`]).
pub const VIP_F_SOURCE_HASH: u32 = 1 << 0;

/// The VIP has per-client limits (`VIP_LIMITS` at its id; see
/// [`crate::client_limits`]): a packet that opens a flow is checked first.
pub const VIP_F_LIMITED: u32 = 1 << 1;

impl VipInfo {
    /// Index in `MAGLEV` of slot 0 of the ring that packets read.
    ///
    /// VIP ids start at 1; VIP `n` owns rings `2(n-1)` and `2(n-1)+1`.
    #[inline(always)]
    pub fn ring_base(&self) -> u32 {
        ring_base(self.vip_id, self.ring_generation, self.ring_size)
    }
}

/// Index in `MAGLEV` of slot 0 of ring `generation` of VIP `vip_id`.
#[inline(always)]
pub fn ring_base(vip_id: u32, generation: u32, ring_size: u32) -> u32 {
    let rings_before = vip_id.wrapping_sub(1).wrapping_mul(crate::limits::RINGS_PER_VIP).wrapping_add(generation & 1);
    rings_before.wrapping_mul(ring_size)
}

#[cfg(feature = "user")]
impl VipKey {
    /// The key of the VIP listening on `listen` for IP protocol `proto`
    /// (`PROTO_TCP` or `PROTO_UDP`).
    #[must_use]
    pub fn new(listen: core::net::SocketAddr, proto: u8) -> Self {
        VipKey {
            addr_be: crate::addr::words(listen.ip()),
            port_be: listen.port().to_be(),
            proto,
            family: crate::addr::family(listen.ip()),
        }
    }

    /// The `VIP_ADDRS` key of its address.
    #[must_use]
    pub fn addr_key(&self) -> crate::vip_addr::VipAddrKey {
        crate::vip_addr::VipAddrKey { addr_be: self.addr_be, family: self.family, _pad: [0; 3] }
    }
}

crate::user_pod!(VipKey, VipInfo);
