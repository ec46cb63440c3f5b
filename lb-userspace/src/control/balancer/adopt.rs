//! Adopting the maps a previous agent pinned: a balancer whose ids, health
//! and shadows are what the maps hold, so that [`Balancer::install`] then
//! writes only what the config (or the health checks) change.
//!
//! Ids are what matter: the connection table names each flow's backend by
//! id, so a backend must keep its id across the restart, or its flows would
//! move. They are read back from the maps themselves, never from a file that
//! could disagree with them:
//!
//! - a VIP's id from its `VIPS` entry (matched by address, port, protocol);
//! - a backend's id from its service's `BACKEND_SERVICES` entry (or
//!   `SHARED_SERVICES` list), which names the VIP id and backend id of every
//!   live backend; its `BACKENDS` entry must hold the same address.
//!
//! Health comes from the `BACKENDS` state: `UP` is up, anything else down,
//! and the checkers start from there (rise/fall as usual, see
//! `health::Tracker::starting_at`), so there is no "unknown" gap. A pinned
//! backend the config no longer has is retired (written `DOWN` once no ring
//! names it); a pinned VIP it no longer has is removed like a reload removes
//! one. VIPs and backends the config adds take ids no pinned entry uses.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use lb_common::{
    FAMILY_V6,
    backend::{
        BACKEND_F_HEALTH_DOWN, BACKEND_F_SHARED, BACKEND_STATE_DOWN, BACKEND_STATE_UNUSED, BACKEND_STATE_UP,
        BackendInfo,
    },
    flow::{ReplyNat, SERVICE_F_SHARED},
    guard::{ServiceKey, SharedService},
    vip::{VipInfo, VipKey},
    vip_addr::proto_bit,
};

use super::{
    Balancer, Change, StateError, Step,
    records::{Backend, Removal, Vip, backend_index},
};
use crate::{
    config::model::{Config, HealthCheckKind, VipConfig},
    dataplane::Dataplane,
    health::Health,
};

/// What the pinned maps hold, as the agent read it at start.
#[derive(Clone, Debug, Default)]
pub struct PinnedState {
    /// Every `VIPS` entry, with the ring its live generation holds.
    pub vips: Vec<PinnedVip>,
    /// Every used `BACKENDS` entry, by id.
    pub backends: BTreeMap<u32, BackendInfo>,
    /// Every `BACKEND_SERVICES` entry, with its `SHARED_SERVICES` list when shared.
    pub services: Vec<(ServiceKey, ReplyNat, Option<SharedService>)>,
}

/// One `VIPS` entry and its live ring.
#[derive(Clone, Debug)]
pub struct PinnedVip {
    pub key: VipKey,
    pub info: VipInfo,
    /// The `ring_size` slots of generation `info.ring_generation & 1`.
    pub ring: Vec<u32>,
}

/// Why pinned state cannot be adopted by this config.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The rings were written with another `ring_size`.
    #[error("the pinned rings have {pinned} slots, the config's agent.ring_size is {config}")]
    RingSize { pinned: u32, config: u32 },
    /// The config does not fit the maps (as for a fresh start).
    #[error(transparent)]
    State(#[from] StateError),
}

impl PinnedState {
    /// The (VIP id, backend id) pairs that the service entry of `service` names.
    fn users_of(&self, service: &ServiceKey) -> Vec<(u32, u32)> {
        let Some((_, nat, list)) = self.services.iter().find(|(key, _, _)| key == service) else {
            return Vec::new();
        };
        match list {
            Some(list) if nat.flags & SERVICE_F_SHARED != 0 => {
                list.vips.iter().take(list.count as usize).map(|n| (n.vip_id, n.backend_id)).collect()
            }
            _ => vec![(nat.vip_id, nat.backend_id)],
        }
    }
}

