//! The control plane's state: ids, health, and what every ring in the
//! dataplane holds, so each change writes only what differs.
//!
//! [`Balancer`] turns a validated [`Config`] into dense ids (VIP `n` is the
//! `n`-th `[[vip]]`, backend ids count (VIP, backend) pairs in file order) and
//! keeps, per VIP, a shadow copy of both Maglev rings as last written. A change
//! is published in three steps, always in this order, after a step 0 that
//! sets the `ADDR_FILTER` slots of the VIP's and its backends' addresses
//! (`lb_common::addr_filter`; without them the data path would pass their
//! packets untouched before any lookup):
//!
//! 1. Backends that may take new flows are written `UP`, before any ring can
//!    name them: the kernel drops a new flow whose slot names a backend that
//!    is not up.
//! 2. If the VIP's ring changed, the new ring's differing slots go into the
//!    generation packets are *not* reading, then one `upsert_vip` flips
//!    `ring_generation`. A packet reads the old ring or the new one, never a
//!    half-written one. A VIP's first publish writes generation 0 whole
//!    before its `VIPS` entry exists, so no packet sees it before its ring.
//! 3. Backends that may not take new flows are written `DOWN` only now, after
//!    the published ring no longer names them. Writing `DOWN` first would open
//!    a window where the live ring still names the backend: new flows hashing
//!    to its slots would be dropped, and flows pinned to it would be
//!    rescheduled through that same ring straight back to it (and dropped). In
//!    this order the kernel's "pinned backend is not up, pick again" path
//!    (`lb-ebpf/src/lookup.rs`, `backend_for_flow`) already sees a ring
//!    without it. Until step 3 lands, its existing flows keep going to it for
//!    a few microseconds more, which they were doing anyway while the health
//!    checks counted its failures.
//!
//! So at every point in the call sequence, the live ring names only backends
//! whose entry says `UP`; the tests replay every call against a fake
//! dataplane and check exactly that. `VIP_ADDRS` (which protocols have a VIP
//! on an address, for packets without ports) is derived from the published
//! VIPs and written right after each `VIPS` entry appears or goes.
//!
//! # Who is in the ring
//!
//! A backend is *available* for new flows when it is up and its weight is
//! above 0 (weight 0 drains: the backend stays `UP` in `BACKENDS`, so flows
//! pinned to it continue, but it holds no slot). A VIP's ring is built from
//! its available primaries; only when it has none (all down, unknown or
//! drained) is it built from its available backups instead. When a primary
//! becomes available again the next ring holds primaries only, so new flows
//! go back to them; flows already pinned to a backup keep going to it while
//! it stays up (the connection table pins them; only a backend that is not
//! `UP` loses its flows). A backup's `BACKENDS` entry follows its health like
//! any other's, so the readers' invariant above covers backups unchanged.
//!
//! The VIP's scheduler (`VIP_F_*` in `VipInfo.flags`) only changes which hash
//! of a new flow indexes the ring; the ring itself is the same.
//!
//! # Reloads
//!
//! A config reload ([`Balancer::apply_reload`], planned by
//! [`crate::control::plan`]) is built the same way: check, record the new desired
//! state, then sync each VIP it touched. Backend ids stay stable across
//! reloads: a backend removed by one is retired (written `DOWN`, so flows
//! pinned to it are rescheduled) and its id is never handed out again; an
//! added backend takes the next id never used.
//!
//! VIP ids are different: each selects two rings of the Maglev array, which
//! has room for `agent.max_vips` VIPs, so ids stay in `1..=max_vips` and a
//! removed VIP's id is reused, the lowest free one first. A removed VIP's
//! `VIPS` entry goes first (its packets pass to the kernel from then on),
//! then `VIP_ADDRS` follows, then its backends are written `DOWN`; until
//! all of that has landed its id is held back: no ring of a VIP that took the
//! id is written while a `VIPS` entry may still read it. (A packet already
//! past its `VIPS` lookup when the entry goes runs on for a microsecond or
//! so, in softirq; the new VIP's first slot write comes several syscalls
//! later.) A reused id starts clean:
//! - its rings still hold the removed VIP's slots, so the new VIP's shadows
//!   start unknown and its first publish rewrites generation 0 whole (every
//!   slot, `BACKEND_ID_NONE` too) before its `VIPS` entry is written. The
//!   shadows of a removed VIP are not kept for this: its slots name its own
//!   backends, which the new VIP never has, so almost every slot differs
//!   anyway;
//! - its `VIP_STATS` slot is zeroed before the new VIP is published. The
//!   removed VIP's flows may still add to it afterwards (their replies still
//!   match `REPLY_NAT`, which names the old id, until LRU evicts them), so
//!   the agent reports a VIP's traffic as the sum over its backends'
//!   `BACKEND_STATS`, whose ids are never reused, and not from `VIP_STATS`.
//!
//! Every write is recorded in the shadows only once it succeeded; on an error
//! the affected shadow is marked unknown, and the next [`Balancer::set_health`],
//! [`Balancer::apply_reload`] or [`Balancer::install`] rewrites what is
//! needed. So callers can simply retry.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::AddAssign,
};

use lb_common::{
    addr, addr_filter,
    backend::{BACKEND_ID_NONE, BACKEND_STATE_DOWN, BACKEND_STATE_UP, BackendInfo},
    flow::ReplyNat,
    guard::{ADDR_ROLE_BACKEND, ADDR_ROLE_LOCAL, ServiceKey},
    limits::{MAX_BACKENDS, MAX_MAGLEV_ENTRIES, MAX_VIPS, RINGS_PER_VIP},
    vip::{VipInfo, VipKey, ring_base},
    vip_addr::{VipAddrKey, proto_bit},
};

use crate::{
    config::model::{BackendConfig, Config, HealthCheckConfig, HealthCheckKind, Protocol, Scheduler, VipConfig},
    control::{
        maglev::{self, MaglevBackend},
        plan::Action,
    },
    dataplane::{Dataplane, DataplaneError},
};

/// What the agent believes about a backend.
///
/// `Unknown` is the state before the first verdict of the health checks; it
/// counts as not up, so a freshly started agent sends no flows to a backend
/// it has not seen answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
    Unknown,
}

impl Health {
    /// Whether the backend may take new flows (if it has weight).
    pub fn is_up(self) -> bool {
        self == Health::Up
    }

    /// Lowercase name for logs, metrics labels and the status API.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        }
    }

    /// Where a backend of a VIP probed with `kind` starts: up when nothing
    /// probes it, unknown until its first probe otherwise.
    fn initial(kind: &HealthCheckKind) -> Self {
        match kind {
            HealthCheckKind::None => Health::Up,
            HealthCheckKind::Http { .. } | HealthCheckKind::Tcp => Health::Unknown,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`Balancer::install`] or [`Balancer::set_health`] wrote, for logs,
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
    /// Zeroing the `VIP_STATS` slot of a reused VIP id.
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
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Step::WriteBackend { backend_id, state } => {
                let state = if state == BACKEND_STATE_UP {
                    "up"
                } else {
                    "down"
                };
                write!(f, "write backend {backend_id} as {state}")
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
    #[error(
        "{vips} vips with rings of {ring_size} slots need {entries} maglev entries, more than the limit of {max}"
    )]
    MaglevTooLarge {
        vips: usize,
        ring_size: u32,
        entries: u64,
        max: u64,
    },
    /// An id that [`Balancer`] did not allocate, e.g. from a stale caller.
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
    /// retrying the same call (or [`Balancer::install`]) finishes the job.
    #[error("vip {vip}: cannot {step}")]
    Dataplane {
        vip: String,
        step: Step,
        #[source]
        source: DataplaneError,
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
    /// Slots it holds in the VIP's live ring: its share of new flows.
    pub ring_slots: u32,
}

/// The control plane's state for one validated config.
///
/// # Examples
///
/// ```no_run
/// # fn demo(config: &lb::config::model::Config, maps: &mut impl lb::dataplane::Dataplane) -> anyhow::Result<()> {
/// use lb::control::state::Balancer;
///
/// let mut balancer = Balancer::new(config)?;
/// balancer.install(maps)?;
/// // Later, from the health checker:
/// let change = balancer.set_health(3, false, maps)?;
/// println!("{} ring slots rewritten", change.slots_written);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Balancer {
    ring_size: u32,
    /// VIP ids run from 1 to this: each owns two rings of `MAGLEV`, which the
    /// loader sized for this many VIPs.
    max_vips: u32,
    /// By id.
    vips: Vec<Vip>,
    /// Indexed by `backend_id - 1`.
    backends: Vec<Backend>,
    /// VIPs a reload removed whose `VIPS` entry, `VIP_ADDRS` share or
    /// backends' `DOWN` are not all written yet. Their ids may already belong
    /// to an added VIP, whose rings are not written until they are gone.
    removing: Vec<Removal>,
    /// Ids a removed VIP held and no VIP has taken since: their rings and
    /// `VIP_STATS` slot still hold that VIP's state.
    used_ids: BTreeSet<u32>,
    /// What `VIP_ADDRS` holds per address, as last written: `Some(protos)`,
    /// or `None` when unknown after a failed write. No entry: none written.
    vip_addrs: HashMap<VipAddrKey, Option<u32>>,
    /// `ADDR_FILTER` slots written; only ever grows.
    filter_slots: BTreeSet<u32>,
    /// Every backend address ever installed: each has the
    /// `ADDR_ROLE_BACKEND` bit in `ADDR_ROLES`. Only ever grows, like the
    /// filter: a removed backend's last replies still find their way.
    backend_addrs: HashSet<VipAddrKey>,
    /// The gateway's own addresses, as last given to
    /// [`Balancer::set_local_addresses`]: each has `ADDR_ROLE_LOCAL`.
    local_addrs: HashSet<VipAddrKey>,
    /// What `ADDR_ROLES` holds per address, as last written; no entry when
    /// none was written or a write failed.
    roles_written: HashMap<VipAddrKey, u32>,
}

#[derive(Clone, Debug)]
struct Vip {
    vip_id: u32,
    name: String,
    listen: SocketAddr,
    protocol: Protocol,
    scheduler: Scheduler,
    health_check: HealthCheckConfig,
    key: VipKey,
    backend_ids: Vec<u32>,
    /// Backends removed by a reload: written `DOWN` once the ring no longer
    /// names them; their ids are never reused.
    retired: Vec<u32>,
    /// What `VIPS` holds for it, as last written; `None` before its first
    /// publish.
    live: Option<VipInfo>,
    /// What each generation holds in `MAGLEV`; empty when unknown (after a
    /// failed write, or in a reused id), which makes the next diff rewrite
    /// every slot.
    rings: [Vec<u32>; 2],
    /// Its id was a removed VIP's, whose counts `VIP_STATS` still holds:
    /// zeroed before the first publish.
    stale_stats: bool,
    /// Its last sync did not finish (or none ran yet): a reload syncs it
    /// again even if it changes nothing about it.
    unsynced: bool,
}

/// A VIP removed by a reload, until the dataplane has forgotten it.
#[derive(Clone, Debug)]
struct Removal {
    vip_id: u32,
    name: String,
    key: VipKey,
    /// Whether its `VIPS` entry may still be there.
    live: bool,
    /// Every backend it had, all retired: written `DOWN` once its entry is gone.
    backend_ids: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Backend {
    backend_id: u32,
    vip_id: u32,
    address: SocketAddr,
    /// Maglev identity: the address, so config order does not move flows.
    key: String,
    weight: u32,
    backup: bool,
    health: Health,
    /// `BACKEND_STATE_*` last written; `None` before the first write or after
    /// a failed one.
    written_state: Option<u8>,
    ring_slots: u32,
    /// Removed by a reload: down for good, ignored by health events.
    retired: bool,
    /// Its `BACKEND_SERVICES` entry is written (it is never removed: a
    /// retired backend's late replies are still translated).
    service_written: bool,
}

impl Backend {
    fn new(backend_id: u32, vip_id: u32, config: &BackendConfig, health: Health) -> Self {
        Backend {
            backend_id,
            vip_id,
            address: config.address,
            key: config.address.to_string(),
            weight: config.weight,
            backup: config.backup,
            health,
            written_state: None,
            ring_slots: 0,
            retired: false,
            service_written: false,
        }
    }

    /// The state `BACKENDS` must hold. Weight 0 is still `UP`: such a backend
    /// is drained (no new flows) but keeps its existing ones.
    fn wanted_state(&self) -> u8 {
        if self.health.is_up() {
            BACKEND_STATE_UP
        } else {
            BACKEND_STATE_DOWN
        }
    }

    /// Whether it may take new flows: up, with weight.
    fn available(&self) -> bool {
        self.health.is_up() && self.weight > 0
    }

