//! The boundary between control logic and the kernel maps.
//!
//! `control::state` decides what the maps must hold and calls this trait; the real
//! implementation (`crate::dataplane::Maps`) writes BPF maps, and tests use a
//! fake that records the calls, so the logic is tested without root.

use lb_common::{
    backend::BackendInfo,
    flow::ReplyNat,
    guard::ServiceKey,
    vip::{VipInfo, VipKey},
    vip_addr::VipAddrKey,
};

/// Errors a dataplane reports; the real one wraps aya's map errors.
pub type DataplaneError = anyhow::Error;

/// Writes the control plane's decisions into the data path.
pub trait Dataplane {
    /// Inserts or replaces a VIP. Replacing is atomic for packets, which is how
    /// a new ring generation is published.
    fn upsert_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DataplaneError>;
    /// Removes a VIP; its packets pass to the kernel from then on.
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError>;
    /// Writes which protocols have a VIP on an address (`VIP_ADDR_*` bits of
    /// `VIP_ADDRS`); 0 removes the address's entry, if it has one.
    fn set_vip_addr(&mut self, key: VipAddrKey, protos: u32) -> Result<(), DataplaneError>;
    /// Sets `ADDR_FILTER[slot]`: some VIP or backend address has the slot
    /// (`lb_common::addr_filter`). Slots are never cleared while the agent runs.
    fn set_addr_filter(&mut self, slot: u32) -> Result<(), DataplaneError>;
    /// Writes the backend array entry for `backend_id` (1..MAX_BACKENDS).
    fn set_backend(&mut self, backend_id: u32, info: BackendInfo) -> Result<(), DataplaneError>;
    /// Writes Maglev slots: `(index into the MAGLEV array, backend id)` pairs.
    fn write_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), DataplaneError>;
    /// Zeroes `VIP_STATS[vip_id]` on every CPU, before a reused id is published.
    fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError>;
    /// Writes the `ADDR_ROLE_*` bits of an address (`ADDR_ROLES`); 0 removes
    /// the address's entry, if it has one.
    fn set_addr_roles(&mut self, key: VipAddrKey, roles: u32) -> Result<(), DataplaneError>;
    /// Writes which VIP a backend's service answers for (`BACKEND_SERVICES`).
    fn set_backend_service(&mut self, key: ServiceKey, nat: ReplyNat) -> Result<(), DataplaneError>;
}
