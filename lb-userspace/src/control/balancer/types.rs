//! What callers of the [`Balancer`](super::Balancer) see: snapshots of its
//! VIPs and backends, what a change wrote, and why one failed.

use std::{fmt, net::SocketAddr, ops::AddAssign};

use crate::{
    config::model::{HealthCheckConfig, LimitsConfig, Protocol, Scheduler},
    dataplane::DataplaneError,
    health::Health,
};

/// What [`Balancer::install`](super::Balancer::install) or [`Balancer::set_health`](super::Balancer::set_health) wrote, for logs,
/// metrics and benchmarks of update cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Entries of `BACKENDS` written.
    pub backends_written: usize,
    /// Slots of `MAGLEV` written (only those that differed).
    pub slots_written: usize,
    /// Ring generations published, by one `upsert_vip` each.
    pub rings_published: usize,
}

impl Change {
    /// Whether nothing was written: the dataplane already matched.
    pub fn is_empty(&self) -> bool {
        *self == Change::default()
    }
}

impl AddAssign for Change {
    fn add_assign(&mut self, other: Change) {
        self.backends_written += other.backends_written;
        self.slots_written += other.slots_written;
        self.rings_published += other.rings_published;
    }
}

/// The dataplane write that failed, named for the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Writing the `BACKENDS` entry of a backend.
    WriteBackend { backend_id: u32, state: u8 },
    /// Writing changed slots into the ring generation packets do not read.
    WriteRing { generation: u32, slots: usize },
    /// The `upsert_vip` that makes a generation the one packets read.
    PublishRing { generation: u32 },
    /// Zeroing the per-VIP counters (`LIMITED`) of a reused VIP id.
    ResetStats { vip_id: u32 },
    /// Removing the `VIPS` entry of a VIP a reload removed.
    RemoveVip { vip_id: u32 },
    /// Writing the `VIP_ADDRS` entry of the VIP's address.
    WriteVipAddr { protos: u32 },
    /// Setting an `ADDR_FILTER` slot of the VIP's or a backend's address.
    WriteAddrFilter { slot: u32 },
    /// Writing the `ADDR_ROLES` entry of a backend's or the gateway's address.
    WriteAddrRoles { roles: u32 },
    /// Writing the `BACKEND_SERVICES` entry of a backend.
    WriteBackendService { backend_id: u32 },
    /// Writing the VIP's per-client limits or allow-list.
    WriteLimits,
    /// Writing the VIP's idle timeouts.
    WriteTimeouts,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Step::WriteBackend { backend_id, state } => {
                write!(f, "write backend {backend_id} as {}", Health::of_backend_state(state))
            }
            Step::WriteRing { generation, slots } => {
                write!(f, "write {slots} slots of ring generation {generation}")
            }
            Step::PublishRing { generation } => write!(f, "publish ring generation {generation}"),
            Step::ResetStats { vip_id } => write!(f, "reset the counters of reused vip id {vip_id}"),
            Step::RemoveVip { vip_id } => write!(f, "remove vip id {vip_id} from the vip map"),
            Step::WriteVipAddr { protos } => write!(f, "write protocols {protos:#x} of its address"),
            Step::WriteAddrFilter { slot } => write!(f, "set address filter slot {slot}"),
            Step::WriteAddrRoles { roles } => write!(f, "write address roles {roles:#x}"),
            Step::WriteBackendService { backend_id } => {
                write!(f, "write the service entry of backend {backend_id}")
            }
            Step::WriteLimits => write!(f, "write its per-client limits"),
            Step::WriteTimeouts => write!(f, "write its idle timeouts"),
        }
    }
}

