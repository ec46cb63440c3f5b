//! The kernel side of the agent: loading and attaching the XDP program, and
//! typed access to its maps. Only this module talks to aya.
//!
//! The control logic (`crate::control`) decides what the maps must hold and
//! writes it through the [`Dataplane`] trait: [`Maps`] implements it over the
//! real maps, and tests use a fake that records the calls, so the logic is
//! tested without root.

mod loader;
mod maps;
pub mod pins;

pub use loader::{Attached, EBPF_OBJECT, LoadOptions, Program};
pub use maps::{ConntrackStats, Maps, OCCUPANCY_MAX_AGE};

use std::path::PathBuf;

use crate::config::model::Cidr;

use lb_common::{
    backend::BackendInfo,
    client_limits::VipLimits,
    flow::{FlowTimeouts, ReplyNat},
    guard::{ServiceKey, SharedService},
    vip::{VipInfo, VipKey},
    vip_addr::VipAddrKey,
};

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
    /// Zeroes the per-VIP counters of `vip_id` (`LIMITED`) on every CPU,
    /// before a reused id is published.
    fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError>;
    /// Writes the `ADDR_ROLE_*` bits of an address (`ADDR_ROLES`); 0 removes
    /// the address's entry, if it has one.
    fn set_addr_roles(&mut self, key: VipAddrKey, roles: u32) -> Result<(), DataplaneError>;
    /// Writes which VIP a backend's service answers for (`BACKEND_SERVICES`).
    fn set_backend_service(&mut self, key: ServiceKey, nat: ReplyNat) -> Result<(), DataplaneError>;
    /// Writes the VIPs a backend's service shared by several serves
    /// (`SHARED_SERVICES`).
    fn set_shared_service(&mut self, key: ServiceKey, list: SharedService) -> Result<(), DataplaneError>;
    /// Writes a VIP's idle timeouts (`VIP_TIMEOUTS[vip_id]`).
    fn set_vip_timeouts(&mut self, vip_id: u32, timeouts: FlowTimeouts) -> Result<(), DataplaneError>;
    /// Writes a VIP's per-client limits (`VIP_LIMITS[vip_id]`).
    fn set_vip_limits(&mut self, vip_id: u32, limits: VipLimits) -> Result<(), DataplaneError>;
    /// Adds (`allowed`) or removes a prefix of clients exempt from VIP
    /// `vip_id`'s limits (`LIMIT_ALLOW`).
    fn set_limit_allow(&mut self, vip_id: u32, cidr: Cidr, allowed: bool) -> Result<(), DataplaneError>;
}

/// What can go wrong between the agent and the kernel.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The binary was built with `AYA_BUILD_SKIP`, so it holds no program.
    #[error("this lb binary was built without its XDP program (AYA_BUILD_SKIP); rebuild it with `cargo xtask build`")]
    NoObject,
    /// The object failed to load: most often the verifier's verdict.
    #[error("loading the XDP program failed")]
    Load {
        #[source]
        // Boxed: it is large, and every Result of this module would carry its size.
        source: Box<aya::EbpfError>,
    },
    /// The program section was missing or refused by the verifier.
    #[error("the kernel refused the XDP program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// Attaching to an interface failed.
    #[error("attaching to {interface} in {mode} mode failed{hint}")]
    Attach {
        interface: String,
        mode: &'static str,
        hint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// The object lacks a map the agent needs: agent and program disagree.
    #[error("the XDP program has no map {name}")]
    MissingMap { name: &'static str },
    /// A map operation failed.
    #[error("{op} on map {name} failed")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A pinned link is not an XDP bpf_link (something else is pinned there).
    #[error("the pin of interface {interface}'s link is not an XDP link; run `lb unload` to clear the pin directory")]
    NotALink { interface: String },
    /// Pinning to bpffs failed.
    #[error("pinning to {path} failed")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

impl DataplaneError {
    /// A map write that failed, as a fake dataplane reports the failures it
    /// was told to inject: the same variant a real failed write gives.
    #[cfg(any(test, feature = "test-util"))]
    pub fn injected(name: &'static str, op: &'static str) -> Self {
        let io_error = std::io::Error::other("injected failure");
        let source =
            aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_elem", io_error });
        DataplaneError::Map { name, op, source }
    }
}
