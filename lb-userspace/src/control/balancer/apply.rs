//! Applying a config reload's actions ([`Balancer::apply_reload`], planned by
//! [`crate::control::plan`]): check them all, record the new desired state,
//! then publish each VIP they touched (`publish`).
//!
//! Backend ids stay stable across reloads: a backend removed by one is
//! retired (written `DOWN`, so flows pinned to it are rescheduled) and its id
//! is never handed out again; an added backend takes the next id never used.
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
//! - its `LIMITED` counters are zeroed before the new VIP is published. The
//!   agent reports a VIP's traffic as the sum over its backends'
//!   `BACKEND_STATS`, whose ids are never reused: there are no per-VIP
//!   traffic counters, whose slot the removed VIP's flows could still add
//!   to after the reuse (their replies still find the old id in their
//!   backends' service entries, which stay).

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
};

use lb_common::{backend::BACKEND_STATE_DOWN, limits::MAX_BACKENDS, vip::VipKey};

use super::{
    Balancer, Change, StateError, Step,
    records::{Backend, Removal, Vip, backend_index},
};
use crate::config::model::OnBackendDown;
use crate::{
    config::model::{BackendConfig, HealthCheckConfig, HealthCheckKind, VipConfig},
    control::plan::Action,
    dataplane::Dataplane,
    health::Health,
};

impl Balancer {
    /// Refuses `actions` unless every one applies to the state it finds: the
    /// VIPs and backends it names exist (or, added, do not), and what results
    /// fits the id spaces.
    pub(super) fn check_reload(&self, actions: &[Action]) -> Result<(), StateError> {
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
                Action::SetWeight { address, .. }
                | Action::SetBackup { address, .. }
                | Action::SetBackendHealthCheck { address, .. }
                | Action::RemoveBackend { address, .. } => {
                    let index = running.ok_or_else(|| not_running(format!("vip {name}")))?;
                    self.backend_of(index, *address)
                        .ok_or_else(|| not_running(format!("vip {name} backend {address}")))?;
                }
                Action::SetScheduler { .. }
                | Action::SetHealthCheck { .. }
                | Action::SetLimits { .. }
                | Action::SetTimeouts { .. }
                | Action::SetPassiveHealth { .. }
                | Action::SetOnBackendDown { .. } => {
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
    pub(super) fn record_reload(&mut self, actions: &[Action]) -> BTreeSet<u32> {
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
                // The agent's own (`crate::health::passive`): nothing here.
                Action::SetHealthCheck { .. } | Action::SetPassiveHealth { .. } => {}
                Action::RemoveVip { .. } => self.remove_vip(name),
                Action::AddVip { vip } => {
                    touched.extend(self.add_vip(vip));
                }
                Action::SetOnBackendDown { to, .. } => {
                    if let Some(index) = self.vip_index_by_name(name) {
                        self.vips[index].on_backend_down = *to;
                        self.sync_keep(index);
                        touched.insert(self.vips[index].vip_id);
                    }
                }
                Action::SetScheduler { to, .. } => {
                    if let Some(vip) = self.vip_by_name_mut(name) {
                        vip.scheduler = *to;
                        touched.insert(vip.vip_id);
                    }
                }
                Action::SetLimits { to, .. } => {
                    if let Some(vip) = self.vip_by_name_mut(name) {
                        vip.limits.clone_from(to);
                        touched.insert(vip.vip_id);
                    }
                }
                Action::SetTimeouts { to, .. } => {
                    if let Some(vip) = self.vip_by_name_mut(name) {
                        vip.timeouts = *to;
                        touched.insert(vip.vip_id);
                    }
                }
                Action::SetWeight { address, to, .. } => {
                    touched.extend(self.with_backend(name, *address, |b| b.set_config_weight(*to)));
                }
                Action::SetBackup { address, to, .. } => {
                    touched.extend(self.with_backend(name, *address, |b| b.backup = *to));
                }
                Action::SetBackendHealthCheck { address, check, .. } => {
                    touched.extend(self.set_backend_health_check(name, *address, check.as_ref()));
                }
                Action::RemoveBackend { address, .. } => {
                    touched.extend(self.remove_backend(name, *address));
                }
                Action::AddBackend { backend, .. } => {
                    let Some(index) = self.vip_index_by_name(name) else { continue };
                    let vip = &self.vips[index];
                    let (vip_id, health) = (vip.vip_id, Health::initial(&backend.check(&vip.health_check).kind));
                    let backend_id = self.add_backend(vip_id, backend, health);
                    self.vips[index].backend_ids.push(backend_id);
                    self.sync_keep(index);
                    touched.insert(vip_id);
                }
            }
        }
        touched
    }

