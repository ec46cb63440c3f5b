//! The control plane's state: ids, health, and what every ring in the
//! dataplane holds, so each change writes only what differs.
//!
//! [`Balancer`] turns a validated [`Config`] into dense ids (VIP `n` is the
//! `n`-th `[[vip]]`, backend ids count (VIP, backend) pairs in file order) and
//! keeps, per VIP, a shadow copy of both Maglev rings as last written. Its
//! public operations are here; the rest is split along the seams:
//!
//! - `types`: what callers see ([`VipView`], [`BackendView`], [`Change`])
//!   and the errors ([`StateError`], [`Step`]);
//! - `records`: what the balancer keeps per VIP and per backend;
//! - `publish`: the publish protocol, which writes one VIP's desired state
//!   into the maps in an order no packet can see half-done (its module docs
//!   give the order and why);
//! - `apply`: a config reload's actions, checked, recorded, then published,
//!   and how a removed VIP's id is reused;
//! - `testing` (tests, and the `test-util` feature): a fake dataplane that
//!   checks the readers' invariant after every call.
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
//! any other's, so the readers' invariant (`publish`) covers backups unchanged.
//!
//! The VIP's scheduler (`VIP_F_*` in `VipInfo.flags`) only changes which hash
//! of a new flow indexes the ring; the ring itself is the same.
//!
//! # Failures
//!
//! Every write is recorded in the shadows only once it succeeded; on an error
//! the affected shadow is marked unknown, and the next [`Balancer::set_health`],
//! [`Balancer::apply_reload`] or [`Balancer::install`] rewrites what is
//! needed. So callers can simply retry.

mod adopt;
mod apply;
mod publish;
mod records;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod types;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    client_limits::VipLimits,
    flow::{FlowTimeouts, ReplyNat},
    guard::{ServiceKey, SharedService},
    limits::{MAX_BACKENDS, MAX_MAGLEV_ENTRIES, MAX_VIPS, RINGS_PER_VIP},
    vip_addr::VipAddrKey,
};

use self::records::{Backend, Removal, Vip, backend_index};
pub use self::{
    adopt::{AdoptError, PinnedState, PinnedVip},
    types::{AdminState, BackendView, Change, StateError, Step, VipView},
};
use crate::{
    config::model::{Cidr, Config, HealthCheckConfig},
    control::{maglev, plan::Action},
    dataplane::Dataplane,
    health::Health,
};

/// The control plane's state for one validated config.
///
/// # Examples
///
/// ```no_run
/// # fn demo(config: &lb::config::model::Config, maps: &mut impl lb::dataplane::Dataplane) -> anyhow::Result<()> {
/// use lb::{control::balancer::Balancer, health::Health};
///
/// let mut balancer = Balancer::new(config)?;
/// balancer.install(maps)?;
/// // Later, from the health checker:
/// let change = balancer.set_health(3, Health::Down, maps)?;
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
    /// `LIMITED` counters still hold that VIP's state.
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
    /// What `BACKEND_SERVICES` (and `SHARED_SERVICES`, for a shared one)
    /// hold per backend service, as last written; no entry when none was
    /// written or a write failed.
    services_written: HashMap<ServiceKey, (ReplyNat, Option<SharedService>)>,
    /// What `VIP_LIMITS` and `LIMIT_ALLOW` hold per VIP id, as last written
    /// (an id may have been a removed VIP's); no entry when none was
    /// written or a write failed.
    limits_written: HashMap<u32, (VipLimits, BTreeSet<Cidr>)>,
    /// What `VIP_TIMEOUTS` holds per VIP id, as last written (an id may
    /// have been a removed VIP's); no entry: zeros, or a failed write.
    timeouts_written: HashMap<u32, FlowTimeouts>,
}