    /// Down for good: a reload removed it (or its VIP).
    fn retire(&mut self) {
        self.health = Health::Down;
        self.retired = true;
        self.ring_slots = 0;
    }
}

impl Vip {
    /// `reused`: the id was a removed VIP's, so its rings and counters hold
    /// that VIP's state.
    fn new(vip_id: u32, config: &VipConfig, backend_ids: Vec<u32>, ring_size: u32, reused: bool) -> Self {
        let rings = if reused {
            [Vec::new(), Vec::new()]
        } else {
            // The loader creates MAGLEV zeroed, so an id never used has both
            // rings all BACKEND_ID_NONE and zero slots need no write.
            // (Untouched zeroed Vecs cost no memory until written.)
            [vec![BACKEND_ID_NONE; ring_size as usize], vec![BACKEND_ID_NONE; ring_size as usize]]
        };
        Vip {
            vip_id,
            name: config.name.clone(),
            listen: config.listen,
            protocol: config.protocol,
            scheduler: config.scheduler,
            health_check: config.health_check.clone(),
            key: VipKey::new(config.listen, config.protocol.number()),
            backend_ids,
            retired: Vec::new(),
            live: None,
            rings,
            stale_stats: reused,
            unsynced: true,
        }
    }
}

impl Balancer {
    /// Allocates ids and initial health for `config`; writes nothing.
    ///
    /// Backends of VIPs without health checks start [`Health::Up`]; all others
    /// start [`Health::Unknown`] and take no flows until a check passes.
    ///
    /// # Errors
    ///
    /// If the config does not fit the maps: ring size not prime, more VIPs than
    /// `agent.max_vips` (or [`MAX_VIPS`]), more than `MAX_BACKENDS - 1`
    /// backends in all, or rings beyond [`MAX_MAGLEV_ENTRIES`]. Validation
    /// should already have refused these; this keeps indexes from wrapping.
    pub fn new(config: &Config) -> Result<Self, StateError> {
        let ring_size = config.agent.ring_size;
        if !maglev::is_prime(ring_size) {
            return Err(StateError::RingSizeNotPrime { ring_size });
        }
        let max_vips = config.agent.max_vips.min(MAX_VIPS);
        if config.vips.len() > max_vips as usize {
            return Err(StateError::TooManyVips {
                count: config.vips.len(),
                max: max_vips,
            });
        }
        let entries = config.vips.len() as u64 * u64::from(RINGS_PER_VIP) * u64::from(ring_size);
        if entries > MAX_MAGLEV_ENTRIES {
            return Err(StateError::MaglevTooLarge {
                vips: config.vips.len(),
                ring_size,
                entries,
                max: MAX_MAGLEV_ENTRIES,
            });
        }
        let backend_count: usize = config.vips.iter().map(|vip| vip.backends.len()).sum();
        if backend_count >= MAX_BACKENDS as usize {
            return Err(StateError::TooManyBackends {
                count: backend_count,
                max: MAX_BACKENDS - 1,
            });
        }

        let mut balancer = Balancer {
            ring_size,
            max_vips,
            vips: Vec::with_capacity(config.vips.len()),
            backends: Vec::with_capacity(backend_count),
            removing: Vec::new(),
            used_ids: BTreeSet::new(),
            vip_addrs: HashMap::new(),
            filter_slots: BTreeSet::new(),
            backend_addrs: HashSet::new(),
            local_addrs: HashSet::new(),
            roles_written: HashMap::new(),
        };
        // All ids are free, so VIP n takes id n.
        for vip in &config.vips {
            balancer.add_vip(vip);
        }
        Ok(balancer)
    }

    /// Tells the data path which addresses are the gateway's own (its
    /// interfaces'), so that packets from them never open a balanced flow
    /// (`lb_common::guard`). Writes only the differences from the last call;
    /// the agent calls it at start and whenever the addresses may have
    /// changed.
    ///
    /// # Errors
    ///
    /// [`StateError::Dataplane`] naming the write that failed; calling again
    /// retries what is left.
    pub fn set_local_addresses(
        &mut self,
        addrs: impl IntoIterator<Item = IpAddr>,
        dp: &mut impl Dataplane,
    ) -> Result<(), StateError> {
        let wanted: HashSet<VipAddrKey> = addrs
            .into_iter()
            .map(VipAddrKey::new)
            .collect();
        let changed: Vec<VipAddrKey> = wanted.symmetric_difference(&self.local_addrs).copied().collect();
        self.local_addrs = wanted;
        for key in changed.into_iter().chain(self.unwritten_roles()) {
            self.write_roles(key, dp).map_err(|(roles, source)| StateError::Dataplane {
                vip: "(the gateway's own addresses)".to_owned(),
                step: Step::WriteAddrRoles { roles },
                source,
            })?;
        }
        Ok(())
    }

    /// Addresses whose `ADDR_ROLES` entry a failed write left unknown.
    fn unwritten_roles(&self) -> Vec<VipAddrKey> {
        self.local_addrs.iter().filter(|key| !self.roles_written.contains_key(key)).copied().collect()
    }

    /// Writes everything into freshly loaded maps: every backend entry (`DOWN`
    /// unless up), each VIP's ring into generation 0 (only its non-zero
    /// slots, the array being zeroed), then each VIP with `ring_generation`
    /// 0, then its address in `VIP_ADDRS`. VIPs are published last, so no
    /// packet sees a VIP before its ring.
    ///
    /// It is idempotent: called again, it writes only what a failed earlier
    /// call (or reload) left out, so it doubles as "retry everything".
    ///
    /// # Errors
    ///
    /// [`StateError::Dataplane`] naming the write that failed; the VIPs before
    /// it are complete.
    pub fn install(&mut self, dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let mut change = self.sync_removals(dp)?;
        let ids: Vec<u32> = self.vips.iter().map(|vip| vip.vip_id).collect();
        for vip_id in ids {
            change += self.sync_vip(vip_id, dp)?;
        }
        Ok(change)
    }

    /// Records a health verdict and brings the dataplane in line with it: the
    /// backend's entry, and, if the VIP's eligible set changed, its ring,
    /// rebuilt and published as a new generation (see the module docs for the
    /// order and why). A verdict equal to the current one writes nothing
    /// unless an earlier failure left something to redo.
    ///
    /// # Errors
    ///
    /// [`StateError::UnknownBackend`] for an id not allocated here (nothing is
    /// written), or [`StateError::Dataplane`]; the verdict is kept either way,
    /// and calling again with it retries what is left.
    pub fn set_health(
        &mut self,
        backend_id: u32,
        up: bool,
        dp: &mut impl Dataplane,
    ) -> Result<Change, StateError> {
        let backend = self
            .backend_mut(backend_id)
            .ok_or(StateError::UnknownBackend { backend_id })?;
        if backend.retired {
            // A late verdict from a checker stopped by a reload.
            return Ok(Change::default());
        }
        backend.health = if up { Health::Up } else { Health::Down };
        let vip_id = backend.vip_id;
        self.sync_vip(vip_id, dp)
    }

    /// Changes a backend's weight and brings the dataplane in line, like
    /// [`Balancer::set_health`]. Weight 0 drains the backend: it leaves the
    /// ring (no new flows), but its `BACKENDS` entry keeps following its
    /// health, so flows pinned to it continue while it is up. A config
    /// reload does the same through [`Balancer::apply_reload`].
    ///
    /// # Errors
    ///
    /// As [`Balancer::set_health`]; the new weight is kept either way.
    pub fn set_weight(
        &mut self,
        backend_id: u32,
        weight: u32,
        dp: &mut impl Dataplane,
    ) -> Result<Change, StateError> {
        let backend = self
            .backend_mut(backend_id)
            .filter(|b| !b.retired)
            .ok_or(StateError::UnknownBackend { backend_id })?;
        backend.weight = weight;
        let vip_id = backend.vip_id;
        self.sync_vip(vip_id, dp)
    }

    /// Applies a config reload's actions (see [`crate::control::plan`]) and
    /// brings the dataplane in line: first the removed VIPs leave it, then
    /// one sync per VIP touched, so the module docs' order holds for every
    /// change: added backends are written before a ring names them, removed
    /// ones `DOWN` only after the live ring no longer does, and an added VIP
    /// is published only once its ring is whole.
    ///
    /// Everything is checked before anything changes, so an error from the
    /// check leaves the balancer as it was. An added VIP takes the lowest free
    /// id and fresh backend ids; a removed one's backends are retired and its
    /// id is freed (see the module docs for how a reused id starts clean). An
    /// added backend takes the next unused id (never one used before); a
    /// removed one is retired: `DOWN` for good, its flows rescheduled at their
    /// next packet, its id never reused. A health check becoming `none`
    /// brings the VIP's backends up; an added backend of a checked VIP starts
    /// [`Health::Unknown`].
    ///
    /// # Errors
    ///
    /// Before any change: [`StateError::NotRunning`] for an action naming a
    /// VIP or backend this balancer does not have,
    /// [`StateError::AlreadyRunning`] for adding one it has (or a VIP on the
    /// `listen` and protocol of one that stays), [`StateError::TooManyVips`]
    /// when more VIPs than `agent.max_vips` would run, or
    /// [`StateError::OutOfBackendIds`]. Or [`StateError::Dataplane`], after the
    /// desired state was recorded: a later reload, health event or
    /// [`Balancer::install`] retries the writes.
    pub fn apply_reload(&mut self, actions: &[Action], dp: &mut impl Dataplane) -> Result<Change, StateError> {
        self.check_reload(actions)?;
        for vip_id in self.record_reload(actions) {
            if let Ok(index) = self.vip_position(vip_id) {
                self.vips[index].unsynced = true;
            }
        }
        let mut change = self.sync_removals(dp)?;
        // The VIPs touched, and those an earlier failure left half-written.
        let ids: Vec<u32> = self.vips.iter().filter(|vip| vip.unsynced).map(|vip| vip.vip_id).collect();
        for vip_id in ids {
            change += self.sync_vip(vip_id, dp)?;
        }
        Ok(change)
    }

    /// Refuses `actions` unless every one applies to the state it finds: the
    /// VIPs and backends it names exist (or, added, do not), and what results
    /// fits the id spaces.
    fn check_reload(&self, actions: &[Action]) -> Result<(), StateError> {
        let not_running = |what: String| StateError::NotRunning { what };
        let mut removed: HashSet<&str> = HashSet::new();
        let mut added: Vec<(&str, VipKey)> = Vec::new();
        let mut backends_added = 0usize;
        for action in actions {
            let name = action.vip();
            // Only VIPs running before the reload, and not removed by it, can change in place.
            let running = self.vip_index_by_name(name).filter(|_| !removed.contains(name));
            match action {
                Action::RemoveVip { .. } => {
                    running.ok_or_else(|| not_running(format!("vip {name}")))?;
                    removed.insert(name);
                }
                Action::AddVip { vip } => {
                    let key = VipKey::new(vip.listen, vip.protocol.number());
                    let taken = self.vips.iter().any(|v| v.key == key && !removed.contains(v.name.as_str()))
                        || added.iter().any(|&(_, k)| k == key);
                    if taken {
                        let what = format!("a vip on {} {}", vip.listen, vip.protocol.as_str());
                        return Err(StateError::AlreadyRunning { what });
                    }
                    if running.is_some() || added.iter().any(|&(n, _)| n == name) {
                        return Err(StateError::AlreadyRunning { what: format!("vip {name}") });
                    }
                    added.push((name, key));
                    backends_added += vip.backends.len();
                }
                Action::AddBackend { backend, .. } => {
                    let index = running.ok_or_else(|| not_running(format!("vip {name}")))?;
                    if self.backend_of(index, backend.address).is_some() {
                        let what = format!("vip {name} backend {}", backend.address);
                        return Err(StateError::AlreadyRunning { what });
                    }
                    backends_added += 1;
                }
                Action::SetWeight { address, .. } | Action::SetBackup { address, .. } | Action::RemoveBackend { address, .. } => {
                    let index = running.ok_or_else(|| not_running(format!("vip {name}")))?;
                    self.backend_of(index, *address)
                        .ok_or_else(|| not_running(format!("vip {name} backend {address}")))?;
                }
                Action::SetScheduler { .. } | Action::SetHealthCheck { .. } => {
                    running.ok_or_else(|| not_running(format!("vip {name}")))?;
                }
            }
        }
        let count = self.vips.len() - removed.len() + added.len();
        if count > self.max_vips as usize {
            return Err(StateError::TooManyVips { count, max: self.max_vips });
        }
        if self.backends.len() + backends_added >= MAX_BACKENDS as usize {
            return Err(StateError::OutOfBackendIds {
                used: self.backends.len(),
                adding: backends_added,
                max: MAX_BACKENDS - 1,
            });
        }
        Ok(())
    }

    /// Records what checked `actions` ask for, writing nothing; returns the
    /// ids of the VIPs to sync.
    fn record_reload(&mut self, actions: &[Action]) -> BTreeSet<u32> {
        let mut touched = BTreeSet::new();
        // Health checks first, so an added backend starts as its VIP's new check says.
        for action in actions {
            if let Action::SetHealthCheck { vip, check } = action {
                touched.extend(self.set_health_check(vip, check));
            }
        }
        for action in actions {
            let name = action.vip();
            match action {
                Action::SetHealthCheck { .. } => {}
                Action::RemoveVip { .. } => self.remove_vip(name),
                Action::AddVip { vip } => {
                    touched.extend(self.add_vip(vip));
                }
                Action::SetScheduler { to, .. } => {
                    if let Some(vip) = self.vip_by_name_mut(name) {
                        vip.scheduler = *to;
                        touched.insert(vip.vip_id);
                    }
                }
                Action::SetWeight { address, to, .. } => {
                    touched.extend(self.with_backend(name, *address, |b| b.weight = *to));
                }
                Action::SetBackup { address, to, .. } => {
                    touched.extend(self.with_backend(name, *address, |b| b.backup = *to));
                }
                Action::RemoveBackend { address, .. } => {
                    touched.extend(self.remove_backend(name, *address));
                }
                Action::AddBackend { backend, .. } => {
                    let Some(index) = self.vip_index_by_name(name) else { continue };
                    let (vip_id, health) = (self.vips[index].vip_id, Health::initial(&self.vips[index].health_check.kind));
                    let backend_id = self.add_backend(vip_id, backend, health);
                    self.vips[index].backend_ids.push(backend_id);
                    touched.insert(vip_id);
                }
            }
        }
        touched
    }

    /// A VIP's new health check; `none` brings its backends up. Returns its id.
    fn set_health_check(&mut self, name: &str, check: &HealthCheckConfig) -> Option<u32> {
        let index = self.vip_index_by_name(name)?;
        let vip = &mut self.vips[index];
        vip.health_check = check.clone();
        if matches!(check.kind, HealthCheckKind::None) {
            for &id in &vip.backend_ids {
                if let Some(backend) = self.backends.get_mut(backend_index(id)) {
                    backend.health = Health::Up;
                }
            }
        }
        Some(vip.vip_id)
    }

    /// Applies `f` to the (not retired) backend at `address` of VIP `name`;
    /// returns the VIP's id.
    fn with_backend(&mut self, name: &str, address: SocketAddr, f: impl FnOnce(&mut Backend)) -> Option<u32> {
        let index = self.vip_index_by_name(name)?;
        let backend = self.backend_of(index, address).and_then(|id| self.backend_mut(id))?;
        f(backend);
        Some(backend.vip_id)
    }

    /// Retires the backend at `address` of VIP `name`; returns the VIP's id.
    fn remove_backend(&mut self, name: &str, address: SocketAddr) -> Option<u32> {
        let index = self.vip_index_by_name(name)?;
        let id = self.backend_of(index, address)?;
        self.backend_mut(id)?.retire();
        let vip = &mut self.vips[index];
        vip.backend_ids.retain(|&b| b != id);
        vip.retired.push(id);
        Some(vip.vip_id)
    }