impl Balancer {
    /// A balancer for `config` that takes over `pinned`: the ids, health
    /// and live rings it holds (see the module docs). Writes nothing; the
    /// caller then calls [`Balancer::install`], which writes only what
    /// differs.
    ///
    /// # Errors
    ///
    /// [`AdoptError::RingSize`] when the rings were built with another
    /// `ring_size`, or what [`Balancer::new`] refuses.
    pub fn adopt(config: &Config, pinned: &PinnedState) -> Result<Self, AdoptError> {
        let mut balancer = Balancer::sized(config)?;
        if let Some(vip) = pinned.vips.iter().find(|vip| vip.info.ring_size != balancer.ring_size) {
            return Err(AdoptError::RingSize { pinned: vip.info.ring_size, config: balancer.ring_size });
        }
        balancer.placeholders(pinned);
        // What `VIP_ADDRS` must hold for the pinned VIPs, as the last agent wrote it.
        for vip in &pinned.vips {
            let protos = balancer.vip_addrs.entry(vip.key.addr_key()).or_insert(Some(0));
            *protos = protos.map(|p| p | proto_bit(vip.key.proto));
        }
        let mut claimed_vips = HashSet::new();
        let mut added = Vec::new();
        for vip in &config.vips {
            let key = VipKey::new(vip.listen, vip.protocol.number());
            let found = pinned.vips.iter().find(|p| {
                p.key == key
                    && p.info.vip_id >= 1
                    && p.info.vip_id <= balancer.max_vips
                    && !claimed_vips.contains(&p.info.vip_id)
            });
            match found {
                Some(pinned_vip) => {
                    claimed_vips.insert(pinned_vip.info.vip_id);
                    balancer.adopt_vip(vip, pinned_vip, pinned);
                }
                None => added.push(vip),
            }
        }
        for gone in pinned.vips.iter().filter(|p| !claimed_vips.contains(&p.info.vip_id)) {
            balancer.remove_pinned_vip(gone, pinned);
        }
        // Any id no adopted VIP holds may have held a VIP before: its rings
        // and counters are unknown, so a VIP that takes it starts clean.
        let taken: HashSet<u32> = balancer.vips.iter().map(|vip| vip.vip_id).collect();
        balancer.used_ids = (1..=balancer.max_vips).filter(|id| !taken.contains(id)).collect();
        for vip in added {
            // Validation checked the count against max_vips; a None here
            // would mean a pinned VIP holds an id the config needs.
            if balancer.add_vip(vip).is_none() {
                return Err(StateError::TooManyVips { count: config.vips.len(), max: balancer.max_vips }.into());
            }
        }
        Ok(balancer)
    }