fn not_running(vip: &str, address: SocketAddr) -> StateError {
    StateError::NotRunning { what: format!("backend {address} of vip {vip}") }
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
        let mut balancer = Balancer::sized(config)?;
        // All ids are free, so VIP n takes id n.
        for vip in &config.vips {
            balancer.add_vip(vip);
        }
        Ok(balancer)
    }

    /// An empty balancer with `config`'s sizes, once they are checked (see
    /// [`Balancer::new`]).
    fn sized(config: &Config) -> Result<Self, StateError> {
        let ring_size = config.agent.ring_size;
        if !maglev::is_prime(ring_size) {
            return Err(StateError::RingSizeNotPrime { ring_size });
        }
        let max_vips = config.agent.max_vips.min(MAX_VIPS);
        if config.vips.len() > max_vips as usize {
            return Err(StateError::TooManyVips { count: config.vips.len(), max: max_vips });
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
            return Err(StateError::TooManyBackends { count: backend_count, max: MAX_BACKENDS - 1 });
        }

        Ok(Balancer {
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
            services_written: HashMap::new(),
            limits_written: HashMap::new(),
            timeouts_written: HashMap::new(),
        })
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
        let wanted: HashSet<VipAddrKey> = addrs.into_iter().map(VipAddrKey::new).collect();
        let changed: Vec<VipAddrKey> = wanted.symmetric_difference(&self.local_addrs).copied().collect();
        self.local_addrs = wanted;
        for key in changed.into_iter().chain(self.unwritten_roles()) {
            self.write_roles(key, dp).map_err(|(roles, source)| StateError::Dataplane {
                vip: "(the gateway's own addresses)".to_owned(),
                step: Step::WriteAddrRoles { roles },
                source: Box::new(source),
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
        change += self.sync_orphans(dp)?;
        Ok(change)
    }

    /// Records a health verdict and brings the dataplane in line with it: the
    /// backend's entry, and, if the VIP's eligible set changed, its ring,
    /// rebuilt and published as a new generation (see `publish`'s module docs
    /// for the order and why). A verdict equal to the current one writes nothing
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
        health: Health,
        dp: &mut impl Dataplane,
    ) -> Result<Change, StateError> {
        let backend = self.backend_mut(backend_id).ok_or(StateError::UnknownBackend { backend_id })?;
        if backend.retired {
            // A late verdict from a checker stopped by a reload.
            return Ok(Change::default());
        }
        if backend.keep_when_down && backend.health != health {
            // Its entry stays UP either way; rewritten for its health note.
            backend.written_state = None;
        }
        backend.health = health;
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
    pub fn set_weight(&mut self, backend_id: u32, weight: u32, dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let backend =
            self.backend_mut(backend_id).filter(|b| !b.retired).ok_or(StateError::UnknownBackend { backend_id })?;
        backend.set_config_weight(weight);
        let vip_id = backend.vip_id;
        self.sync_vip(vip_id, dp)
    }

    /// Sets the runtime admin state of VIP `vip`'s backend at `address` and
    /// brings the dataplane in line, in the publish order: drain leaves the
    /// ring (its `BACKENDS` entry stays `UP`, so its flows continue),
    /// maintenance leaves the ring and is then written `DOWN` (its flows move
    /// at their next packet), ready undoes both.
    ///
    /// # Errors
    ///
    /// [`StateError::NotRunning`] when there is no such backend (nothing
    /// changed), or [`StateError::Dataplane`] as for [`Balancer::set_health`].
    pub fn set_admin(
        &mut self,
        vip: &str,
        address: SocketAddr,
        admin: AdminState,
        dp: &mut impl Dataplane,
    ) -> Result<Change, StateError> {
        let vip_id = self.with_backend(vip, address, |b| b.admin = admin).ok_or_else(|| not_running(vip, address))?;
        self.sync_vip(vip_id, dp)
    }

    /// Sets (or with `None` clears) the runtime weight of VIP `vip`'s backend
    /// at `address`, in force instead of the config's until cleared, and
    /// brings the dataplane in line.
    ///
    /// # Errors
    ///
    /// As [`Balancer::set_admin`].
    pub fn set_weight_override(
        &mut self,
        vip: &str,
        address: SocketAddr,
        weight: Option<u32>,
        dp: &mut impl Dataplane,
    ) -> Result<Change, StateError> {
        let vip_id = self
            .with_backend(vip, address, |b| b.set_weight_override(weight))
            .ok_or_else(|| not_running(vip, address))?;
        self.sync_vip(vip_id, dp)
    }

    /// Records a runtime change (admin state, weight override) of VIP
    /// `vip`'s backend at `address` without writing anything, e.g. restored
    /// from the state file before [`Balancer::install`]; `false` when there
    /// is no such backend.
    pub fn note_runtime(&mut self, vip: &str, address: SocketAddr, admin: AdminState, weight: Option<u32>) -> bool {
        self.with_backend(vip, address, |b| {
            b.admin = admin;
            b.set_weight_override(weight);
        })
        .is_some()
    }

    /// Applies a config reload's actions (see [`crate::control::plan`]) and
    /// brings the dataplane in line: first the removed VIPs leave it, then
    /// one sync per VIP touched, so the publish order holds for every
    /// change: added backends are written before a ring names them, removed
    /// ones `DOWN` only after the live ring no longer does, and an added VIP
    /// is published only once its ring is whole.
    ///
    /// Everything is checked before anything changes, so an error from the
    /// check leaves the balancer as it was. An added VIP takes the lowest free
    /// id and fresh backend ids; a removed one's backends are retired and its
    /// id is freed (see `apply`'s module docs for how a reused id starts clean). An
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
        self.vips
            .get(index)?
            .backend_ids
            .iter()
            .copied()
            .find(|&id| self.backends.get(backend_index(id)).is_some_and(|b| b.address == address))
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

    /// One VIP by id, e.g. to label a per-VIP counter.
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
        self.backends.get(backend_index(backend_id)).map(Backend::view)
    }

    /// The backend's own health check (`[vip.backend.health_check]`), if it
    /// has one; `None` means its VIP's.
    pub fn backend_check(&self, backend_id: u32) -> Option<&HealthCheckConfig> {
        self.backends.get(backend_index(backend_id)).and_then(|b| b.health_check.as_ref())
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
            limits: vip.limits.as_ref(),
            ring_generation: vip.live.map(|live| live.ring_generation),
            backends: vip.backend_ids.iter().filter_map(|&id| self.backend(id)).collect(),
            retired_backend_ids: &vip.retired,
        }
    }

    fn backend_mut(&mut self, backend_id: u32) -> Option<&mut Backend> {
        self.backends.get_mut(backend_index(backend_id))
    }
}
