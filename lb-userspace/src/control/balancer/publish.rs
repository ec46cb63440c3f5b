//! The publish protocol: how one VIP's desired state reaches the maps.
//! [`Balancer::install`], [`Balancer::set_health`], [`Balancer::set_weight`]
//! and [`Balancer::apply_reload`] all end in `sync_vip`, which writes only
//! what differs from the shadows, in an order no packet can see half-done.
//!
//! A change is published in three steps, always in this order, after a step 0 that
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
//! dataplane (`testing`) that checks exactly that. `VIP_ADDRS` (which protocols have a VIP
//! on an address, for packets without ports) is derived from the published
//! VIPs and written right after each `VIPS` entry appears or goes.

use lb_common::{
    addr, addr_filter,
    backend::{
        BACKEND_F_HEALTH_DOWN, BACKEND_F_SHARED, BACKEND_ID_NONE, BACKEND_STATE_DOWN, BACKEND_STATE_UP, BackendInfo,
    },
    flow::{ReplyNat, SERVICE_F_SHARED},
    guard::{ADDR_ROLE_BACKEND, ADDR_ROLE_LOCAL, ServiceKey, SharedService},
    limits::MAX_SHARED_VIPS,
    vip::{VIP_F_LIMITED, VipInfo, VipKey, ring_base},
    vip_addr::{VipAddrKey, proto_bit},
};

use super::{
    Balancer, Change, StateError, Step,
    records::{Backend, backend_index},
};
use crate::{
    config::model::Cidr,
    control::maglev::{self, MaglevBackend},
    dataplane::{Dataplane, DataplaneError},
};

/// The `BACKENDS` entry of a backend at `address` in `state`.
fn backend_info(backend: &Backend, state: u8, shared: bool) -> BackendInfo {
    let mut info = BackendInfo::new(backend.address, state);
    if shared {
        info.flags |= BACKEND_F_SHARED;
    }
    if state == BACKEND_STATE_UP && backend.health == crate::health::Health::Down {
        info.flags |= BACKEND_F_HEALTH_DOWN;
    }
    info
}

use std::collections::{BTreeSet, HashMap, HashSet};

