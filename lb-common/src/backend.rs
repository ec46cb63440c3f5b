//! The backend array: where a backend id sends packets, and whether it may.

use bytemuck::{Pod, Zeroable};

/// Slot never allocated: Maglev slots and flows holding it do not route.
pub const BACKEND_ID_NONE: u32 = 0;

/// Unused slot; also what a zeroed entry reads as.
pub const BACKEND_STATE_UNUSED: u8 = 0;
/// Healthy: takes new flows (if in the ring) and keeps its flows.
pub const BACKEND_STATE_UP: u8 = 1;
/// Failed its health checks: its flows move to another backend on their next
/// packet (the new backend resets them, so clients fail fast).
pub const BACKEND_STATE_DOWN: u8 = 2;

/// Value of `BACKENDS`, indexed by backend id. One id per (VIP, backend) pair,
/// so counters are per VIP and backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendInfo {
    /// Backend address, network byte order; IPv4 uses word 0 only.
    pub addr_be: [u32; 4],
    /// Backend port, network byte order (may differ from the VIP's).
    pub port_be: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 24);

/// The backend's service (address, port, protocol) is shared with a
/// backend of another VIP: its flows are marked `FLOW_F_SHARED`.
pub const BACKEND_F_SHARED: u8 = 1 << 0;
/// The agent's own note, which the program ignores: the health checks say
/// down, and the entry is `UP` only so its flows stay (`on_backend_down =
/// "keep"`). A restarted agent reads it back as the backend's health.
pub const BACKEND_F_HEALTH_DOWN: u8 = 1 << 1;

#[cfg(feature = "user")]
impl BackendInfo {
    /// The entry of a backend at `address` in `state` (`BACKEND_STATE_*`).
    #[must_use]
    pub fn new(address: core::net::SocketAddr, state: u8) -> Self {
        BackendInfo {
            addr_be: crate::addr::words(address.ip()),
            port_be: address.port().to_be(),
            family: crate::addr::family(address.ip()),
            state,
            flags: 0,
            _pad: [0; 3],
        }
    }
}

crate::user_pod!(BackendInfo);