    /// Gives `config` the lowest free VIP id and fresh backend ids; returns
    /// its id, or `None` when no id is free (which the callers checked).
    fn add_vip(&mut self, config: &VipConfig) -> Option<u32> {
        let vip_id = (1..=self.max_vips).find(|&id| self.vip_position(id).is_err())?;
        let reused = self.used_ids.remove(&vip_id);
        let health = Health::initial(&config.health_check.kind);
        let backend_ids = config.backends.iter().map(|backend| self.add_backend(vip_id, backend, health)).collect();
        let vip = Vip::new(vip_id, config, backend_ids, self.ring_size, reused);
        let at = self.vip_position(vip_id).unwrap_or_else(|at| at);
        self.vips.insert(at, vip);
        Some(vip_id)
    }

    /// A backend of VIP `vip_id` under the next id never used (the caller
    /// checked that one is left: below `MAX_BACKENDS`, so it fits a u32).
    fn add_backend(&mut self, vip_id: u32, config: &BackendConfig, health: Health) -> u32 {
        let backend_id = self.backends.len() as u32 + 1;
        self.backends.push(Backend::new(backend_id, vip_id, config, health));
        backend_id
    }

    /// Takes VIP `name` out of service: its backends are retired, and it waits
    /// in `removing` until [`Balancer::sync_removals`] has taken it out of the
    /// maps.
    fn remove_vip(&mut self, name: &str) {
        let Some(index) = self.vip_index_by_name(name) else { return };
        let vip = self.vips.remove(index);
        let backend_ids: Vec<u32> = vip.backend_ids.iter().chain(&vip.retired).copied().collect();
        for &id in &backend_ids {
            if let Some(backend) = self.backend_mut(id) {
                backend.retire();
            }
        }
        self.used_ids.insert(vip.vip_id);
        self.removing.push(Removal {
            vip_id: vip.vip_id,
            name: vip.name,
            key: vip.key,
            live: vip.live.is_some(),
            backend_ids,
        });
    }

    /// Takes each removed VIP out of the maps, in the order of the module
    /// docs: its `VIPS` entry, its share of `VIP_ADDRS`, its backends `DOWN`.
    /// A removal is forgotten only once all of it landed, so a failure is
    /// retried by the next call.
    fn sync_removals(&mut self, dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let mut change = Change::default();
        while let Some(removal) = self.removing.first() {
            let (vip_id, name, key, ids) = (removal.vip_id, removal.name.clone(), removal.key, removal.backend_ids.clone());
            if removal.live {
                dp.remove_vip(&key).map_err(|source| StateError::Dataplane {
                    vip: name.clone(),
                    step: Step::RemoveVip { vip_id },
                    source,
                })?;
                if let Some(removal) = self.removing.first_mut() {
                    removal.live = false;
                }
            }
            self.sync_vip_addr(&name, &key, dp)?;
            for id in ids {
                change.backends_written += usize::from(self.write_backend_if(&name, id, BACKEND_STATE_DOWN, dp)?);
            }
            self.removing.remove(0);
        }
        Ok(change)
    }

    fn vip_index_by_name(&self, name: &str) -> Option<usize> {
        self.vips.iter().position(|vip| vip.name == name)
    }

    fn vip_by_name_mut(&mut self, name: &str) -> Option<&mut Vip> {
        self.vips.iter_mut().find(|vip| vip.name == name)
    }

    /// Where VIP `vip_id` is in `vips` (sorted by id), or where it would go.
    fn vip_position(&self, vip_id: u32) -> Result<usize, usize> {
        self.vips.binary_search_by_key(&vip_id, |vip| vip.vip_id)
    }

    /// The id of the (not retired) backend at `address` of the VIP at `index`.
    fn backend_of(&self, index: usize, address: SocketAddr) -> Option<u32> {
        self.vips.get(index)?.backend_ids.iter().copied().find(|&id| {
            self.backends.get(backend_index(id)).is_some_and(|b| b.address == address)
        })
    }

    /// Slots per ring, the same for every VIP.
    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// Every VIP, by id: config order at start; a VIP added by a reload
    /// takes the lowest free id.
    pub fn vips(&self) -> impl ExactSizeIterator<Item = VipView<'_>> + '_ {
        self.vips.iter().map(|vip| self.view(vip))
    }

    /// One VIP by id, e.g. to label a `VIP_STATS` entry.
    pub fn vip(&self, vip_id: u32) -> Option<VipView<'_>> {
        let index = self.vip_position(vip_id).ok()?;
        self.vips.get(index).map(|vip| self.view(vip))
    }

    /// Every backend of every VIP, by id: what the health checker probes.
    /// Backends removed by a reload are left out.
    pub fn backends(&self) -> impl Iterator<Item = BackendView> + '_ {
        self.backends.iter().filter(|b| !b.retired).map(Backend::view)
    }

    /// One backend by id, e.g. to label a `BACKEND_STATS` entry; retired
    /// ones too.
    pub fn backend(&self, backend_id: u32) -> Option<BackendView> {
        self.backends
            .get(backend_index(backend_id))
            .map(Backend::view)
    }

    /// Whether a reload removed the backend (or its VIP): its health no
    /// longer matters.
    pub fn is_retired(&self, backend_id: u32) -> bool {
        self.backends.get(backend_index(backend_id)).is_some_and(|b| b.retired)
    }

    /// "vip web backend 198.18.2.11:8080 (id 3)": how logs name a backend.
    pub fn describe_backend(&self, backend_id: u32) -> String {
        match self.backends.get(backend_index(backend_id)) {
            // Its VIP may be gone, and its id another VIP's.
            Some(backend) if backend.retired => format!("retired backend {} (id {backend_id})", backend.address),
            Some(backend) => {
                let vip = self.vip(backend.vip_id).map_or("?", |vip| vip.name);
                format!("vip {vip} backend {} (id {backend_id})", backend.address)
            }
            None => format!("unknown backend (id {backend_id})"),
        }
    }

    /// The ring packets of `vip_id` read, as last written; `None` before the
    /// VIP is installed or when the id is unknown.
    pub fn live_ring(&self, vip_id: u32) -> Option<&[u32]> {
        let vip = self.vips.get(self.vip_position(vip_id).ok()?)?;
        let live = vip.live?;
        vip.rings.get((live.ring_generation & 1) as usize).map(Vec::as_slice)
    }

    fn view<'a>(&'a self, vip: &'a Vip) -> VipView<'a> {
        VipView {
            vip_id: vip.vip_id,
            name: &vip.name,
            listen: vip.listen,
            protocol: vip.protocol,
            scheduler: vip.scheduler,
            health_check: &vip.health_check,
            ring_generation: vip.live.map(|live| live.ring_generation),
            backends: vip
                .backend_ids
                .iter()
                .filter_map(|&id| self.backend(id))
                .collect(),
            retired_backend_ids: &vip.retired,
        }
    }

    fn backend_mut(&mut self, backend_id: u32) -> Option<&mut Backend> {
        self.backends.get_mut(backend_index(backend_id))
    }

    /// Makes the dataplane match the desired state of one VIP, in the three
    /// steps of the module docs, then its address's `VIP_ADDRS` entry.
    fn sync_vip(&mut self, vip_id: u32, dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let mut change = Change::default();
        let Ok(index) = self.vip_position(vip_id) else {
            return Ok(change);
        };
        if self.removing.iter().any(|removal| removal.vip_id == vip_id) {
            // Its rings may still be read through the removed VIP's entry: that
            // goes first, or if it cannot, nothing is written.
            change += self.sync_removals(dp)?;
        }
        let vip = &mut self.vips[index];
        vip.unsynced = true;
        let (name, key, ids, retired) = (vip.name.clone(), vip.key, vip.backend_ids.clone(), vip.retired.clone());

        // 0. In the address filter before anything names them, or the
        // data path would pass their packets untouched.
        self.mark_addresses(&name, &key, &ids, dp)?;

        // 1. Up before any ring names them.
        for &id in &ids {
            change.backends_written += usize::from(self.write_backend_if(&name, id, BACKEND_STATE_UP, dp)?);
        }

        // 2. The ring, through the generation packets do not read.
        change += self.publish(index, &ids, dp)?;

        // 3. Down only once the live ring no longer names them.
        for &id in ids.iter().chain(&retired) {
            change.backends_written += usize::from(self.write_backend_if(&name, id, BACKEND_STATE_DOWN, dp)?);
        }
        self.sync_vip_addr(&name, &key, dp)?;
        if let Some(vip) = self.vips.get_mut(index) {
            vip.unsynced = false;
        }
        Ok(change)
    }

    /// Step 0 of the module docs: sets the `ADDR_FILTER` slots of the VIP's
    /// address and of its backends' addresses that are not set yet, marks
    /// the backends' addresses in `ADDR_ROLES` and writes their
    /// `BACKEND_SERVICES` entries (`lb_common::guard`), so that the data
    /// path knows a backend's replies before any flow goes to it.
    fn mark_addresses(&mut self, vip: &str, key: &VipKey, ids: &[u32], dp: &mut impl Dataplane) -> Result<(), StateError> {
        let failed = |step: Step| {
            let vip = vip.to_owned();
            move |source| StateError::Dataplane { vip, step, source }
        };
        let backends = ids.iter().filter_map(|&id| self.backends.get(backend_index(id)));
        let slots: Vec<u32> = std::iter::once(key.addr_be)
            .chain(backends.map(|b| addr::words(b.address.ip())))
            .map(|addr| addr_filter::slot(&addr))
            .filter(|slot| !self.filter_slots.contains(slot))
            .collect();
        for slot in slots {
            dp.set_addr_filter(slot).map_err(failed(Step::WriteAddrFilter { slot }))?;
            self.filter_slots.insert(slot);
        }
        for &id in ids {
            let Some(backend) = self.backends.get(backend_index(id)) else { continue };
            let (address, backend_vip_id, service_written) = (backend.address, backend.vip_id, backend.service_written);
            let addr_key = VipAddrKey::new(address.ip());
            self.backend_addrs.insert(addr_key);
            self.write_roles(addr_key, dp).map_err(|(roles, source)| failed(Step::WriteAddrRoles { roles })(source))?;
            if service_written {
                continue;
            }
            let service = ServiceKey::new(address, key.proto);
            let nat = ReplyNat::new(key, backend_vip_id, id);
            dp.set_backend_service(service, nat).map_err(failed(Step::WriteBackendService { backend_id: id }))?;
            if let Some(backend) = self.backend_mut(id) {
                backend.service_written = true;
            }
        }
        Ok(())
    }

    /// Writes the `ADDR_ROLES` entry of `key` if it differs from what the
    /// entry must hold; on failure, the roles it tried to write.
    fn write_roles(&mut self, key: VipAddrKey, dp: &mut impl Dataplane) -> Result<(), (u32, DataplaneError)> {
        let roles = u32::from(self.local_addrs.contains(&key)) * ADDR_ROLE_LOCAL
            | u32::from(self.backend_addrs.contains(&key)) * ADDR_ROLE_BACKEND;
        if self.roles_written.get(&key) == Some(&roles) {
            return Ok(());
        }
        self.roles_written.remove(&key);
        dp.set_addr_roles(key, roles).map_err(|source| (roles, source))?;
        self.roles_written.insert(key, roles);
        Ok(())
    }

    /// Step 2 of the module docs for the VIP at `index` with backends `ids`:
    /// writes a changed ring into the generation packets do not read (0
    /// before the first publish), then publishes it, with the scheduler's
    /// flags, in one `upsert_vip`. A new scheduler alone republishes the
    /// live generation.
    fn publish(&mut self, index: usize, ids: &[u32], dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let mut change = Change::default();
        let ring = maglev::build_ring(self.ring_size, &self.ring_members(ids));
        let ring_size = self.ring_size;
        let vip = &mut self.vips[index];
        let flags = vip.scheduler.vip_flags();
        let ring_changed = vip.live.is_none_or(|live| vip.rings[(live.ring_generation & 1) as usize] != ring);
        if !ring_changed && vip.live.is_some_and(|live| live.flags == flags) {
            return Ok(change);
        }
        let failed = |name: &str, step: Step| {
            let vip = name.to_owned();
            move |source| StateError::Dataplane { vip, step, source }
        };
        if vip.live.is_none() && vip.stale_stats {
            dp.reset_vip_stats(vip.vip_id)
                .map_err(failed(&vip.name, Step::ResetStats { vip_id: vip.vip_id }))?;
            vip.stale_stats = false;
        }
        let target = match vip.live {
            // Before the first publish no packet reads either ring; start at 0.
            None => 0,
            Some(live) if ring_changed => (live.ring_generation & 1) ^ 1,
            Some(live) => live.ring_generation & 1,
        };
        if ring_changed {
            let base = ring_base(vip.vip_id, target, ring_size);
            let shadow = &mut vip.rings[target as usize];
            // `new` keeps base + slot within the Maglev limit, far below u32::MAX.
            let writes: Vec<(u32, u32)> = maglev::ring_diff(shadow, &ring)
                .into_iter()
                .map(|(slot, id)| (base + slot, id))
                .collect();
            if !writes.is_empty()
                && let Err(source) = dp.write_ring_slots(&writes)
            {
                // Some slots may have landed: the contents are unknown now.
                shadow.clear();
                let step = Step::WriteRing { generation: target, slots: writes.len() };
                return Err(StateError::Dataplane { vip: vip.name.clone(), step, source });
            }
            *shadow = ring;
            change.slots_written += writes.len();
        }
        let info = VipInfo { vip_id: vip.vip_id, ring_size, ring_generation: target, flags };
        dp.upsert_vip(vip.key, info)
            .map_err(failed(&vip.name, Step::PublishRing { generation: target }))?;
        vip.live = Some(info);
        change.rings_published += 1;
        self.count_ring_slots(index);
        Ok(change)
    }

    /// Brings the `VIP_ADDRS` entry of `key`'s address in line with the VIPs
    /// published there (removed ones whose entry may remain included). Named
    /// `vip` in errors.
    fn sync_vip_addr(&mut self, vip: &str, key: &VipKey, dp: &mut impl Dataplane) -> Result<(), StateError> {
        let addr = key.addr_key();
        let live = self.vips.iter().filter(|v| v.live.is_some()).map(|v| &v.key);
        let leaving = self.removing.iter().filter(|r| r.live).map(|r| &r.key);
        let protos = live
            .chain(leaving)
            .filter(|k| k.addr_key() == addr)
            .fold(0, |protos, k| protos | proto_bit(k.proto));
        let written = self.vip_addrs.get(&addr).copied().unwrap_or(Some(0));
        if written == Some(protos) {
            return Ok(());
        }
        self.vip_addrs.insert(addr, None);
        dp.set_vip_addr(addr, protos).map_err(|source| StateError::Dataplane {
            vip: vip.to_owned(),
            step: Step::WriteVipAddr { protos },
            source,
        })?;
        if protos == 0 {
            self.vip_addrs.remove(&addr);
        } else {
            self.vip_addrs.insert(addr, Some(protos));
        }
        Ok(())
    }

    /// The backends a VIP's ring is built from: its available primaries, or,
    /// when it has none, its available backups (see the module docs).
    fn ring_members<'a>(&'a self, ids: &[u32]) -> Vec<MaglevBackend<'a>> {
        let available: Vec<&Backend> = ids
            .iter()
            .filter_map(|&id| self.backends.get(backend_index(id)))
            .filter(|b| b.available())
            .collect();
        let any_primary = available.iter().any(|b| !b.backup);
        available
            .into_iter()
            // Backups sit out while any primary is available.
            .filter(|b| !(any_primary && b.backup))
            .map(|b| MaglevBackend {
                id: b.backend_id,
                key: &b.key,
                weight: b.weight,
            })
            .collect()
    }

    /// Writes backend `id`'s entry if it should hold `state` and may not yet;
    /// returns whether it wrote. Errors name VIP `vip`.
    fn write_backend_if(
        &mut self,
        vip: &str,
        id: u32,
        state: u8,
        dp: &mut impl Dataplane,
    ) -> Result<bool, StateError> {
        let Some(backend) = self.backends.get_mut(backend_index(id)) else {
            return Ok(false);
        };
        if backend.wanted_state() != state || backend.written_state == Some(state) {
            return Ok(false);
        }
        backend.written_state = None;
        if let Err(source) = dp.set_backend(id, BackendInfo::new(backend.address, state)) {
            return Err(StateError::Dataplane {
                vip: vip.to_owned(),
                step: Step::WriteBackend {
                    backend_id: id,
                    state,
                },
                source,
            });
        }
        backend.written_state = Some(state);
        Ok(true)
    }

    /// Refreshes each backend's share of the VIP's live ring for the status API.
    fn count_ring_slots(&mut self, vip_index: usize) {
        let Some(vip) = self.vips.get(vip_index) else {
            return;
        };
        for &id in &vip.backend_ids {
            if let Some(backend) = self.backends.get_mut(backend_index(id)) {
                backend.ring_slots = 0;
            }
        }
        let Some(live) = vip.live else { return };
        for &id in &vip.rings[(live.ring_generation & 1) as usize] {
            if id != BACKEND_ID_NONE
                && let Some(backend) = self.backends.get_mut(backend_index(id))
            {
                backend.ring_slots += 1;
            }
        }
    }
}