impl Balancer {
    /// Makes the dataplane match the desired state of one VIP, in the three
    /// steps of the module docs, then its address's `VIP_ADDRS` entry.
    pub(super) fn sync_vip(&mut self, vip_id: u32, dp: &mut impl Dataplane) -> Result<Change, StateError> {
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
    pub(super) fn mark_addresses(
        &mut self,
        vip: &str,
        key: &VipKey,
        ids: &[u32],
        dp: &mut impl Dataplane,
    ) -> Result<(), StateError> {
        let failed = |step: Step| {
            let vip = vip.to_owned();
            move |source| StateError::Dataplane { vip, step, source: Box::new(source) }
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
            let addr_key = VipAddrKey::new(backend.address.ip());
            self.backend_addrs.insert(addr_key);
            self.write_roles(addr_key, dp).map_err(|(roles, source)| failed(Step::WriteAddrRoles { roles })(source))?;
        }
        let services: HashSet<ServiceKey> = ids
            .iter()
            .filter_map(|&id| self.backends.get(backend_index(id)))
            .map(|b| ServiceKey::new(b.address, key.proto))
            .collect();
        for (service, users) in self.service_users(&services) {
            self.write_service(vip, service, &users, dp)?;
        }
        Ok(())
    }

    /// The live backends, of any VIP, of each of `services`: ids in order,
    /// with the key of the VIP each serves.
    fn service_users(&self, services: &HashSet<ServiceKey>) -> HashMap<ServiceKey, Vec<(u32, u32, VipKey)>> {
        let vips: HashMap<u32, VipKey> = self.vips.iter().map(|vip| (vip.vip_id, vip.key)).collect();
        let mut users: HashMap<ServiceKey, Vec<(u32, u32, VipKey)>> = HashMap::new();
        for backend in self.backends.iter().filter(|b| !b.retired) {
            let Some(&vip) = vips.get(&backend.vip_id) else { continue };
            let service = ServiceKey::new(backend.address, vip.proto);
            if services.contains(&service) {
                users.entry(service).or_default().push((backend.backend_id, backend.vip_id, vip));
            }
        }
        users
    }

    /// Writes the entries of a backend service that `users` (backend id, VIP
    /// id, VIP key) serve, if they differ from what was written: one VIP, or
    /// several (`SHARED_SERVICES` first, so no packet sees the shared flag
    /// before the list), and marks the users' `BACKENDS` entries shared or
    /// not. A service no live backend serves keeps its entry: a retired
    /// backend's late replies are still translated.
    fn write_service(
        &mut self,
        vip: &str,
        service: ServiceKey,
        users: &[(u32, u32, VipKey)],
        dp: &mut impl Dataplane,
    ) -> Result<(), StateError> {
        let Some(&(first_id, first_vip, first_key)) = users.first() else { return Ok(()) };
        let failed = |step: Step| {
            let vip = vip.to_owned();
            move |source| StateError::Dataplane { vip, step, source: Box::new(source) }
        };
        let shared = users.len() > 1;
        let mut nat = ReplyNat::new(&first_key, first_vip, first_id);
        let list = shared.then(|| {
            let mut list = SharedService { vips: [nat; MAX_SHARED_VIPS as usize], count: 0 };
            for (slot, &(id, vip_id, key)) in list.vips.iter_mut().zip(users) {
                *slot = ReplyNat::new(&key, vip_id, id);
                list.count += 1;
            }
            list
        });
        if shared {
            nat.flags |= SERVICE_F_SHARED;
        }
        let wanted = (nat, list);
        if self.services_written.get(&service) != Some(&wanted) {
            self.services_written.remove(&service);
            if let Some(list) = list {
                dp.set_shared_service(service, list)
                    .map_err(failed(Step::WriteBackendService { backend_id: first_id }))?;
            }
            dp.set_backend_service(service, nat).map_err(failed(Step::WriteBackendService { backend_id: first_id }))?;
            self.services_written.insert(service, wanted);
        }
        for &(id, _, _) in users {
            let Some(backend) = self.backend_mut(id) else { continue };
            if backend.shared == shared {
                continue;
            }
            backend.shared = shared;
            // Rewritten with the same state and the new flag; the publish
            // order is about states, which do not change here.
            if let Some(state) = backend.written_state {
                backend.written_state = None;
                let info = backend_info(backend, state, shared);
                dp.set_backend(id, info).map_err(failed(Step::WriteBackend { backend_id: id, state }))?;
                if let Some(backend) = self.backend_mut(id) {
                    backend.written_state = Some(state);
                }
            }
        }
        Ok(())
    }

    /// Writes the `ADDR_ROLES` entry of `key` if it differs from what the
    /// entry must hold; on failure, the roles it tried to write.
    pub(super) fn write_roles(
        &mut self,
        key: VipAddrKey,
        dp: &mut impl Dataplane,
    ) -> Result<(), (u32, DataplaneError)> {
        let roles = (u32::from(self.local_addrs.contains(&key)) * ADDR_ROLE_LOCAL)
            | (u32::from(self.backend_addrs.contains(&key)) * ADDR_ROLE_BACKEND);
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
    pub(super) fn publish(&mut self, index: usize, ids: &[u32], dp: &mut impl Dataplane) -> Result<Change, StateError> {
        let mut change = Change::default();
        let ring = maglev::build_ring(self.ring_size, &self.ring_members(ids));
        let ring_size = self.ring_size;
        self.sync_limits(index, dp)?;
        self.sync_timeouts(index, dp)?;
        let vip = &mut self.vips[index];
        let limited = if vip.limits.is_some() { VIP_F_LIMITED } else { 0 };
        let flags = vip.scheduler.vip_flags() | limited;
        let ring_changed = vip.live.is_none_or(|live| vip.rings[(live.ring_generation & 1) as usize] != ring);
        if !ring_changed && vip.live.is_some_and(|live| live.flags == flags) {
            return Ok(change);
        }
        let failed = |name: &str, step: Step| {
            let vip = name.to_owned();
            move |source| StateError::Dataplane { vip, step, source: Box::new(source) }
        };
        if vip.live.is_none() && vip.stale_stats {
            dp.reset_vip_stats(vip.vip_id).map_err(failed(&vip.name, Step::ResetStats { vip_id: vip.vip_id }))?;
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
            let writes: Vec<(u32, u32)> =
                maglev::ring_diff(shadow, &ring).into_iter().map(|(slot, id)| (base + slot, id)).collect();
            if !writes.is_empty()
                && let Err(source) = dp.write_ring_slots(&writes)
            {
                // Some slots may have landed: the contents are unknown now.
                shadow.clear();
                let step = Step::WriteRing { generation: target, slots: writes.len() };
                return Err(StateError::Dataplane { vip: vip.name.clone(), step, source: Box::new(source) });
            }
            *shadow = ring;
            change.slots_written += writes.len();
        }
        let info = VipInfo { vip_id: vip.vip_id, ring_size, ring_generation: target, flags };
        dp.upsert_vip(vip.key, info).map_err(failed(&vip.name, Step::PublishRing { generation: target }))?;
        vip.live = Some(info);
        change.rings_published += 1;
        self.count_ring_slots(index);
        Ok(change)
    }

    /// Writes the VIP's idle timeouts (`VIP_TIMEOUTS`) where they differ
    /// from what was last written under its id; new flows copy them when
    /// they are pinned, so they are in place before the VIP is published.
    fn sync_timeouts(&mut self, index: usize, dp: &mut impl Dataplane) -> Result<(), StateError> {
        let vip = &self.vips[index];
        let (vip_id, wanted) = (vip.vip_id, vip.timeouts.to_map());
        // A never-written slot holds zeros: the defaults.
        let written = self.timeouts_written.get(&vip_id).copied().unwrap_or_default();
        if written == wanted {
            return Ok(());
        }
        self.timeouts_written.remove(&vip_id);
        dp.set_vip_timeouts(vip_id, wanted).map_err(|source| StateError::Dataplane {
            vip: vip.name.clone(),
            step: Step::WriteTimeouts,
            source: Box::new(source),
        })?;
        self.timeouts_written.insert(vip_id, wanted);
        Ok(())
    }

    /// Writes the VIP's per-client limits (`VIP_LIMITS`) and allow-list
    /// (`LIMIT_ALLOW`) where they differ from what was last written under
    /// its id, before `publish` sets `VIP_F_LIMITED`: a packet never reads
    /// limits that are not there. Allowed prefixes are added before stale
    /// ones are removed. Clients' buckets and counts (`CLIENTS`) are never
    /// touched: a reload that changes limits resets nothing.
    fn sync_limits(&mut self, index: usize, dp: &mut impl Dataplane) -> Result<(), StateError> {
        let vip = &self.vips[index];
        let (vip_id, name) = (vip.vip_id, vip.name.clone());
        let wanted = vip.limits.as_ref().map(|l| (l.to_map(), l.allow.iter().copied().collect::<BTreeSet<_>>()));
        let written = self.limits_written.get(&vip_id);
        let failed = |step: Step| {
            let vip = name.clone();
            move |source| StateError::Dataplane { vip, step, source: Box::new(source) }
        };
        let (map, allow) = match wanted {
            Some(w) => w,
            // No limits: the flag goes; what the maps hold is never read.
            None => return Ok(()),
        };
        let stale: Vec<Cidr> = written.map(|(_, a)| a.difference(&allow).copied().collect()).unwrap_or_default();
        let fresh: Vec<Cidr> = match written {
            Some((_, a)) => allow.difference(a).copied().collect(),
            None => allow.iter().copied().collect(),
        };
        if written.is_some_and(|(m, _)| *m == map) && stale.is_empty() && fresh.is_empty() {
            return Ok(());
        }
        // Unknown until every write lands.
        self.limits_written.remove(&vip_id);
        for cidr in &fresh {
            dp.set_limit_allow(vip_id, *cidr, true).map_err(failed(Step::WriteLimits))?;
        }
        dp.set_vip_limits(vip_id, map).map_err(failed(Step::WriteLimits))?;
        for cidr in &stale {
            dp.set_limit_allow(vip_id, *cidr, false).map_err(failed(Step::WriteLimits))?;
        }
        self.limits_written.insert(vip_id, (map, allow));
        Ok(())
    }

    /// Brings the `VIP_ADDRS` entry of `key`'s address in line with the VIPs
    /// published there (removed ones whose entry may remain included). Named
    /// `vip` in errors.
    pub(super) fn sync_vip_addr(&mut self, vip: &str, key: &VipKey, dp: &mut impl Dataplane) -> Result<(), StateError> {
        let addr = key.addr_key();
        let live = self.vips.iter().filter(|v| v.live.is_some()).map(|v| &v.key);
        let leaving = self.removing.iter().filter(|r| r.live).map(|r| &r.key);
        let protos =
            live.chain(leaving).filter(|k| k.addr_key() == addr).fold(0, |protos, k| protos | proto_bit(k.proto));
        let written = self.vip_addrs.get(&addr).copied().unwrap_or(Some(0));
        if written == Some(protos) {
            return Ok(());
        }
        self.vip_addrs.insert(addr, None);
        dp.set_vip_addr(addr, protos).map_err(|source| StateError::Dataplane {
            vip: vip.to_owned(),
            step: Step::WriteVipAddr { protos },
            source: Box::new(source),
        })?;
        if protos == 0 {
            self.vip_addrs.remove(&addr);
        } else {
            self.vip_addrs.insert(addr, Some(protos));
        }
        Ok(())
    }

    /// The backends a VIP's ring is built from: its available primaries, or,
    /// when it has none, its available backups (see the balancer's module
    /// docs, "Who is in the ring").
    pub(super) fn ring_members<'a>(&'a self, ids: &[u32]) -> Vec<MaglevBackend<'a>> {
        let available: Vec<&Backend> =
            ids.iter().filter_map(|&id| self.backends.get(backend_index(id))).filter(|b| b.available()).collect();
        let any_primary = available.iter().any(|b| !b.backup);
        available
            .into_iter()
            // Backups sit out while any primary is available.
            .filter(|b| !(any_primary && b.backup))
            .map(|b| MaglevBackend { id: b.backend_id, key: &b.key, weight: b.weight })
            .collect()
    }

    /// Writes backend `id`'s entry if it should hold `state` and may not yet;
    /// returns whether it wrote. Errors name VIP `vip`.
    pub(super) fn write_backend_if(
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
        if let Err(source) = dp.set_backend(id, backend_info(backend, state, backend.shared)) {
            return Err(StateError::Dataplane {
                vip: vip.to_owned(),
                step: Step::WriteBackend { backend_id: id, state },
                source: Box::new(source),
            });
        }
        backend.written_state = Some(state);
        Ok(true)
    }

    /// Refreshes each backend's share of the VIP's live ring for the status API.
    pub(super) fn count_ring_slots(&mut self, vip_index: usize) {
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
