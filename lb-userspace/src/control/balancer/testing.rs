//! A fake dataplane for tests of the control logic, here and in other
//! crates (the `test-util` feature: `lb-bench`, integration tests).
//!
//! [`FakeDataplane`] records the calls and models the maps they write. After
//! every call it plays a reader, as a packet would: it panics if a live ring
//! names a backend that is not `UP` (or whose address is not yet in the
//! address filter, the backend role or its service entry), or if a ring
//! write touched a ring packets are reading. That is the publish protocol's
//! invariant (see `publish`); every test of the balancer checks it on every
//! call for free. It can also fail a chosen call, to test retries.

use std::collections::{BTreeSet, HashMap};

use lb_common::{
    addr_filter,
    backend::{BACKEND_ID_NONE, BACKEND_STATE_UP, BackendInfo},
    client_limits::VipLimits,
    flow::{FlowTimeouts, ReplyNat, SERVICE_F_SHARED},
    guard::{ADDR_ROLE_BACKEND, ServiceKey, SharedService},
    limits::{MAX_BACKENDS, RINGS_PER_VIP},
    map_names,
    vip::{VipInfo, VipKey, ring_base},
    vip_addr::VipAddrKey,
};

use crate::{
    config::model::{Cidr, Config},
    dataplane::{Dataplane, DataplaneError},
};

/// A call that changed what packets see, as the fake recorded it (address
/// filter, roles and service entries are modelled but not recorded: the
/// reader check covers them).
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
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
pub struct FakeDataplane {
    /// Every recorded call, in order.
    pub calls: Vec<Call>,
    /// `VIPS` as written.
    pub vips: HashMap<VipKey, VipInfo>,
    /// `VIP_ADDRS` as written; no entry for 0.
    pub vip_addrs: HashMap<VipAddrKey, u32>,
    /// `BACKENDS` as written, by backend id.
    pub backends: HashMap<u32, BackendInfo>,
    /// `MAGLEV`, sized like the loader sizes it for the config.
    pub maglev: Vec<u32>,
    /// Counts per VIP id, as the per-VIP counters (`LIMITED`) would hold them.
    pub vip_stats: HashMap<u32, u64>,
    /// `ADDR_FILTER` slots set.
    pub filter: BTreeSet<u32>,
    /// `ADDR_ROLES` as written.
    pub roles: HashMap<VipAddrKey, u32>,
    /// `BACKEND_SERVICES` as written.
    pub services: HashMap<ServiceKey, ReplyNat>,
    /// `SHARED_SERVICES` as written.
    pub shared: HashMap<ServiceKey, SharedService>,
    /// `VIP_TIMEOUTS` as written, by VIP id.
    pub timeouts: HashMap<u32, FlowTimeouts>,
    /// `VIP_LIMITS` as written, by VIP id.
    pub limits: HashMap<u32, VipLimits>,
    /// `LIMIT_ALLOW` as written.
    pub allow: BTreeSet<(u32, Cidr)>,
    attempts: usize,
    /// Fail the attempt with this index (counted over the fake's life); a
    /// failing slot write still applies its first half, like a syscall
    /// loop that stops midway.
    fail_attempt: Option<usize>,
}