    /// Fills `backends` up to the highest pinned id with retired entries
    /// holding what `BACKENDS` holds, so new ids are allocated past them
    /// (the connection table may still name them) and each is written
    /// `DOWN` unless a configured backend claims it.
    fn placeholders(&mut self, pinned: &PinnedState) {
        let highest = pinned.backends.keys().next_back().copied().unwrap_or(0);
        for backend_id in 1..=highest {
            let info = pinned.backends.get(&backend_id);
            let address = info.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), socket_addr);
            let state = info.map_or(BACKEND_STATE_UNUSED, |info| info.state);
            self.backends.push(Backend {
                backend_id,
                vip_id: 0,
                address,
                key: address.to_string(),
                weight: 0,
                config_weight: 0,
                weight_override: None,
                admin: super::AdminState::Ready,
                keep_when_down: false,
                backup: false,
                health: Health::Down,
                // An unused slot needs no write: nothing names it.
                written_state: Some(if state == BACKEND_STATE_UNUSED { BACKEND_STATE_DOWN } else { state }),
                ring_slots: 0,
                health_check: None,
                retired: true,
                shared: info.is_some_and(|info| info.flags & BACKEND_F_SHARED != 0),
            });
        }
    }

    /// Takes over a pinned VIP for `config`: its id, its live ring as the
    /// shadow of its live generation (the other one is unknown), its
    /// backends by their pinned ids.
    fn adopt_vip(&mut self, config: &VipConfig, pinned_vip: &PinnedVip, pinned: &PinnedState) {
        let vip_id = pinned_vip.info.vip_id;
        let proto = config.protocol.number();
        let mut backend_ids = Vec::with_capacity(config.backends.len());
        for backend in &config.backends {
            let service = ServiceKey::new(backend.address, proto);
            let wanted = BackendInfo::new(backend.address, BACKEND_STATE_UP);
            let claim = pinned.users_of(&service).into_iter().find_map(|(vid, id)| {
                let info = pinned.backends.get(&id)?;
                let same = vid == vip_id && info.addr_be == wanted.addr_be && info.port_be == wanted.port_be;
                let free = self.backends.get(backend_index(id)).is_some_and(|b| b.retired && b.vip_id == 0);
                // UP only to keep its flows: its health was down.
                let state = if info.flags & BACKEND_F_HEALTH_DOWN != 0 { BACKEND_STATE_DOWN } else { info.state };
                (same && free).then_some((id, state))
            });
            let id = match claim {
                Some((id, state)) => {
                    let health = match (&backend.check(&config.health_check).kind, state) {
                        (HealthCheckKind::None, _) => Health::Up,
                        (_, BACKEND_STATE_UP) => Health::Up,
                        _ => Health::Down,
                    };
                    let slot = &mut self.backends[backend_index(id)];
                    let written = slot.written_state;
                    let shared = slot.shared;
                    *slot = Backend::new(id, vip_id, backend, health);
                    slot.written_state = written;
                    slot.shared = shared;
                    id
                }
                None => self.add_backend(vip_id, backend, Health::initial(&backend.check(&config.health_check).kind)),
            };
            backend_ids.push(id);
        }
        let mut vip = Vip::new(vip_id, config, backend_ids, self.ring_size, true);
        let live = pinned_vip.info.ring_generation & 1;
        vip.rings[live as usize] = pinned_vip.ring.clone();
        vip.live = Some(pinned_vip.info);
        vip.stale_stats = false;
        vip.retired = self.unclaimed_of(vip_id, &pinned_vip.ring, pinned);
        for &id in &vip.retired {
            self.backends[backend_index(id)].vip_id = vip_id;
        }
        let at = self.vip_position(vip_id).unwrap_or_else(|at| at);
        self.vips.insert(at, vip);
        self.sync_keep(at);
        self.count_ring_slots(at);
    }

    /// Pinned backend ids of VIP `vip_id` (by its services or its live
    /// ring) that no configured backend claimed: retired, written `DOWN`
    /// once its new ring no longer names them.
    fn unclaimed_of(&self, vip_id: u32, ring: &[u32], pinned: &PinnedState) -> Vec<u32> {
        let by_service = pinned.services.iter().flat_map(|(service, _, _)| pinned.users_of(service));
        let ids: HashSet<u32> = by_service
            .filter(|&(vid, _)| vid == vip_id)
            .map(|(_, id)| id)
            .chain(ring.iter().copied())
            .filter(|&id| self.backends.get(backend_index(id)).is_some_and(|b| b.retired && b.vip_id == 0))
            .collect();
        let mut ids: Vec<u32> = ids.into_iter().collect();
        ids.sort_unstable();
        ids
    }

    /// A pinned VIP the config no longer has: removed as a reload removes
    /// one (its `VIPS` entry first, then its backends `DOWN`).
    fn remove_pinned_vip(&mut self, gone: &PinnedVip, pinned: &PinnedState) {
        let backend_ids = self.unclaimed_of(gone.info.vip_id, &gone.ring, pinned);
        for &id in &backend_ids {
            self.backends[backend_index(id)].vip_id = gone.info.vip_id;
        }
        self.removing.push(Removal {
            vip_id: gone.info.vip_id,
            name: format!("(pinned vip id {})", gone.info.vip_id),
            key: gone.key,
            live: true,
            backend_ids,
        });
    }

    /// Writes `DOWN` for retired backends still `UP` in `BACKENDS` that no
    /// VIP or removal took care of (a pinned id whose service entry a later
    /// backend took over), once no live ring names them.
    pub(super) fn sync_orphans(&mut self, dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let mut change = Change::default();
        let named: HashSet<u32> = self
            .vips
            .iter()
            .filter_map(|vip| vip.live.map(|live| &vip.rings[(live.ring_generation & 1) as usize]))
            .flatten()
            .copied()
            .collect();
        let orphans: Vec<u32> = self
            .backends
            .iter()
            .filter(|b| b.retired && b.vip_id == 0 && b.written_state == Some(BACKEND_STATE_UP))
            .map(|b| b.backend_id)
            .filter(|id| !named.contains(id))
            .collect();
        for id in orphans {
            let backend = &mut self.backends[backend_index(id)];
            let info = BackendInfo::new(backend.address, BACKEND_STATE_DOWN);
            backend.written_state = None;
            dp.set_backend(id, info).map_err(|source| StateError::Dataplane {
                vip: "(pinned backends no vip names)".to_owned(),
                step: Step::WriteBackend { backend_id: id, state: BACKEND_STATE_DOWN },
                source: Box::new(source),
            })?;
            self.backends[backend_index(id)].written_state = Some(BACKEND_STATE_DOWN);
            change.backends_written += 1;
        }
        Ok(change)
    }
}

/// The address a `BACKENDS` entry holds (see `lb_common::addr`).
fn socket_addr(info: &BackendInfo) -> SocketAddr {
    let bytes = |w: u32| w.to_ne_bytes();
    let ip = if info.family == FAMILY_V6 {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(info.addr_be) {
            chunk.copy_from_slice(&bytes(word));
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::from(bytes(info.addr_be[0])))
    };
    SocketAddr::new(ip, u16::from_be(info.port_be))
}