    /// A VIP's new health check; `none` brings its backends up. Returns its id.
    pub(super) fn set_health_check(&mut self, name: &str, check: &HealthCheckConfig) -> Option<u32> {
        let index = self.vip_index_by_name(name)?;
        let vip = &mut self.vips[index];
        vip.health_check = check.clone();
        if matches!(check.kind, HealthCheckKind::None) {
            for &id in &vip.backend_ids {
                // A backend with a check of its own is still probed.
                if let Some(backend) = self.backends.get_mut(backend_index(id)).filter(|b| b.health_check.is_none()) {
                    backend.health = Health::Up;
                }
            }
        }
        Some(vip.vip_id)
    }

    /// A backend's own check (`None`: its VIP's again); one whose check
    /// becomes `none` comes up. Returns its VIP's id.
    pub(super) fn set_backend_health_check(
        &mut self,
        name: &str,
        address: SocketAddr,
        check: Option<&HealthCheckConfig>,
    ) -> Option<u32> {
        let index = self.vip_index_by_name(name)?;
        let unchecked = matches!(check.unwrap_or(&self.vips[index].health_check).kind, HealthCheckKind::None);
        self.with_backend(name, address, |backend| {
            backend.health_check = check.cloned();
            if unchecked {
                backend.health = Health::Up;
            }
        })
    }

    /// Applies `f` to the (not retired) backend at `address` of VIP `name`;
    /// returns the VIP's id.
    pub(super) fn with_backend(
        &mut self,
        name: &str,
        address: SocketAddr,
        f: impl FnOnce(&mut Backend),
    ) -> Option<u32> {
        let index = self.vip_index_by_name(name)?;
        let backend = self.backend_of(index, address).and_then(|id| self.backend_mut(id))?;
        f(backend);
        Some(backend.vip_id)
    }

    /// Retires the backend at `address` of VIP `name`; returns the VIP's id.
    pub(super) fn remove_backend(&mut self, name: &str, address: SocketAddr) -> Option<u32> {
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
    pub(super) fn add_vip(&mut self, config: &VipConfig) -> Option<u32> {
        let vip_id = (1..=self.max_vips).find(|&id| self.vip_position(id).is_err())?;
        let reused = self.used_ids.remove(&vip_id);
        let backend_ids = config
            .backends
            .iter()
            .map(|backend| {
                let health = Health::initial(&backend.check(&config.health_check).kind);
                self.add_backend(vip_id, backend, health)
            })
            .collect();
        let vip = Vip::new(vip_id, config, backend_ids, self.ring_size, reused);
        let at = self.vip_position(vip_id).unwrap_or_else(|at| at);
        self.vips.insert(at, vip);
        self.sync_keep(at);
        Some(vip_id)
    }

    /// Gives each backend of the VIP at `index` its VIP's `on_backend_down`.
    pub(super) fn sync_keep(&mut self, index: usize) {
        let Some(vip) = self.vips.get(index) else { return };
        let keep = vip.on_backend_down == OnBackendDown::Keep;
        for &id in &vip.backend_ids {
            if let Some(backend) = self.backends.get_mut(backend_index(id)) {
                backend.keep_when_down = keep;
            }
        }
    }

    /// A backend of VIP `vip_id` under the next id never used (the caller
    /// checked that one is left: below `MAX_BACKENDS`, so it fits a u32).
    pub(super) fn add_backend(&mut self, vip_id: u32, config: &BackendConfig, health: Health) -> u32 {
        let backend_id = self.backends.len() as u32 + 1;
        self.backends.push(Backend::new(backend_id, vip_id, config, health));
        backend_id
    }

    /// Takes VIP `name` out of service: its backends are retired, and it waits
    /// in `removing` until [`Balancer::sync_removals`] has taken it out of the
    /// maps.
    pub(super) fn remove_vip(&mut self, name: &str) {
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
    pub(super) fn sync_removals(&mut self, dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let mut change = Change::default();
        while let Some(removal) = self.removing.first() {
            let (vip_id, name, key, ids) =
                (removal.vip_id, removal.name.clone(), removal.key, removal.backend_ids.clone());
            if removal.live {
                dp.remove_vip(&key).map_err(|source| StateError::Dataplane {
                    vip: name.clone(),
                    step: Step::RemoveVip { vip_id },
                    source: Box::new(source),
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
}