impl FakeDataplane {
    /// Empty maps, as freshly loaded for `config` (`MAGLEV` zeroed).
    #[must_use]
    pub fn for_config(config: &Config) -> Self {
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
            shared: HashMap::new(),
            limits: HashMap::new(),
            timeouts: HashMap::new(),
            allow: BTreeSet::new(),
            attempts: 0,
            fail_attempt: None,
        }
    }

    /// Fails the `n`-th call from now (0 = the next one).
    pub fn fail_in(&mut self, n: usize) {
        self.fail_attempt = Some(self.attempts + n);
    }

    fn attempt(&mut self) -> bool {
        let failing = self.fail_attempt == Some(self.attempts);
        self.attempts += 1;
        failing
    }

    /// The ring packets to `key` read now; `None` while it has no `VIPS` entry.
    #[must_use]
    pub fn live_ring(&self, key: &VipKey) -> Option<&[u32]> {
        let info = self.vips.get(key)?;
        let base = info.ring_base() as usize;
        self.maglev.get(base..base + info.ring_size as usize)
    }

    /// What the agent would read back from these maps had they been
    /// pinned: the input of [`super::Balancer::adopt`].
    #[must_use]
    pub fn pinned_state(&self) -> super::PinnedState {
        let vips = self
            .vips
            .iter()
            .map(|(key, info)| super::PinnedVip {
                key: *key,
                info: *info,
                ring: self.live_ring(key).unwrap_or_default().to_vec(),
            })
            .collect();
        let backends = self.backends.iter().map(|(id, info)| (*id, *info)).collect();
        let services = self.services.iter().map(|(key, nat)| (*key, *nat, self.shared.get(key).copied())).collect();
        super::PinnedState { vips, backends, services }
    }

    /// Ring `generation` of VIP `vip_id`, live or not.
    ///
    /// # Panics
    /// If it lies outside `MAGLEV`.
    #[must_use]
    pub fn ring(&self, vip_id: u32, generation: u32, ring_size: u32) -> &[u32] {
        let base = ring_base(vip_id, generation, ring_size) as usize;
        &self.maglev[base..base + ring_size as usize]
    }

    /// The readers' invariant, checked after every call that changes what
    /// packets see.
    /// Whether the service entries name backend `id` of VIP `vip` for
    /// `service`: its own entry, or the shared list's.
    fn services_name(&self, service: &ServiceKey, id: u32, vip: &VipKey) -> bool {
        let names =
            |nat: &ReplyNat| nat.backend_id == id && nat.vip_addr_be == vip.addr_be && nat.vip_port_be == vip.port_be;
        match self.services.get(service) {
            Some(nat) if nat.flags & SERVICE_F_SHARED != 0 => {
                self.shared.get(service).is_some_and(|list| list.vips[..list.count as usize].iter().any(names))
            }
            Some(nat) => names(nat),
            None => false,
        }
    }

    fn check_readers(&self) {
        for (key, info) in &self.vips {
            assert!(
                info.flags & lb_common::vip::VIP_F_LIMITED == 0 || self.limits.contains_key(&info.vip_id),
                "after call {}: vip {} published as limited before its limits are written",
                self.calls.len(),
                info.vip_id
            );
            assert!(
                self.filter.contains(&addr_filter::slot(&key.addr_be)),
                "after call {}: vip {} published before its address is in the filter",
                self.calls.len(),
                info.vip_id
            );
            let ring = self.live_ring(key).unwrap_or_else(|| panic!("vip {} ring out of the array", info.vip_id));
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
                    let service =
                        ServiceKey { addr_be: b.addr_be, port_be: b.port_be, proto: key.proto, family: b.family };
                    assert!(
                        self.services_name(&service, id, key),
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

    /// The calls recorded since `calls.len()` was `start`.
    #[must_use]
    pub fn calls_since(&self, start: usize) -> &[Call] {
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

    fn set_shared_service(&mut self, key: ServiceKey, list: SharedService) -> Result<(), DataplaneError> {
        self.shared.insert(key, list);
        Ok(())
    }

    fn set_vip_timeouts(&mut self, vip_id: u32, timeouts: FlowTimeouts) -> Result<(), DataplaneError> {
        self.timeouts.insert(vip_id, timeouts);
        Ok(())
    }

    fn set_vip_limits(&mut self, vip_id: u32, limits: VipLimits) -> Result<(), DataplaneError> {
        if self.attempt() {
            return Err(DataplaneError::injected(map_names::VIP_LIMITS, "write"));
        }
        self.limits.insert(vip_id, limits);
        Ok(())
    }

    fn set_limit_allow(&mut self, vip_id: u32, cidr: Cidr, allowed: bool) -> Result<(), DataplaneError> {
        if allowed {
            self.allow.insert((vip_id, cidr));
        } else {
            self.allow.remove(&(vip_id, cidr));
        }
        Ok(())
    }

    fn set_backend_service(&mut self, key: ServiceKey, nat: ReplyNat) -> Result<(), DataplaneError> {
        if nat.flags & SERVICE_F_SHARED != 0 {
            assert!(self.shared.contains_key(&key), "a service marked shared before its list is written");
        }
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
            return Err(DataplaneError::injected(map_names::LIMITED, "reset"));
        }
        self.vip_stats.remove(&vip_id);
        self.calls.push(Call::ResetStats { vip_id });
        Ok(())
    }

    fn set_backend(&mut self, backend_id: u32, info: BackendInfo) -> Result<(), DataplaneError> {
        assert!(backend_id != 0 && backend_id < MAX_BACKENDS, "backend id {backend_id} out of range");
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
                assert!(!live.contains(&index), "slot {index} written into vip {}'s live ring", info.vip_id);
            }
        }
        let failing = self.attempt();
        let applied = if failing { &slots[..slots.len() / 2] } else { slots };
        for &(index, id) in applied {
            self.maglev[index as usize] = id;
        }
        if failing {
            return Err(DataplaneError::injected(map_names::MAGLEV, "write"));
        }
        self.calls.push(Call::WriteSlots { slots: slots.to_vec() });
        self.check_readers();
        Ok(())
    }
}