impl Backend {
    fn view(&self) -> BackendView {
        BackendView {
            backend_id: self.backend_id,
            vip_id: self.vip_id,
            address: self.address,
            weight: self.weight,
            backup: self.backup,
            health: self.health,
            ring_slots: self.ring_slots,
        }
    }
}

/// Index into `Balancer::backends`; id 0 maps past the end, so it is never found.
fn backend_index(backend_id: u32) -> usize {
    (backend_id as usize).wrapping_sub(1)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeSet, HashMap},
        path::PathBuf,
        time::Duration,
    };

    use lb_common::{
        FAMILY_V4, FAMILY_V6, map_names,
        vip_addr::{VIP_ADDR_TCP, VIP_ADDR_UDP},
    };

    use super::*;
    use crate::config::model::{AgentConfig, XdpMode};

    const M: u32 = lb_common::limits::DEFAULT_RING_SIZE;

    fn vip_key(listen: SocketAddr, protocol: Protocol) -> VipKey {
        VipKey::new(listen, protocol.number())
    }

    fn backend_info(address: SocketAddr, state: u8) -> BackendInfo {
        BackendInfo::new(address, state)
    }
    /// A smaller prime for tests that rebuild rings hundreds of times.
    const SMALL_M: u32 = 4099;

    // ---- config builders ----

    fn addr(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
    }

    fn vip_config(
        name: &str,
        listen: &str,
        backends: &[(&str, u32)],
        kind: HealthCheckKind,
    ) -> VipConfig {
        VipConfig {
            name: name.to_owned(),
            listen: addr(listen),
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Maglev,
            health_check: HealthCheckConfig {
                kind,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 2,
                port: None,
            },
            backends: backends
                .iter()
                .map(|&(a, weight)| BackendConfig {
                    address: addr(a),
                    weight,
                    backup: false,
                })
                .collect(),
        }
    }

    fn config(ring_size: u32, vips: Vec<VipConfig>) -> Config {
        Config {
            source: PathBuf::from("test.toml"),
            agent: AgentConfig {
                interfaces: vec!["veth-test".to_owned()],
                admin_listen: addr("127.0.0.1:9900"),
                xdp_mode: XdpMode::Native,
                conntrack_capacity: 1024,
                ring_size,
                max_vips: 4,
                max_vips_set: true,
            },
            vips,
        }
    }

    /// One VIP with `n` equal backends, always up (no health checks).
    fn equal_vip(n: usize) -> VipConfig {
        let addrs: Vec<String> = (0..n)
            .map(|i| format!("198.18.2.{}:8080", i + 10))
            .collect();
        let backends: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
        vip_config("web", "198.18.0.10:80", &backends, HealthCheckKind::None)
    }

    /// `vip` with the backends at `positions` (0-based, config order) made backups.
    fn with_backups(mut vip: VipConfig, positions: &[usize]) -> VipConfig {
        for &i in positions {
            if let Some(backend) = vip.backends.get_mut(i) {
                backend.backup = true;
            }
        }
        vip
    }

    fn balancer(config: &Config) -> Balancer {
        Balancer::new(config).unwrap_or_else(|e| panic!("config refused: {e}"))
    }

    // ---- the fake dataplane ----

    #[derive(Clone, Debug, PartialEq)]
    enum Call {
        UpsertVip { key: VipKey, info: VipInfo },
        RemoveVip { key: VipKey },
        SetVipAddr { key: VipAddrKey, protos: u32 },
        SetBackend { backend_id: u32, info: BackendInfo },
        WriteSlots { slots: Vec<(u32, u32)> },
        ResetStats { vip_id: u32 },
    }

    /// Records calls and models the maps. After every call it plays a reader:
    /// it panics if a live ring names a backend that is not `UP`, or if a ring
    /// write touched a ring packets are reading.
    struct FakeDataplane {
        calls: Vec<Call>,
        vips: HashMap<VipKey, VipInfo>,
        vip_addrs: HashMap<VipAddrKey, u32>,
        backends: HashMap<u32, BackendInfo>,
        maglev: Vec<u32>,
        /// Packets per VIP id, as `VIP_STATS` would count them.
        vip_stats: HashMap<u32, u64>,
        /// `ADDR_FILTER` slots set.
        filter: BTreeSet<u32>,
        /// `ADDR_ROLES` as written.
        roles: HashMap<VipAddrKey, u32>,
        /// `BACKEND_SERVICES` as written.
        services: HashMap<ServiceKey, ReplyNat>,
        attempts: usize,
        /// Fail the attempt with this index (counted over the fake's life); a
        /// failing slot write still applies its first half, like a syscall
        /// loop that stops midway.
        fail_attempt: Option<usize>,
    }

    impl FakeDataplane {
        fn for_config(config: &Config) -> Self {
            let entries = config.agent.max_vips * RINGS_PER_VIP * config.agent.ring_size;
            FakeDataplane {
                calls: Vec::new(),
                vips: HashMap::new(),
                vip_addrs: HashMap::new(),
                backends: HashMap::new(),
                maglev: vec![0; entries as usize],
                vip_stats: HashMap::new(),
                filter: BTreeSet::new(),
                roles: HashMap::new(),
                services: HashMap::new(),
                attempts: 0,
                fail_attempt: None,
            }
        }

        /// Fails the `n`-th call from now (0 = the next one).
        fn fail_in(&mut self, n: usize) {
            self.fail_attempt = Some(self.attempts + n);
        }

        fn attempt(&mut self) -> bool {
            let failing = self.fail_attempt == Some(self.attempts);
            self.attempts += 1;
            failing
        }

        fn live_ring(&self, key: &VipKey) -> Option<&[u32]> {
            let info = self.vips.get(key)?;
            let base = info.ring_base() as usize;
            self.maglev.get(base..base + info.ring_size as usize)
        }

        fn ring(&self, vip_id: u32, generation: u32, ring_size: u32) -> &[u32] {
            let base = ring_base(vip_id, generation, ring_size) as usize;
            &self.maglev[base..base + ring_size as usize]
        }

        fn check_readers(&self) {
            for (key, info) in &self.vips {
                assert!(
                    self.filter.contains(&addr_filter::slot(&key.addr_be)),
                    "after call {}: vip {} published before its address is in the filter",
                    self.calls.len(),
                    info.vip_id
                );
                let ring = self
                    .live_ring(key)
                    .unwrap_or_else(|| panic!("vip {} ring out of the array", info.vip_id));
                for (slot, &id) in ring.iter().enumerate() {
                    if id == BACKEND_ID_NONE {
                        continue;
                    }
                    let backend = self.backends.get(&id);
                    if let Some(b) = backend {
                        assert!(
                            self.filter.contains(&addr_filter::slot(&b.addr_be)),
                            "after call {}: backend {id} in a live ring before its address is in the filter",
                            self.calls.len()
                        );
                        let addr = VipAddrKey { addr_be: b.addr_be, family: b.family, _pad: [0; 3] };
                        assert!(
                            self.roles.get(&addr).is_some_and(|r| r & ADDR_ROLE_BACKEND != 0),
                            "after call {}: backend {id} in a live ring before its address has the backend role",
                            self.calls.len()
                        );
                        let service = ServiceKey { addr_be: b.addr_be, port_be: b.port_be, proto: key.proto, family: b.family };
                        assert!(
                            self.services.get(&service).is_some_and(|nat| nat.backend_id == id && nat.vip_addr_be == key.addr_be),
                            "after call {}: backend {id} in a live ring before its service entry names it",
                            self.calls.len()
                        );
                    }
                    let state = backend.map(|b| b.state);
                    assert_eq!(
                        state,
                        Some(BACKEND_STATE_UP),
                        "after call {}: vip {} live slot {slot} names backend {id} in state {state:?}",
                        self.calls.len(),
                        info.vip_id
                    );
                }
            }
        }

        fn calls_since(&self, start: usize) -> &[Call] {
            &self.calls[start..]
        }
    }

    impl Dataplane for FakeDataplane {
        fn upsert_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DataplaneError> {
            if self.attempt() {
                return Err(DataplaneError::injected(map_names::VIPS, "insert"));
            }
            self.vips.insert(key, info);
            self.calls.push(Call::UpsertVip { key, info });
            self.check_readers();
            Ok(())
        }

        fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
            if self.attempt() {
                return Err(DataplaneError::injected(map_names::VIPS, "remove"));
            }
            assert!(self.vips.remove(key).is_some(), "removed a vip that is not in the map: {key:?}");
            self.calls.push(Call::RemoveVip { key: *key });
            Ok(())
        }

        fn set_addr_filter(&mut self, slot: u32) -> Result<(), DataplaneError> {
            // Not a call the sequence tests count: the invariant that matters
            // (published addresses have their slot) is checked by check_readers.
            self.filter.insert(slot);
            Ok(())
        }

        fn set_addr_roles(&mut self, key: VipAddrKey, roles: u32) -> Result<(), DataplaneError> {
            // Not counted either; check_readers checks the invariant.
            if roles == 0 {
                self.roles.remove(&key);
            } else {
                self.roles.insert(key, roles);
            }
            Ok(())
        }

        fn set_backend_service(&mut self, key: ServiceKey, nat: ReplyNat) -> Result<(), DataplaneError> {
            self.services.insert(key, nat);
            Ok(())
        }

        fn set_vip_addr(&mut self, key: VipAddrKey, protos: u32) -> Result<(), DataplaneError> {
            if self.attempt() {
                return Err(DataplaneError::injected(map_names::VIP_ADDRS, "write"));
            }
            if protos == 0 {
                self.vip_addrs.remove(&key);
            } else {
                self.vip_addrs.insert(key, protos);
            }
            self.calls.push(Call::SetVipAddr { key, protos });
            Ok(())
        }

        fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError> {
            assert!(
                !self.vips.values().any(|info| info.vip_id == vip_id),
                "reset the counters of vip id {vip_id} while the vip map names it"
            );
            if self.attempt() {
                return Err(DataplaneError::injected(map_names::VIP_STATS, "reset"));
            }
            self.vip_stats.remove(&vip_id);
            self.calls.push(Call::ResetStats { vip_id });
            Ok(())
        }

        fn set_backend(
            &mut self,
            backend_id: u32,
            info: BackendInfo,
        ) -> Result<(), DataplaneError> {
            assert!(
                backend_id != 0 && backend_id < MAX_BACKENDS,
                "backend id {backend_id} out of range"
            );
            if self.attempt() {
                return Err(DataplaneError::injected(map_names::BACKENDS, "write"));
            }
            self.backends.insert(backend_id, info);
            self.calls.push(Call::SetBackend { backend_id, info });
            self.check_readers();
            Ok(())
        }

        fn write_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), DataplaneError> {
            for &(index, _) in slots {
                for info in self.vips.values() {
                    let live = info.ring_base()..info.ring_base() + info.ring_size;
                    assert!(
                        !live.contains(&index),
                        "slot {index} written into vip {}'s live ring",
                        info.vip_id
                    );
                }
            }
            let failing = self.attempt();
            let applied = if failing {
                &slots[..slots.len() / 2]
            } else {
                slots
            };
            for &(index, id) in applied {
                self.maglev[index as usize] = id;
            }
            if failing {
                return Err(DataplaneError::injected(map_names::MAGLEV, "write"));
            }
            self.calls.push(Call::WriteSlots {
                slots: slots.to_vec(),
            });
            self.check_readers();
            Ok(())
        }
    }

    fn installed(config: &Config) -> (Balancer, FakeDataplane) {
        let mut balancer = balancer(config);
        let mut dp = FakeDataplane::for_config(config);
        balancer
            .install(&mut dp)
            .unwrap_or_else(|e| panic!("install failed: {e}"));
        (balancer, dp)
    }

    fn set(balancer: &mut Balancer, dp: &mut FakeDataplane, backend_id: u32, up: bool) -> Change {
        balancer
            .set_health(backend_id, up, dp)
            .unwrap_or_else(|e| panic!("set_health({backend_id}, {up}): {e}"))
    }

    /// The ring Maglev gives for the primaries of `vip_id` that are up with
    /// weight, or if there are none, for its backups that are.
    fn expected_ring(balancer: &Balancer, vip_id: u32) -> Vec<u32> {
        let vip = balancer
            .vip(vip_id)
            .unwrap_or_else(|| panic!("no vip {vip_id}"));
        let available = |backup: bool| -> Vec<(u32, String, u32)> {
            vip.backends
                .iter()
                .filter(|b| b.backup == backup && b.health.is_up() && b.weight > 0)
                .map(|b| (b.backend_id, b.address.to_string(), b.weight))
                .collect()
        };
        let primaries = available(false);
        let keys = if primaries.is_empty() {
            available(true)
        } else {
            primaries
        };
        let members: Vec<MaglevBackend<'_>> = keys
            .iter()
            .map(|(id, key, weight)| MaglevBackend {
                id: *id,
                key,
                weight: *weight,
            })
            .collect();
        maglev::build_ring(balancer.ring_size(), &members)
    }

    /// The fake's maps must hold exactly the balancer's VIPs, `VIP_ADDRS` as
    /// `VIPS` implies it, and each live ring must equal the shadow and what
    /// Maglev prescribes.
    fn assert_consistent(balancer: &Balancer, dp: &FakeDataplane) {
        let mut running: Vec<(VipKey, u32)> = balancer.vips().map(|v| (vip_key(v.listen, v.protocol), v.vip_id)).collect();
        let mut mapped: Vec<(VipKey, u32)> = dp.vips.iter().map(|(key, info)| (*key, info.vip_id)).collect();
        running.sort_by_key(|&(_, id)| id);
        mapped.sort_by_key(|&(_, id)| id);
        assert_eq!(mapped, running, "VIPS holds other vips than the balancer runs");
        assert_eq!(dp.vip_addrs, vip_addrs_of(dp.vips.keys()), "VIP_ADDRS differs from what VIPS holds");
        for vip in balancer.vips() {
            let key = vip_key(vip.listen, vip.protocol);
            let live = dp
                .live_ring(&key)
                .unwrap_or_else(|| panic!("vip {} not in the fake", vip.name));
            assert_eq!(
                Some(live),
                balancer.live_ring(vip.vip_id),
                "vip {}: shadow differs from the map",
                vip.name
            );
            assert!(
                live == expected_ring(balancer, vip.vip_id).as_slice(),
                "vip {}: live ring is stale",
                vip.name
            );
            for b in &vip.backends {
                let state = if b.health.is_up() {
                    BACKEND_STATE_UP
                } else {
                    BACKEND_STATE_DOWN
                };
                assert_eq!(
                    dp.backends.get(&b.backend_id),
                    Some(&backend_info(b.address, state))
                );
                let slots = live.iter().filter(|&&id| id == b.backend_id).count();
                assert_eq!(
                    b.ring_slots as usize, slots,
                    "backend {}: ring_slots",
                    b.backend_id
                );
            }
        }
    }

    /// `VIP_ADDRS` as it must be for `keys` in `VIPS`: per address, a bit per
    /// protocol with a VIP there.
    fn vip_addrs_of<'a>(keys: impl Iterator<Item = &'a VipKey>) -> HashMap<VipAddrKey, u32> {
        let mut addrs = HashMap::new();
        for key in keys {
            *addrs.entry(key.addr_key()).or_insert(0) |= proto_bit(key.proto);
        }
        addrs
    }

    fn fraction_changed(old: &[u32], new: &[u32]) -> f64 {
        maglev::ring_diff(old, new).len() as f64 / new.len() as f64
    }

    // ---- tests ----

    #[test]
    fn ids_are_dense_in_config_order() {
        let config = config(
            SMALL_M,
            vec![
                vip_config(
                    "a",
                    "198.18.0.10:80",
                    &[("198.18.2.10:8080", 1), ("198.18.2.11:8080", 2)],
                    HealthCheckKind::Tcp,
                ),
                vip_config(
                    "b",
                    "198.18.0.11:443",
                    &[
                        ("198.18.2.10:8443", 1),
                        ("198.18.2.12:8443", 1),
                        ("[2001:db8::5]:8443", 0),
                    ],
                    HealthCheckKind::None,
                ),
            ],
        );
        let balancer = balancer(&config);
        let vips: Vec<(u32, &str)> = balancer.vips().map(|v| (v.vip_id, v.name)).collect();
        assert_eq!(vips, [(1, "a"), (2, "b")]);
        let backends: Vec<(u32, u32, SocketAddr, u32, Health)> = balancer
            .backends()
            .map(|b| (b.backend_id, b.vip_id, b.address, b.weight, b.health))
            .collect();
        assert_eq!(
            backends,
            [
                (1, 1, addr("198.18.2.10:8080"), 1, Health::Unknown),
                (2, 1, addr("198.18.2.11:8080"), 2, Health::Unknown),
                (3, 2, addr("198.18.2.10:8443"), 1, Health::Up),
                (4, 2, addr("198.18.2.12:8443"), 1, Health::Up),
                (5, 2, addr("[2001:db8::5]:8443"), 0, Health::Up),
            ]
        );
        let b = balancer.vip(2).unwrap_or_else(|| panic!("no vip 2"));
        assert_eq!(
            b.backends.iter().map(|b| b.backend_id).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(b.ring_generation, None, "nothing installed yet");
        assert!(balancer.vip(0).is_none() && balancer.vip(3).is_none());
        assert!(balancer.backend(0).is_none() && balancer.backend(6).is_none());
        assert_eq!(
            balancer.describe_backend(4),
            "vip b backend 198.18.2.12:8443 (id 4)"
        );
        assert_eq!(balancer.describe_backend(9), "unknown backend (id 9)");
    }

    #[test]
    fn byte_order_matches_the_wire() {
        let info = backend_info(addr("198.18.2.11:8080"), BACKEND_STATE_UP);
        assert_eq!(
            info.addr_be,
            [u32::from_ne_bytes([198, 18, 2, 11]), 0, 0, 0]
        );
        assert_eq!(info.port_be.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!((info.family, info.state), (FAMILY_V4, BACKEND_STATE_UP));

        let info = backend_info(addr("[2001:db8::5]:443"), BACKEND_STATE_DOWN);
        assert_eq!(info.addr_be[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(info.addr_be[3].to_ne_bytes(), [0, 0, 0, 5]);
        assert_eq!(info.port_be.to_ne_bytes(), [0x01, 0xbb]);
        assert_eq!(info.family, FAMILY_V6);

        let key = vip_key(addr("198.18.0.10:53"), Protocol::Udp);
        assert_eq!(key.addr_be, [u32::from_ne_bytes([198, 18, 0, 10]), 0, 0, 0]);
        assert_eq!(key.port_be.to_ne_bytes(), [0, 53]);
        assert_eq!((key.proto, key.family), (lb_common::PROTO_UDP, FAMILY_V4));
    }

    #[test]
    fn install_writes_every_backend_and_a_full_ring() {
        let config = config(M, vec![equal_vip(3)]);
        let (balancer, dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);

        let kinds: Vec<&str> = dp
            .calls
            .iter()
            .map(|c| match c {
                Call::SetBackend { .. } => "backend",
                Call::WriteSlots { .. } => "slots",
                Call::UpsertVip { .. } => "vip",
                Call::SetVipAddr { .. } => "addr",
                Call::RemoveVip { .. } | Call::ResetStats { .. } => "other",
            })
            .collect();
        assert_eq!(kinds, ["backend", "backend", "backend", "slots", "vip", "addr"]);
        for id in 1..=3 {
            let address = addr(&format!("198.18.2.{}:8080", id + 9));
            assert_eq!(
                dp.backends.get(&id),
                Some(&backend_info(address, BACKEND_STATE_UP))
            );
        }
        assert_eq!(
            dp.vips.get(&key),
            Some(&VipInfo {
                vip_id: 1,
                ring_size: M,
                ring_generation: 0,
                flags: 0
            })
        );
        let live = dp.live_ring(&key).unwrap_or_else(|| panic!("no live ring"));
        assert!(
            live.iter().all(|&id| (1..=3).contains(&id)),
            "every slot names a backend"
        );
        assert_consistent(&balancer, &dp);
        assert_eq!(balancer.vip(1).and_then(|v| v.ring_generation), Some(0));
    }

    #[test]
    fn install_reports_and_is_idempotent() {
        let config = config(M, vec![equal_vip(3)]);
        let mut balancer = balancer(&config);
        let mut dp = FakeDataplane::for_config(&config);
        let change = balancer
            .install(&mut dp)
            .unwrap_or_else(|e| panic!("install: {e}"));
        assert_eq!(
            change,
            Change {
                backends_written: 3,
                slots_written: M as usize,
                rings_published: 1
            }
        );
        let again = balancer
            .install(&mut dp)
            .unwrap_or_else(|e| panic!("install: {e}"));
        assert!(again.is_empty(), "second install wrote {again:?}");
    }

    #[test]
    fn unknown_health_installs_down_and_an_empty_ring() {
        let config = config(
            SMALL_M,
            vec![vip_config(
                "web",
                "198.18.0.10:80",
                &[("198.18.2.10:80", 1), ("198.18.2.11:80", 1)],
                HealthCheckKind::Tcp,
            )],
        );
        let (mut balancer, mut dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        assert_eq!(
            dp.backends.get(&1).map(|b| b.state),
            Some(BACKEND_STATE_DOWN)
        );
        assert_eq!(
            dp.backends.get(&2).map(|b| b.state),
            Some(BACKEND_STATE_DOWN)
        );
        assert!(
            dp.live_ring(&key)
                .is_some_and(|r| r.iter().all(|&id| id == BACKEND_ID_NONE))
        );
        assert!(
            !dp.calls
                .iter()
                .any(|c| matches!(c, Call::WriteSlots { .. })),
            "zeroed ring needs no writes"
        );

        // The first backend to pass takes the whole ring.
        set(&mut balancer, &mut dp, 2, true);
        assert!(
            dp.live_ring(&key)
                .is_some_and(|r| r.iter().all(|&id| id == 2))
        );
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn backend_down_publishes_a_ring_without_it_then_marks_it_down() {
        let config = config(M, vec![equal_vip(3)]);
        let (mut balancer, mut dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        let before = balancer
            .live_ring(1)
            .map(<[u32]>::to_vec)
            .unwrap_or_default();
        let start = dp.calls.len();

        let change = set(&mut balancer, &mut dp, 2, false);

        let calls = dp.calls_since(start);
        assert_eq!(calls.len(), 3, "calls: {calls:?}");
        let Call::WriteSlots { slots } = &calls[0] else {
            panic!("first call {:?}, want slot writes", calls[0])
        };
        let generation_1 = ring_base(1, 1, M)..ring_base(1, 1, M) + M;
        assert!(
            slots.iter().all(|(i, _)| generation_1.contains(i)),
            "slots written outside generation 1"
        );
        assert_eq!(
            calls[1],
            Call::UpsertVip {
                key,
                info: VipInfo {
                    vip_id: 1,
                    ring_size: M,
                    ring_generation: 1,
                    flags: 0
                }
            }
        );
        assert_eq!(
            calls[2],
            Call::SetBackend {
                backend_id: 2,
                info: backend_info(addr("198.18.2.11:8080"), BACKEND_STATE_DOWN)
            }
        );
        assert_eq!(change.rings_published, 1);
        assert_eq!(change.backends_written, 1);
        assert_eq!(change.slots_written, slots.len());

        let after = dp.live_ring(&key).unwrap_or_else(|| panic!("no live ring"));
        assert!(!after.contains(&2));
        assert!(after.iter().all(|&id| id != BACKEND_ID_NONE));
        let moved = fraction_changed(&before, after);
        assert!(moved <= 1.0 / 3.0 + 0.03, "moved {moved:.4} of slots");
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn down_then_up_restores_the_ring_without_rewriting_it() {
        let config = config(M, vec![equal_vip(10)]);
        let (mut balancer, mut dp) = installed(&config);
        let original = balancer
            .live_ring(1)
            .map(<[u32]>::to_vec)
            .unwrap_or_default();

        let down = set(&mut balancer, &mut dp, 4, false);
        let moved = fraction_changed(&original, balancer.live_ring(1).unwrap_or_default());
        assert!(moved <= 0.1 + 0.03, "moved {moved:.4} of slots");
        assert_eq!(down.rings_published, 1);

        let start = dp.calls.len();
        let up = set(&mut balancer, &mut dp, 4, true);
        assert_eq!(balancer.live_ring(1), Some(original.as_slice()));
        // Generation 0 still holds the original ring: flipping back is free.
        assert_eq!(
            up,
            Change {
                backends_written: 1,
                slots_written: 0,
                rings_published: 1
            }
        );
        let calls = dp.calls_since(start);
        assert!(
            matches!(calls[0], Call::SetBackend { backend_id: 4, info } if info.state == BACKEND_STATE_UP)
        );
        assert!(matches!(calls[1], Call::UpsertVip { info, .. } if info.ring_generation == 0));
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn steady_state_writes_only_the_diff() {
        let n = 10;
        let config = config(M, vec![equal_vip(n)]);
        let (mut balancer, mut dp) = installed(&config);
        // The first flip fills generation 1 from zero; after that each change
        // writes the slots that differ from the ring two versions back.
        set(&mut balancer, &mut dp, 1, false);
        for id in 2..=4 {
            let before = balancer
                .live_ring(1)
                .map(<[u32]>::to_vec)
                .unwrap_or_default();
            let change = set(&mut balancer, &mut dp, id, false);
            let after = balancer.live_ring(1).unwrap_or_default();
            let moved = fraction_changed(&before, after);
            let up = (n - id as usize + 1) as f64;
            assert!(
                moved <= 1.0 / up + 0.03,
                "backend {id} down moved {moved:.4}"
            );
            let written = change.slots_written as f64 / f64::from(M);
            assert!(
                written <= 2.0 * (1.0 / up + 0.03),
                "backend {id} down wrote {written:.4} of the ring"
            );
        }
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn readers_never_see_a_backend_that_is_not_up() {
        let n = 10u32;
        let config = config(SMALL_M, vec![equal_vip(n as usize)]);
        let (mut balancer, mut dp) = installed(&config);
        // A fixed pseudo-random walk (LCG) of health flips; the fake checks
        // every live ring after every single call.
        let mut seed: u64 = 0x5eed;
        for _ in 0..300 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let id = (seed >> 33) as u32 % n + 1;
            let up = (seed >> 20) & 1 == 1;
            set(&mut balancer, &mut dp, id, up);
            assert_consistent(&balancer, &dp);
        }
    }

    #[test]
    fn all_down_empties_the_ring() {
        let config = config(SMALL_M, vec![equal_vip(3)]);
        let (mut balancer, mut dp) = installed(&config);
        for id in 1..=3 {
            set(&mut balancer, &mut dp, id, false);
        }
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        assert!(
            dp.live_ring(&key)
                .is_some_and(|r| r.iter().all(|&id| id == BACKEND_ID_NONE))
        );
        assert_consistent(&balancer, &dp);
        // And back: one backend up takes every slot.
        set(&mut balancer, &mut dp, 3, true);
        assert!(
            dp.live_ring(&key)
                .is_some_and(|r| r.iter().all(|&id| id == 3))
        );
    }

    #[test]
    fn weight_zero_is_up_but_never_in_the_ring() {
        let config = config(
            SMALL_M,
            vec![vip_config(
                "web",
                "198.18.0.10:80",
                &[
                    ("198.18.2.10:80", 1),
                    ("198.18.2.11:80", 0),
                    ("198.18.2.12:80", 3),
                ],
                HealthCheckKind::None,
            )],
        );
        let (mut balancer, mut dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        assert_eq!(
            dp.backends.get(&2).map(|b| b.state),
            Some(BACKEND_STATE_UP),
            "drained, keeps its flows"
        );
        assert!(dp.live_ring(&key).is_some_and(|r| !r.contains(&2)));
        // Its health changes move no slot.
        let change = set(&mut balancer, &mut dp, 2, false);
        assert_eq!(
            change,
            Change {
                backends_written: 1,
                slots_written: 0,
                rings_published: 0
            }
        );
        set(&mut balancer, &mut dp, 1, false);
        set(&mut balancer, &mut dp, 3, false);
        set(&mut balancer, &mut dp, 2, true);
        assert!(
            dp.live_ring(&key)
                .is_some_and(|r| r.iter().all(|&id| id == BACKEND_ID_NONE))
        );
        assert_eq!(balancer.backend(2).map(|b| b.ring_slots), Some(0));
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn two_vips_use_their_own_rings() {
        let config = config(
            SMALL_M,
            vec![
                vip_config(
                    "a",
                    "198.18.0.10:80",
                    &[("198.18.2.10:80", 1), ("198.18.2.11:80", 1)],
                    HealthCheckKind::None,
                ),
                // A backend serves one VIP on an address, port and protocol.
                vip_config(
                    "b",
                    "198.18.0.10:81",
                    &[("198.18.2.10:81", 1), ("198.18.2.11:81", 1)],
                    HealthCheckKind::None,
                ),
            ],
        );
        let (mut balancer, mut dp) = installed(&config);
        set(&mut balancer, &mut dp, 1, false);
        set(&mut balancer, &mut dp, 4, false);
        set(&mut balancer, &mut dp, 1, true);

        // VIP 1 owns MAGLEV[0, 2M), VIP 2 owns [2M, 4M).
        let m = SMALL_M;
        for call in &dp.calls {
            if let Call::WriteSlots { slots } = call {
                let ids: Vec<u32> = slots
                    .iter()
                    .map(|&(_, id)| id)
                    .filter(|&id| id != 0)
                    .collect();
                let vip1 = ids.iter().all(|id| [1, 2].contains(id));
                let range = if vip1 { 0..2 * m } else { 2 * m..4 * m };
                assert!(
                    slots.iter().all(|(i, _)| range.contains(i)),
                    "slots outside the vip's rings"
                );
            }
        }
        assert_eq!(
            dp.ring(1, 0, m)
                .iter()
                .filter(|&&id| id != 1 && id != 2)
                .count(),
            0
        );
        assert_eq!(
            dp.ring(2, 1, m).iter().filter(|&&id| id != 3).count(),
            0,
            "vip b: only backend 3 left"
        );
        assert_eq!(balancer.vip(1).and_then(|v| v.ring_generation), Some(0));
        assert_eq!(balancer.vip(2).and_then(|v| v.ring_generation), Some(1));
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn unknown_backend_is_refused_without_writes() {
        let config = config(SMALL_M, vec![equal_vip(2)]);
        let (mut balancer, mut dp) = installed(&config);
        let start = dp.calls.len();
        for id in [0, 3, u32::MAX] {
            let result = balancer.set_health(id, true, &mut dp);
            assert!(
                matches!(result, Err(StateError::UnknownBackend { backend_id }) if backend_id == id)
            );
        }
        assert_eq!(dp.calls.len(), start);
    }

    #[test]
    fn same_verdict_twice_writes_nothing() {
        let config = config(SMALL_M, vec![equal_vip(3)]);
        let (mut balancer, mut dp) = installed(&config);
        assert!(set(&mut balancer, &mut dp, 1, true).is_empty());
        assert!(!set(&mut balancer, &mut dp, 1, false).is_empty());
        assert!(set(&mut balancer, &mut dp, 1, false).is_empty());
    }

    #[test]
    fn failed_writes_are_finished_by_a_retry() {
        let config = config(SMALL_M, vec![equal_vip(5)]);
        // Going down takes three calls (slots, vip, backend); going up takes
        // three too (backend, slots, vip). Fail each in turn, then retry.
        for failing in 0..3 {
            for up in [false, true] {
                let (mut balancer, mut dp) = installed(&config);
                // Leave both generations different from the next ring, so the
                // change below writes slots: live {1,3,4}, other {1,2,3,4}
                // (down case); live {1,4}, other {1,3,4} (up case).
                set(&mut balancer, &mut dp, 5, false);
                set(&mut balancer, &mut dp, 2, false);
                if up {
                    set(&mut balancer, &mut dp, 3, false);
                }
                let id = if up { 2 } else { 4 };
                dp.fail_in(failing);
                let error = balancer.set_health(id, up, &mut dp);
                assert!(
                    matches!(error, Err(StateError::Dataplane { .. })),
                    "call {failing} of {id}→{up} did not fail"
                );
                // The readers' invariant held throughout (the fake checks it);
                // a retry converges.
                set(&mut balancer, &mut dp, id, up);
                assert_consistent(&balancer, &dp);
                // And later changes still diff against the right shadows.
                set(&mut balancer, &mut dp, 1, false);
                set(&mut balancer, &mut dp, 5, true);
                assert_consistent(&balancer, &dp);
            }
        }
    }

    #[test]
    fn failed_install_is_finished_by_install() {
        let config = config(SMALL_M, vec![equal_vip(3)]);
        // Three backends, the slots, the vip, its address.
        for failing in 0..6 {
            let mut balancer = balancer(&config);
            let mut dp = FakeDataplane::for_config(&config);
            dp.fail_in(failing);
            assert!(
                balancer.install(&mut dp).is_err(),
                "install call {failing} did not fail"
            );
            balancer
                .install(&mut dp)
                .unwrap_or_else(|e| panic!("retry: {e}"));
            assert_consistent(&balancer, &dp);
        }
    }

    #[test]
    fn configs_that_do_not_fit_are_refused() {
        let mut bad = config(65536, vec![equal_vip(1)]);
        assert!(matches!(
            Balancer::new(&bad),
            Err(StateError::RingSizeNotPrime { ring_size: 65536 })
        ));

        bad = config(SMALL_M, vec![equal_vip(1); 5]);
        assert!(matches!(
            Balancer::new(&bad),
            Err(StateError::TooManyVips { count: 5, max: 4 })
        ));

        let addrs: Vec<String> = (0..MAX_BACKENDS)
            .map(|i| format!("198.18.{}.{}:80", 2 + i / 250, i % 250 + 1))
            .collect();
        let backends: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
        bad = config(
            SMALL_M,
            vec![vip_config(
                "big",
                "198.18.0.10:80",
                &backends,
                HealthCheckKind::None,
            )],
        );
        assert!(matches!(
            Balancer::new(&bad),
            Err(StateError::TooManyBackends { count, max })
                if count == MAX_BACKENDS as usize && max == MAX_BACKENDS - 1
        ));
        bad.vips[0].backends.pop();
        assert!(Balancer::new(&bad).is_ok(), "MAX_BACKENDS - 1 backends fit");

        bad = config(4_294_967_291, vec![equal_vip(1)]);
        assert!(matches!(
            Balancer::new(&bad),
            Err(StateError::MaglevTooLarge { .. })
        ));
    }

    // ---- backups, drain and schedulers ----

    /// Backends of `key`'s live ring, deduplicated and sorted.
    fn ring_members(dp: &FakeDataplane, key: &VipKey) -> Vec<u32> {
        let mut ids: Vec<u32> = dp
            .live_ring(key)
            .unwrap_or_else(|| panic!("no live ring"))
            .to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn state_of(dp: &FakeDataplane, backend_id: u32) -> Option<u8> {
        dp.backends.get(&backend_id).map(|b| b.state)
    }

    /// Two primaries (ids 1, 2) and one backup (id 3), no health checks.
    fn primaries_and_a_backup() -> Config {
        config(
            SMALL_M,
            vec![with_backups(
                vip_config(
                    "web",
                    "198.18.0.10:80",
                    &[
                        ("198.18.2.10:80", 1),
                        ("198.18.2.11:80", 1),
                        ("198.18.2.12:80", 1),
                    ],
                    HealthCheckKind::None,
                ),
                &[2],
            )],
        )
    }

    #[test]
    fn backup_takes_over_when_the_last_primary_goes_down_and_hands_back() {
        let config = primaries_and_a_backup();
        let (mut balancer, mut dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        assert_eq!(ring_members(&dp, &key), [1, 2], "backup idle");
        assert_eq!(
            state_of(&dp, 3),
            Some(BACKEND_STATE_UP),
            "an idle backup is still up"
        );
        assert_eq!(balancer.backend(3).map(|b| (b.backup, b.ring_slots)), Some((true, 0)));

        set(&mut balancer, &mut dp, 1, false);
        assert_eq!(ring_members(&dp, &key), [2], "one primary left: still no backup");
        assert_consistent(&balancer, &dp);

        set(&mut balancer, &mut dp, 2, false);
        assert_eq!(ring_members(&dp, &key), [3], "the backup takes every slot");
        assert_eq!(balancer.backend(3).map(|b| b.ring_slots), Some(SMALL_M));
        assert_consistent(&balancer, &dp);

        set(&mut balancer, &mut dp, 2, true);
        assert_eq!(ring_members(&dp, &key), [2], "new flows go back to the primary");
        assert_eq!(
            state_of(&dp, 3),
            Some(BACKEND_STATE_UP),
            "flows pinned to the backup continue"
        );
        assert_eq!(balancer.backend(3).map(|b| b.ring_slots), Some(0));
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn with_everything_down_the_ring_is_empty_and_a_backup_refills_it() {
        let config = primaries_and_a_backup();
        let (mut balancer, mut dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        for id in [3, 1, 2] {
            set(&mut balancer, &mut dp, id, false);
        }
        assert_eq!(ring_members(&dp, &key), [BACKEND_ID_NONE]);
        set(&mut balancer, &mut dp, 3, true);
        assert_eq!(ring_members(&dp, &key), [3]);
        set(&mut balancer, &mut dp, 1, true);
        assert_eq!(ring_members(&dp, &key), [1]);
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn drained_primaries_leave_new_flows_to_the_backups() {
        let config = config(
            SMALL_M,
            vec![with_backups(
                vip_config(
                    "web",
                    "198.18.0.10:80",
                    &[
                        ("198.18.2.10:80", 0),
                        ("198.18.2.11:80", 1),
                        ("198.18.2.12:80", 3),
                    ],
                    HealthCheckKind::None,
                ),
                &[1, 2],
            )],
        );
        let (mut balancer, mut dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        assert_eq!(ring_members(&dp, &key), [2, 3], "the only primary is drained");
        assert_eq!(state_of(&dp, 1), Some(BACKEND_STATE_UP), "drained, not down");
        // The backups share by weight, like primaries.
        let share = balancer.backend(3).map_or(0.0, |b| f64::from(b.ring_slots)) / f64::from(SMALL_M);
        assert!((share - 0.75).abs() < 0.02, "weight-3 backup holds {share:.3}");
        assert_consistent(&balancer, &dp);

        let change = balancer
            .set_weight(1, 2, &mut dp)
            .unwrap_or_else(|e| panic!("set_weight: {e}"));
        assert_eq!(change.rings_published, 1);
        assert_eq!(ring_members(&dp, &key), [1], "undrained primary takes over");
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn set_weight_zero_drains_without_marking_down() {
        let config = config(SMALL_M, vec![equal_vip(3)]);
        let (mut balancer, mut dp) = installed(&config);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        let start = dp.calls.len();
        let change = balancer
            .set_weight(2, 0, &mut dp)
            .unwrap_or_else(|e| panic!("set_weight: {e}"));
        assert_eq!(
            change.backends_written, 0,
            "its entry stays UP, so its pinned flows continue"
        );
        assert!(
            !dp.calls_since(start)
                .iter()
                .any(|c| matches!(c, Call::SetBackend { .. }))
        );
        assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_UP));
        assert_eq!(ring_members(&dp, &key), [1, 3], "no new flows");
        assert_eq!(balancer.backend(2).map(|b| (b.weight, b.ring_slots)), Some((0, 0)));
        assert_consistent(&balancer, &dp);
        balancer
            .set_weight(2, 1, &mut dp)
            .unwrap_or_else(|e| panic!("set_weight: {e}"));
        assert_eq!(ring_members(&dp, &key), [1, 2, 3]);
        assert!(matches!(
            balancer.set_weight(9, 1, &mut dp),
            Err(StateError::UnknownBackend { backend_id: 9 })
        ));
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn readers_never_see_a_backend_that_is_not_up_with_backups_and_drains() {
        // Three primaries and two backups; a walk of health and weight changes.
        let addrs: Vec<String> = (0..5).map(|i| format!("198.18.2.{}:80", i + 10)).collect();
        let backends: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
        let vip = vip_config("web", "198.18.0.10:80", &backends, HealthCheckKind::Tcp);
        let config = config(SMALL_M, vec![with_backups(vip, &[3, 4])]);
        let (mut balancer, mut dp) = installed(&config);
        let mut seed: u64 = 0xbac_c0b5;
        let mut backup_served = false;
        for _ in 0..300 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let id = (seed >> 33) as u32 % 5 + 1;
            if (seed >> 40) & 3 == 0 {
                let weight = (seed >> 20) as u32 % 3;
                balancer
                    .set_weight(id, weight, &mut dp)
                    .unwrap_or_else(|e| panic!("set_weight({id}, {weight}): {e}"));
            } else {
                set(&mut balancer, &mut dp, id, (seed >> 20) & 1 == 1);
            }
            // The fake checked every call; the ring follows the rule.
            assert_consistent(&balancer, &dp);
            let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
            backup_served |= ring_members(&dp, &key).iter().any(|&id| id >= 4);
        }
        assert!(backup_served, "the walk never reached a backup-only ring");
    }

    #[test]
    fn the_scheduler_is_published_in_the_vip_flags() {
        let mut sticky = equal_vip(3);
        sticky.name = "sticky".to_owned();
        sticky.listen = addr("198.18.0.10:81");
        // A backend serves one VIP on an address, port and protocol.
        for backend in &mut sticky.backends {
            backend.address.set_port(8081);
        }
        sticky.scheduler = Scheduler::SourceHash;
        let config = config(SMALL_M, vec![equal_vip(3), sticky]);
        let (mut balancer, mut dp) = installed(&config);
        let plain = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        let sticky = vip_key(addr("198.18.0.10:81"), Protocol::Tcp);
        assert_eq!(dp.vips.get(&plain).map(|v| v.flags), Some(0));
        assert_eq!(
            dp.vips.get(&sticky).map(|v| v.flags),
            Some(lb_common::vip::VIP_F_SOURCE_HASH)
        );
        assert_eq!(balancer.vip(2).map(|v| v.scheduler), Some(Scheduler::SourceHash));
        // Every later generation keeps it.
        set(&mut balancer, &mut dp, 5, false);
        let info = dp.vips.get(&sticky).copied();
        assert_eq!(info.map(|v| (v.ring_generation, v.flags)), Some((1, lb_common::vip::VIP_F_SOURCE_HASH)));
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn local_addresses_are_marked_and_unmarked_and_keep_a_backends_role() {
        let config = config(SMALL_M, vec![equal_vip(2)]);
        let (mut balancer, mut dp) = installed(&config);
        let key = |ip: &str| VipAddrKey::new(ip.parse().expect("ip"));
        // The backends' addresses have their role from the install on.
        assert_eq!(dp.roles.get(&key("198.18.2.10")), Some(&ADDR_ROLE_BACKEND));
        // A gateway address that is also a backend's (odd, but the roles add up).
        let gw: Vec<IpAddr> = ["198.18.2.1", "2001:db8:2::1", "198.18.2.10"].iter().map(|a| a.parse().expect("ip")).collect();
        balancer.set_local_addresses(gw.clone(), &mut dp).expect("mark");
        assert_eq!(dp.roles.get(&key("198.18.2.1")), Some(&ADDR_ROLE_LOCAL));
        assert_eq!(dp.roles.get(&key("2001:db8:2::1")), Some(&ADDR_ROLE_LOCAL));
        assert_eq!(dp.roles.get(&key("198.18.2.10")), Some(&(ADDR_ROLE_LOCAL | ADDR_ROLE_BACKEND)));
        // An address that went away loses its role; the backend keeps its own.
        balancer.set_local_addresses(gw[..1].to_vec(), &mut dp).expect("unmark");
        assert_eq!(dp.roles.get(&key("2001:db8:2::1")), None);
        assert_eq!(dp.roles.get(&key("198.18.2.10")), Some(&ADDR_ROLE_BACKEND));
        assert_eq!(dp.roles.get(&key("198.18.2.1")), Some(&ADDR_ROLE_LOCAL));
    }

    #[test]
    fn every_backend_has_a_service_entry_naming_its_vip() {
        let config = config(SMALL_M, vec![equal_vip(3)]);
        let (_balancer, dp) = installed(&config);
        for (i, id) in (1..=3u32).enumerate() {
            let service = ServiceKey::new(addr(&format!("198.18.2.{}:8080", 10 + i)), lb_common::PROTO_TCP);
            let nat = dp.services.get(&service).unwrap_or_else(|| panic!("no service entry for backend {id}"));
            assert_eq!((nat.backend_id, nat.vip_id, u16::from_be(nat.vip_port_be)), (id, 1, 80));
        }
    }

    // ---- config reload ----

    fn reload(balancer: &mut Balancer, dp: &mut FakeDataplane, old: &Config, new: &Config) -> Change {
        let actions = crate::control::plan::reload(old, new).unwrap_or_else(|e| panic!("plan: {e}"));
        let change = balancer.apply_reload(&actions, dp).unwrap_or_else(|e| panic!("apply: {e}"));
        assert_consistent(balancer, dp);
        change
    }

    fn ids_of(balancer: &Balancer, vip_id: u32) -> Vec<(u32, String)> {
        balancer
            .vip(vip_id)
            .map(|v| v.backends.iter().map(|b| (b.backend_id, b.address.to_string())).collect())
            .unwrap_or_default()
    }

    #[test]
    fn reload_drains_and_undrains_by_weight() {
        let old = config(SMALL_M, vec![equal_vip(3)]);
        let (mut balancer, mut dp) = installed(&old);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        let mut drained = old.clone();
        drained.vips[0].backends[1].weight = 0;
        let start = dp.calls.len();
        let change = reload(&mut balancer, &mut dp, &old, &drained);
        assert_eq!(change.rings_published, 1);
        assert!(!dp.calls_since(start).iter().any(|c| matches!(c, Call::SetBackend { .. })), "stays UP");
        assert_eq!(ring_members(&dp, &key), [1, 3]);
        assert_eq!(balancer.backend(2).map(|b| b.weight), Some(0));
        reload(&mut balancer, &mut dp, &drained, &old);
        assert_eq!(ring_members(&dp, &key), [1, 2, 3]);
        // The same config again writes nothing.
        assert!(reload(&mut balancer, &mut dp, &old, &old).is_empty());
    }

    #[test]
    fn reload_flips_backup_flags() {
        let old = primaries_and_a_backup();
        let (mut balancer, mut dp) = installed(&old);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        let mut new = old.clone();
        new.vips[0].backends[0].backup = true;
        new.vips[0].backends[1].backup = true;
        new.vips[0].backends[2].backup = false;
        reload(&mut balancer, &mut dp, &old, &new);
        assert_eq!(ring_members(&dp, &key), [3], "the old backup is the only primary now");
        assert_eq!(state_of(&dp, 1), Some(BACKEND_STATE_UP), "flows pinned to 1 continue");
    }

    #[test]
    fn reload_adds_and_removes_backends_without_reusing_ids() {
        let old = config(SMALL_M, vec![equal_vip(3)]);
        let (mut balancer, mut dp) = installed(&old);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        let mut new = old.clone();
        let removed = new.vips[0].backends.remove(1);
        new.vips[0].backends.push(BackendConfig { address: addr("198.18.2.20:8080"), weight: 1, backup: false });
        reload(&mut balancer, &mut dp, &old, &new);
        assert_eq!(ring_members(&dp, &key), [1, 3, 4]);
        assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN), "pinned flows move at their next packet");
        assert_eq!(state_of(&dp, 4), Some(BACKEND_STATE_UP));
        assert_eq!(
            ids_of(&balancer, 1),
            [(1, "198.18.2.10:8080".to_owned()), (3, "198.18.2.12:8080".to_owned()), (4, "198.18.2.20:8080".to_owned())]
        );
        assert!(balancer.backends().all(|b| b.backend_id != 2));
        // A late verdict for the removed backend changes nothing.
        let start = dp.calls.len();
        assert!(set(&mut balancer, &mut dp, 2, true).is_empty());
        assert_eq!(dp.calls.len(), start);
        assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN));
        assert!(balancer.set_weight(2, 1, &mut dp).is_err());

        // Adding the same address back gives it a new id, never 2.
        let mut again = new.clone();
        again.vips[0].backends.push(removed);
        reload(&mut balancer, &mut dp, &new, &again);
        assert_eq!(ring_members(&dp, &key), [1, 3, 4, 5]);
        assert_eq!(balancer.backend(5).map(|b| b.address), Some(addr("198.18.2.11:8080")));
        assert_eq!(state_of(&dp, 2), Some(BACKEND_STATE_DOWN));
    }

    #[test]
    fn reload_health_checks_decide_the_health_of_new_backends() {
        let mut checked = equal_vip(2);
        checked.health_check.kind = HealthCheckKind::Tcp;
        let old = config(SMALL_M, vec![checked]);
        let (mut balancer, mut dp) = installed(&old);
        set(&mut balancer, &mut dp, 1, true);
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        let mut new = old.clone();
        new.vips[0].backends.push(BackendConfig { address: addr("198.18.2.20:8080"), weight: 1, backup: false });
        reload(&mut balancer, &mut dp, &old, &new);
        assert_eq!(balancer.backend(3).map(|b| b.health), Some(Health::Unknown), "unchecked yet");
        assert_eq!(ring_members(&dp, &key), [1]);
        // Dropping the checks brings everyone up.
        let mut unchecked = new.clone();
        unchecked.vips[0].health_check.kind = HealthCheckKind::None;
        reload(&mut balancer, &mut dp, &new, &unchecked);
        assert_eq!(ring_members(&dp, &key), [1, 2, 3]);
        assert_eq!(balancer.vip(1).map(|v| v.health_check.kind.clone()), Some(HealthCheckKind::None));
    }

    #[test]
    fn reload_actions_for_unknown_services_are_refused_without_writes() {
        let old = config(SMALL_M, vec![equal_vip(2)]);
        let (mut balancer, mut dp) = installed(&old);
        let start = dp.calls.len();
        let bad = [
            Action::SetWeight { vip: "nope".into(), address: addr("198.18.2.10:8080"), from: 1, to: 0 },
            Action::RemoveBackend { vip: "web".into(), address: addr("198.18.2.99:8080") },
            Action::AddBackend {
                vip: "web".into(),
                backend: BackendConfig { address: addr("198.18.2.10:8080"), weight: 1, backup: false },
            },
        ];
        for action in bad {
            // A valid action first: it must not be applied either.
            let drain = Action::SetWeight { vip: "web".into(), address: addr("198.18.2.11:8080"), from: 1, to: 0 };
            let result = balancer.apply_reload(&[drain, action.clone()], &mut dp);
            assert!(
                matches!(result, Err(StateError::NotRunning { .. } | StateError::AlreadyRunning { .. })),
                "{action:?}"
            );
            assert!(result.is_err_and(|e| e.changed_nothing()));
        }
        assert_eq!(dp.calls.len(), start);
        assert_eq!(balancer.backend(2).map(|b| b.weight), Some(1));
    }

    // ---- reloads that add and remove VIPs ----

    /// A VIP named `name` on `listen` with two backends of its own (ports
    /// `port0`, `port0 + 1` on 198.18.2.10), probed by `kind`.
    fn own_vip(name: &str, listen: &str, protocol: Protocol, port0: u16, kind: HealthCheckKind) -> VipConfig {
        let a = format!("198.18.2.10:{port0}");
        let b = format!("198.18.2.10:{}", port0 + 1);
        let mut vip = vip_config(name, listen, &[(a.as_str(), 1), (b.as_str(), 1)], kind);
        vip.protocol = protocol;
        vip
    }

    fn with_vips(base: &Config, vips: Vec<VipConfig>) -> Config {
        Config { vips, ..base.clone() }
    }

    fn id_of(balancer: &Balancer, name: &str) -> u32 {
        balancer.vips().find(|v| v.name == name).map(|v| v.vip_id).unwrap_or_else(|| panic!("no vip {name}"))
    }

    fn kinds(calls: &[Call]) -> Vec<&'static str> {
        calls
            .iter()
            .map(|c| match c {
                Call::UpsertVip { .. } => "vip",
                Call::RemoveVip { .. } => "remove",
                Call::SetVipAddr { .. } => "addr",
                Call::SetBackend { info, .. } if info.state == BACKEND_STATE_UP => "up",
                Call::SetBackend { .. } => "down",
                Call::WriteSlots { .. } => "slots",
                Call::ResetStats { .. } => "reset",
            })
            .collect()
    }

    #[test]
    fn an_added_vip_takes_the_next_id_and_is_published_once_its_ring_is_whole() {
        let none = HealthCheckKind::None;
        let old = config(SMALL_M, vec![equal_vip(3)]);
        let (mut balancer, mut dp) = installed(&old);
        let new = with_vips(&old, vec![equal_vip(3), own_vip("api", "198.18.0.11:81", Protocol::Tcp, 9000, none)]);
        let start = dp.calls.len();
        reload(&mut balancer, &mut dp, &old, &new);

        assert_eq!(id_of(&balancer, "api"), 2);
        assert_eq!(ids_of(&balancer, 2), [(4, "198.18.2.10:9000".to_owned()), (5, "198.18.2.10:9001".to_owned())]);
        let calls = dp.calls_since(start);
        // Never-used rings are zeroed and counters too: nothing to reset.
        assert_eq!(kinds(calls), ["up", "up", "slots", "vip", "addr"]);
        let Call::WriteSlots { slots } = &calls[2] else { panic!("{calls:?}") };
        assert_eq!(slots.len(), SMALL_M as usize, "generation 0 written whole before the vip");
        assert!(slots.iter().all(|&(i, _)| (ring_base(2, 0, SMALL_M)..ring_base(2, 1, SMALL_M)).contains(&i)));
        let api = vip_key(addr("198.18.0.11:81"), Protocol::Tcp);
        assert_eq!(ring_members(&dp, &api), [4, 5]);
        assert_eq!(calls[4], Call::SetVipAddr { key: api.addr_key(), protos: lb_common::vip_addr::VIP_ADDR_TCP });

        // A checked VIP's backends start unknown: published with an empty
        // ring, and its checkers decide.
        let checked = own_vip("db", "198.18.0.11:5432", Protocol::Tcp, 9100, HealthCheckKind::Tcp);
        let newer = with_vips(&new, [new.vips.clone(), vec![checked]].concat());
        reload(&mut balancer, &mut dp, &new, &newer);
        let db = vip_key(addr("198.18.0.11:5432"), Protocol::Tcp);
        assert_eq!(ring_members(&dp, &db), [BACKEND_ID_NONE]);
        assert_eq!(balancer.backend(6).map(|b| b.health), Some(Health::Unknown));
        set(&mut balancer, &mut dp, 7, true);
        assert_eq!(ring_members(&dp, &db), [7], "the first probe decides");
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn a_removed_vip_leaves_vips_first_then_its_address_then_its_backends() {
        let none = HealthCheckKind::None;
        let web = own_vip("web", "198.18.0.10:80", Protocol::Tcp, 8000, none.clone());
        let web2 = own_vip("web2", "198.18.0.10:81", Protocol::Tcp, 8100, none.clone());
        let dns = own_vip("dns", "198.18.0.10:53", Protocol::Udp, 8200, none.clone());
        let other = own_vip("other", "198.18.0.11:53", Protocol::Udp, 8300, none);
        let old = config(SMALL_M, vec![web.clone(), web2, dns.clone(), other.clone()]);
        let (mut balancer, mut dp) = installed(&old);
        let shared = vip_key(addr("198.18.0.10:80"), Protocol::Tcp).addr_key();
        assert_eq!(dp.vip_addrs.get(&shared), Some(&(VIP_ADDR_TCP | VIP_ADDR_UDP)));

        // web2 goes; web keeps its address's TCP bit.
        let new = with_vips(&old, vec![web.clone(), dns, other.clone()]);
        let start = dp.calls.len();
        reload(&mut balancer, &mut dp, &old, &new);
        assert_eq!(kinds(dp.calls_since(start)), ["remove", "down", "down"]);
        assert_eq!(dp.calls[start], Call::RemoveVip { key: vip_key(addr("198.18.0.10:81"), Protocol::Tcp) });
        assert!(balancer.is_retired(3) && balancer.is_retired(4));
        assert!(balancer.backends().all(|b| b.vip_id != 2), "its backends are no longer probed");
        assert!(balancer.vip(2).is_none());

        // dns goes: the shared address is TCP only now.
        let newer = with_vips(&old, vec![web.clone(), other]);
        let start = dp.calls.len();
        reload(&mut balancer, &mut dp, &new, &newer);
        assert_eq!(kinds(dp.calls_since(start)), ["remove", "addr", "down", "down"]);
        assert_eq!(dp.vip_addrs.get(&shared), Some(&VIP_ADDR_TCP));

        // The last VIP on an address takes its entry with it.
        let last = with_vips(&old, vec![web]);
        reload(&mut balancer, &mut dp, &newer, &last);
        assert!(!dp.vip_addrs.contains_key(&vip_key(addr("198.18.0.11:53"), Protocol::Udp).addr_key()));
        // Late verdicts for removed backends change nothing.
        let start = dp.calls.len();
        assert!(set(&mut balancer, &mut dp, 8, true).is_empty());
        assert_eq!(dp.calls.len(), start);
        assert_eq!(balancer.describe_backend(8), "retired backend 198.18.2.10:8301 (id 8)");
    }

    #[test]
    fn a_reused_vip_id_starts_with_clean_rings_and_counters() {
        let none = HealthCheckKind::None;
        let a = own_vip("a", "198.18.0.10:80", Protocol::Tcp, 8000, none.clone());
        let b = own_vip("b", "198.18.0.10:81", Protocol::Tcp, 8100, none);
        let mut old = config(SMALL_M, vec![a.clone(), b]);
        old.agent.max_vips = 2;
        let (mut balancer, mut dp) = installed(&old);
        // b fills both its rings (generation 1 without backend 3, then back)
        // and counts traffic.
        set(&mut balancer, &mut dp, 3, false);
        set(&mut balancer, &mut dp, 3, true);
        set(&mut balancer, &mut dp, 4, false);
        dp.vip_stats.insert(2, 1000);

        // c takes b's id, the only one free; its backends are unknown yet.
        let c = own_vip("c", "198.18.0.12:80", Protocol::Tcp, 8200, HealthCheckKind::Tcp);
        let new = with_vips(&old, vec![a, c]);
        let start = dp.calls.len();
        reload(&mut balancer, &mut dp, &old, &new);
        assert_eq!(id_of(&balancer, "c"), 2);
        let calls = dp.calls_since(start);
        // b shared a's address: VIP_ADDRS changes only for c's. c's backends
        // are written down (unknown) once its ring is published.
        assert_eq!(kinds(calls), ["remove", "down", "reset", "slots", "vip", "down", "down", "addr"]);
        assert_eq!(dp.vip_stats.get(&2), None, "b's counts are not c's");
        let Call::WriteSlots { slots } = &calls[3] else { panic!("{calls:?}") };
        assert_eq!(slots.len(), SMALL_M as usize, "every slot of b's ring overwritten, empty ones too");
        let key = vip_key(addr("198.18.0.12:80"), Protocol::Tcp);
        assert_eq!(ring_members(&dp, &key), [BACKEND_ID_NONE]);

        // Its first flip rewrites generation 1 whole too: the fake's readers
        // would see b's (down) backends in any slot left over.
        set(&mut balancer, &mut dp, 5, true);
        assert_eq!(ring_members(&dp, &key), [5]);
        assert_eq!(dp.vips.get(&key).map(|v| v.ring_generation), Some(1));
        assert!(dp.ring(2, 1, SMALL_M).iter().all(|&id| id == 5));
        set(&mut balancer, &mut dp, 6, true);
        assert_eq!(ring_members(&dp, &key), [5, 6]);
        assert_consistent(&balancer, &dp);
    }

    #[test]
    fn a_renamed_vip_takes_over_its_listen_and_its_id() {
        let old = config(SMALL_M, vec![equal_vip(2)]);
        let (mut balancer, mut dp) = installed(&old);
        let mut renamed = equal_vip(2);
        renamed.name = "www".to_owned();
        let new = with_vips(&old, vec![renamed]);
        let start = dp.calls.len();
        reload(&mut balancer, &mut dp, &old, &new);
        // Out of the maps first, then in again under the reused id.
        assert_eq!(
            kinds(dp.calls_since(start)),
            ["remove", "addr", "down", "down", "up", "up", "reset", "slots", "vip", "addr"]
        );
        assert_eq!(balancer.vips().map(|v| (v.vip_id, v.name)).collect::<Vec<_>>(), [(1, "www")]);
        assert_eq!(ids_of(&balancer, 1), [(3, "198.18.2.10:8080".to_owned()), (4, "198.18.2.11:8080".to_owned())]);
    }

    #[test]
    fn a_new_listen_is_a_new_vip_and_a_new_scheduler_is_not() {
        let old = config(SMALL_M, vec![equal_vip(2)]);
        let (mut balancer, mut dp) = installed(&old);
        let mut sticky = old.clone();
        sticky.vips[0].scheduler = Scheduler::SourceHash;
        let start = dp.calls.len();
        let change = reload(&mut balancer, &mut dp, &old, &sticky);
        assert_eq!(change, Change { backends_written: 0, slots_written: 0, rings_published: 1 });
        let key = vip_key(addr("198.18.0.10:80"), Protocol::Tcp);
        assert_eq!(
            dp.calls_since(start),
            [Call::UpsertVip {
                key,
                info: VipInfo { vip_id: 1, ring_size: SMALL_M, ring_generation: 0, flags: lb_common::vip::VIP_F_SOURCE_HASH }
            }],
            "the same ring, republished with the flag"
        );

        let mut moved = sticky.clone();
        moved.vips[0].listen = addr("198.18.0.20:80");
        reload(&mut balancer, &mut dp, &sticky, &moved);
        assert!(!dp.vips.contains_key(&key));
        assert_eq!(ids_of(&balancer, 1), [(3, "198.18.2.10:8080".to_owned()), (4, "198.18.2.11:8080".to_owned())]);
        let moved_key = vip_key(addr("198.18.0.20:80"), Protocol::Tcp);
        assert_eq!(dp.vips.get(&moved_key).map(|v| v.flags), Some(lb_common::vip::VIP_F_SOURCE_HASH));
    }

    #[test]
    fn more_vips_than_max_vips_are_refused_without_writes() {
        let none = HealthCheckKind::None;
        let old = config(SMALL_M, vec![equal_vip(2)]);
        let (mut balancer, mut dp) = installed(&old);
        let extra: Vec<VipConfig> = (0..4)
            .map(|i| own_vip(&format!("v{i}"), &format!("198.18.0.11:{}", 80 + i), Protocol::Tcp, 9000 + 2 * i, none.clone()))
            .collect();
        // The plan refuses this already, naming agent.max_vips; the balancer
        // checks again.
        let actions: Vec<Action> = extra.iter().map(|vip| Action::AddVip { vip: vip.clone() }).collect();
        let start = dp.calls.len();
        let result = balancer.apply_reload(&actions, &mut dp);
        assert!(matches!(result, Err(StateError::TooManyVips { count: 5, max: 4 })), "{result:?}");
        assert_eq!(
            result.map_err(|e| e.to_string()).err().as_deref(),
            Some("5 vips configured, but the maps have room for 4 (agent.max_vips)")
        );
        assert_eq!(dp.calls.len(), start);
        assert_eq!(balancer.vips().len(), 1);
        // Four fit once web leaves: ids 1 to 4, web's reused.
        let four = with_vips(&old, extra);
        reload(&mut balancer, &mut dp, &old, &four);
        let ids: Vec<(u32, &str)> = balancer.vips().map(|v| (v.vip_id, v.name)).collect();
        assert_eq!(ids, [(1, "v0"), (2, "v1"), (3, "v2"), (4, "v3")]);
    }

    #[test]
    fn a_failed_removal_holds_its_id_back_until_a_retry_finishes_it() {
        let none = HealthCheckKind::None;
        let a = own_vip("a", "198.18.0.10:80", Protocol::Tcp, 8000, none.clone());
        let b = own_vip("b", "198.18.0.11:53", Protocol::Udp, 8100, none.clone());
        let c = own_vip("c", "198.18.0.12:80", Protocol::Tcp, 8200, none);
        let mut old = config(SMALL_M, vec![a.clone(), b]);
        old.agent.max_vips = 2;
        let new = with_vips(&old, vec![a, c]);
        let actions = crate::control::plan::reload(&old, &new).unwrap_or_else(|e| panic!("plan: {e}"));
        // Removing b and adding c in b's id takes: remove, addr, down, down,
        // reset, up, up, slots, vip, addr. Fail each in turn.
        for failing in 0..10 {
            let (mut balancer, mut dp) = installed(&old);
            let start = dp.calls.len();
            dp.fail_in(failing);
            let result = balancer.apply_reload(&actions, &mut dp);
            assert!(result.as_ref().is_err_and(|e| !e.changed_nothing()), "call {failing}: {result:?}");
            if failing == 0 {
                // b is still in VIPS: nothing may touch the rings of its id.
                assert_eq!(dp.calls_since(start), []);
                assert_eq!(balancer.vip(2).map(|v| (v.name, v.ring_generation)), Some(("c", None)));
                // Nor may a health event of c while the removal still fails
                // (the fake panics on a write into a ring that VIPS names).
                dp.fail_in(0);
                assert!(balancer.set_health(5, true, &mut dp).is_err());
                assert_eq!(dp.calls_since(start), []);
                // Once it succeeds, the same event finishes both.
                set(&mut balancer, &mut dp, 5, true);
                assert_consistent(&balancer, &dp);
            }
            // The fake checked the readers throughout; an empty reload, as
            // SIGHUP with the same file sends, finishes the job.
            balancer.apply_reload(&[], &mut dp).unwrap_or_else(|e| panic!("retry after call {failing}: {e}"));
            assert_consistent(&balancer, &dp);
            assert!(balancer.install(&mut dp).unwrap_or_else(|e| panic!("{e}")).is_empty(), "call {failing}");
        }
    }

    #[test]
    fn readers_never_see_a_partial_vip_while_reloads_add_and_remove_them() {
        // Six services over two addresses and both protocols, at most four
        // running (max_vips); a fixed pseudo-random walk of reloads and
        // health flips. The fake checks the readers after every call, and
        // `reload` checks VIPS, VIP_ADDRS and every ring after every step.
        let services: Vec<VipConfig> = (0..6u16)
            .map(|i| {
                let listen = format!("198.18.0.{}:{}", 10 + i % 2, 50 + i);
                let protocol = if i % 3 == 0 { Protocol::Udp } else { Protocol::Tcp };
                own_vip(&format!("s{i}"), &listen, protocol, 8000 + 10 * i, HealthCheckKind::Tcp)
            })
            .collect();
        let pick = |mask: u64| -> Vec<VipConfig> {
            let chosen: Vec<VipConfig> =
                services.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, v)| v.clone()).take(4).collect();
            if chosen.is_empty() { vec![services[0].clone()] } else { chosen }
        };
        const RING: u32 = 1021;
        let mut running = config(RING, pick(0b11));
        let (mut balancer, mut dp) = installed(&running);
        let mut seed: u64 = 0x7e10ad;
        let mut reused = 0;
        for _ in 0..200 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            if (seed >> 60) & 1 == 0 {
                let new = with_vips(&running, pick(seed >> 20));
                let actions = crate::control::plan::reload(&running, &new).unwrap_or_else(|e| panic!("plan: {e}"));
                let freed: BTreeSet<u32> = balancer.used_ids.clone();
                balancer.apply_reload(&actions, &mut dp).unwrap_or_else(|e| panic!("apply: {e}"));
                for action in &actions {
                    if let Action::AddVip { vip } = action {
                        let id = id_of(&balancer, &vip.name);
                        assert!((1..=4).contains(&id), "vip id {id} beyond max_vips");
                        assert_eq!(dp.vip_stats.get(&id), None, "{} inherited counts", vip.name);
                        reused += usize::from(freed.contains(&id));
                    }
                }
                running = new;
            } else {
                let live: Vec<u32> = balancer.backends().map(|b| b.backend_id).collect();
                let id = live[(seed >> 33) as usize % live.len()];
                set(&mut balancer, &mut dp, id, (seed >> 20) & 1 == 1);
            }
            assert_consistent(&balancer, &dp);
            // Traffic on every live VIP, for the next one to take its id.
            for info in dp.vips.values() {
                *dp.vip_stats.entry(info.vip_id).or_insert(0) += 1;
            }
        }
        assert!(reused > 10, "the walk reused only {reused} ids");
    }
}