/// Why the balancer's state could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Maglev's balance needs a prime ring size.
    #[error("ring size {ring_size} is not prime")]
    RingSizeNotPrime { ring_size: u32 },
    /// More VIPs than the maps were sized for (`agent.max_vips`).
    #[error("{count} vips configured, but the maps have room for {max} (agent.max_vips)")]
    TooManyVips { count: usize, max: u32 },
    /// More (VIP, backend) pairs than the backend array holds.
    #[error("{count} backends configured across all vips, but the backend array holds {max}")]
    TooManyBackends { count: usize, max: u32 },
    /// The rings would not fit the Maglev array's limit.
    #[error("{vips} vips with rings of {ring_size} slots need {entries} maglev entries, more than the limit of {max}")]
    MaglevTooLarge { vips: usize, ring_size: u32, entries: u64, max: u64 },
    /// An id that [`Balancer`](super::Balancer) did not allocate, e.g. from a stale caller.
    #[error("no backend has id {backend_id}")]
    UnknownBackend { backend_id: u32 },
    /// A reload named a VIP or backend the balancer does not have.
    #[error("reload: no {what} is running")]
    NotRunning { what: String },
    /// A reload added a VIP or backend the balancer has already.
    #[error("reload: {what} is already running")]
    AlreadyRunning { what: String },
    /// Backend ids are never reused while the agent runs, so reloads that
    /// add backends eventually run out of them.
    #[error(
        "reload adds {adding} backends, but {used} of the {max} backend ids are taken (ids are never reused; a restart renumbers)"
    )]
    OutOfBackendIds { used: usize, adding: usize, max: u32 },
    /// A dataplane write failed; the shadows record what is uncertain, so
    /// retrying the same call (or [`Balancer::install`](super::Balancer::install)) finishes the job.
    #[error("vip {vip}: cannot {step}")]
    Dataplane {
        vip: String,
        step: Step,
        // Boxed: it is large, and every Result of the balancer would carry its size.
        #[source]
        source: Box<DataplaneError>,
    },
}

impl StateError {
    /// Whether it was found before anything changed: a reload refused as a
    /// whole, the balancer as it was. Only [`StateError::Dataplane`] comes
    /// after the new desired state was recorded.
    pub fn changed_nothing(&self) -> bool {
        !matches!(self, StateError::Dataplane { .. })
    }
}

/// A VIP as the status API and the health checker see it: a snapshot, so the
/// caller may hold it after releasing the balancer's lock.
#[derive(Clone, Debug, PartialEq)]
pub struct VipView<'a> {
    /// Dense id from 1, at most `agent.max_vips`; selects its Maglev rings.
    pub vip_id: u32,
    /// Name from the config, for logs, metrics labels and status.
    pub name: &'a str,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// Which hash of a new flow picks its slot.
    pub scheduler: Scheduler,
    /// How its backends are probed.
    pub health_check: &'a HealthCheckConfig,
    /// Its per-client limits, if any.
    pub limits: Option<&'a LimitsConfig>,
    /// Generation packets read; `None` until the VIP is installed.
    pub ring_generation: Option<u32>,
    /// Its backends, in config order.
    pub backends: Vec<BackendView>,
    /// Ids of backends a reload removed from it, down for good: its traffic
    /// is the sum over these and [`VipView::backends`].
    pub retired_backend_ids: &'a [u32],
}

/// A backend as the status API and the health checker see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendView {
    /// Dense id from 1; indexes `BACKENDS` and `BACKEND_STATS`.
    pub backend_id: u32,
    /// The VIP it serves (one id per (VIP, backend) pair).
    pub vip_id: u32,
    pub address: SocketAddr,
    pub weight: u32,
    /// Takes new flows only while no primary of its VIP is available.
    pub backup: bool,
    pub health: Health,
    /// Drain or maintenance, set at runtime.
    pub admin: AdminState,
    /// A weight set at runtime, in force instead of the config's.
    pub weight_override: Option<u32>,
    /// Slots it holds in the VIP's live ring: its share of new flows.
    pub ring_slots: u32,
}

/// What an operator decided for a backend at runtime, apart from its health
/// (HAProxy's `ready`, `drain`, `maint`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new flows when up.
    #[default]
    Ready,
    /// No new flows; existing flows continue (what weight 0 does).
    Drain,
    /// Down at once whatever its health: its flows move at their next packet.
    Maint,
}

impl AdminState {
    /// Lowercase name, as the API and `lb status` show it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}
