//! What the data path must know to refuse to be turned against its own
//! side: which addresses belong to the gateway itself or to backends
//! (`ADDR_ROLES`), and which address:port pairs are backends' services
//! (`BACKEND_SERVICES`), so their replies are always translated and never
//! leak out with a backend's own address.
//!
//! - A packet to a VIP from a gateway-local or backend address never creates
//!   balancing state: it is dropped (`drop_spoofed_source`). Otherwise an
//!   attacker on the client side could plant reply translations for the
//!   gateway's own connections to backends (its health probes).
//! - A packet from a backend's service address and port is translated to
//!   the VIP that backend serves, with no per-flow reply state: a service
//!   that serves one VIP (the common case) names it in `BACKEND_SERVICES`.
//!   One shared by several VIPs (at most `limits::MAX_SHARED_VIPS`) lists
//!   them in `SHARED_SERVICES`, and the client's flow in the connection
//!   table (keyed by the VIP) tells which; with no flow under any of them,
//!   the reply is dropped (`drop_reply_no_flow`), never leaked.
//! - Except flows that reach the backend's service directly through the
//!   gateway, not through a VIP (an operator's curl, a monitoring probe):
//!   the data path tracks those in `DIRECT_FLOWS`, and their replies pass
//!   untranslated. A direct flow and a balanced flow never share a 5-tuple:
//!   a new balanced flow whose replies would collide with a live direct one
//!   is dropped, and so is a direct packet whose 5-tuple a live balanced
//!   flow to the same backend already has (`drop_flow_collision`).

use bytemuck::{Pod, Zeroable};

/// The address belongs to the gateway itself (one of its interfaces).
pub const ADDR_ROLE_LOCAL: u32 = 1 << 0;
/// The address is some backend's.
pub const ADDR_ROLE_BACKEND: u32 = 1 << 1;

/// Value of `ADDR_ROLES`: `ADDR_ROLE_*` bits. Keyed by
/// [`crate::vip_addr::VipAddrKey`] (an address and its family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrRoles {
    pub roles: u32,
}
const _: () = assert!(core::mem::size_of::<AddrRoles>() == 4);

/// Key of `BACKEND_SERVICES`: a backend's service as its replies name it
/// (their source address, port and protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    /// Address, network byte order; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
    /// Port, network byte order.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Value of `DIRECT_FLOWS` (keyed by the reply's 5-tuple, backend →
/// client): a flow that reached a backend's service directly, not through a
/// VIP. It expires like a connection-table entry (`crate::timeouts`):
/// `last_seen_ns` is when its client last sent a packet (refreshed at most
/// once per `timeouts::TOUCH_INTERVAL_NS`), `flags` its `FLOW_F_*` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DirectFlow {
    pub last_seen_ns: u64,
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DirectFlow>() == 16);

#[cfg(feature = "user")]
impl ServiceKey {
    /// The key of a backend's service at `address` for IP protocol `proto`.
    #[must_use]
    pub fn new(address: core::net::SocketAddr, proto: u8) -> Self {
        ServiceKey {
            addr_be: crate::addr::words(address.ip()),
            port_be: address.port().to_be(),
            proto,
            family: crate::addr::family(address.ip()),
        }
    }
}

/// Value of `SHARED_SERVICES`: the VIPs a backend's service serves, when
/// it serves several (`SERVICE_F_SHARED`). A reply is translated to the
/// one whose flow for its client is in the connection table, pinned to
/// this service (the most recently active if several are).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SharedService {
    /// The first `count` are valid.
    pub vips: [crate::flow::ReplyNat; crate::limits::MAX_SHARED_VIPS as usize],
    pub count: u32,
}
const _: () = assert!(core::mem::size_of::<SharedService>() == 116);

crate::user_pod!(AddrRoles, ServiceKey, DirectFlow, SharedService);
