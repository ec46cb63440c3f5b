//! Typed wrappers over the program's maps.
//! (aya handles LRU hash maps with its plain `HashMap` type.)

use std::{
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    backend::{BACKEND_ID_NONE, BACKEND_STATE_UNUSED, BackendInfo},
    client_limits::{AllowKey, ClientKey, ClientState, VipLimits, limit, masked},
    flow::{FLOW_F_CLOSING, FLOW_F_COUNTED, FlowKey, FlowState, FlowTimeouts, ReplyNat},
    guard::{AddrRoles, ServiceKey, SharedService},
    handshake::Handshakes,
    map_names,
    stats::{Counters, conntrack_event, reason},
    vip::{VipInfo, VipKey, ring_base},
    vip_addr::{VipAddrInfo, VipAddrKey},
};

use super::{Dataplane, DataplaneError};
use crate::config::model::Cidr;

/// Map update flag: only replace an entry that exists (linux/bpf.h).
const BPF_EXIST: u64 = 2;
use crate::control::balancer::{PinnedState, PinnedVip};

/// The program's maps, taken out of the loaded object.
pub struct Maps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addrs: HashMap<MapData, VipAddrKey, VipAddrInfo>,
    addr_filter: Array<MapData, u8>,
    backends: Array<MapData, BackendInfo>,
    maglev: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, FlowState>,
    addr_roles: HashMap<MapData, VipAddrKey, AddrRoles>,
    backend_services: HashMap<MapData, ServiceKey, ReplyNat>,
    shared_services: HashMap<MapData, ServiceKey, SharedService>,
    backend_stats: PerCpuArray<MapData, Counters>,
    verdicts: PerCpuArray<MapData, u64>,
    conntrack_events: PerCpuArray<MapData, u64>,
    vip_limits: Array<MapData, VipLimits>,
    vip_timeouts: Array<MapData, FlowTimeouts>,
    clients: HashMap<MapData, ClientKey, ClientState>,
    limit_allow: LpmTrie<MapData, AllowKey, u8>,
    limited: PerCpuArray<MapData, u64>,
    handshakes: PerCpuArray<MapData, Handshakes>,
    /// Entries `CONNTRACK` has room for, as the kernel created it.
    conntrack_capacity: u32,
    /// The last count of `CONNTRACK`'s entries; see [`Occupancy`].
    occupancy: Arc<Mutex<Occupancy>>,
}

/// How old a count of the connection table's entries may get before the
/// next request for it starts a new count (see [`Maps::conntrack`]).
pub const OCCUPANCY_MAX_AGE: Duration = Duration::from_secs(5);

/// Counting the connection table's entries walks it, one syscall per entry:
/// about 1.3 µs each here, so over a second for a full table of a million.
/// So the count is kept, and refreshed on a thread of its own with its own
/// handle on the map, never under the caller's lock (the agent's state).
///
/// Between walks, callers get the last count plus the keys inserted since
/// that walk began (the program counts every insert, and only LRU
/// evictions remove entries), at most the capacity: current at every read,
/// never below the entries present, and above them by at most the inserts
/// made during the last walk (counted by the walk and again as inserted
/// since) plus evictions since it began.
struct Occupancy {
    /// When the last count began, what it found, and the insert count when it began.
    last: Option<(Instant, u64, u64)>,
    /// Evictions, estimated at each count as keys inserted before it began
    /// minus entries it found, and never lowered: a counter must not go
    /// down, and the estimate errs only by inserts during the walk. (With
    /// the live insert count instead, a table filling up between counts would
    /// show its new flows as evictions.)
    evicted: u64,
    /// Live (not expired) flows per backend id, as of the last count.
    flows: std::collections::HashMap<u32, u64>,
    /// A count is running.
    walking: bool,
    /// [`OCCUPANCY_MAX_AGE`], unless a test shortened it.
    max_age: Duration,
}

impl Occupancy {
    /// A finished count: `entries` found by a walk that began after
    /// `inserted` keys had been inserted.
    fn record(&mut self, inserted: u64, began: Instant, walk: Walk) {
        let Walk { entries, flows } = walk;
        self.flows = flows;
        self.last = Some((began, entries, inserted));
        self.evicted = self.evicted.max(inserted.saturating_sub(entries));
    }
}

/// What one walk of the connection table found.
struct Walk {
    entries: u64,
    flows: std::collections::HashMap<u32, u64>,
}

/// Walks `table`: its entries, and the live flows per backend (those not idle
/// past their timeout, `lb_common::timeouts`, by the program's clock).
fn walk(table: &HashMap<MapData, FlowKey, FlowState>) -> Walk {
    let now = monotonic_ns();
    let mut walk = Walk { entries: 0, flows: std::collections::HashMap::new() };
    for (key, state) in table.iter().filter_map(Result::ok) {
        walk.entries += 1;
        if !lb_common::timeouts::is_expired(&state, key.proto, now) {
            *walk.flows.entry(state.backend_id).or_default() += 1;
        }
    }
    walk
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// The connection table at a glance; see [`Maps::conntrack`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Entries present (live flows, and idle ones not yet reused or
    /// evicted): the last count plus keys inserted since it began.
    pub entries: u64,
    /// Entries the table has room for.
    pub capacity: u64,
    /// `conntrack_event` counts, summed over CPUs, indexed by event.
    pub events: [u64; conntrack_event::COUNT as usize],
    /// LRU evictions, estimated: keys inserted minus entries present, as
    /// nothing else removes entries (the kernel does not report evictions);
    /// as of the last count.
    pub evicted: u64,
    /// How long ago the last count began.
    pub counted_ago: Duration,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataplaneError> {
    ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name })
}

/// Converts an untyped map, checking key and value sizes against lb-common.
macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?.try_into().map_err(|source| DataplaneError::Map { name: $name, op: "open", source })?
    };
}

impl Maps {
    pub(super) fn take_from(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Self {
            vips: typed!(ebpf, map_names::VIPS),
            vip_addrs: typed!(ebpf, map_names::VIP_ADDRS),
            addr_filter: typed!(ebpf, map_names::ADDR_FILTER),
            backends: typed!(ebpf, map_names::BACKENDS),
            maglev: typed!(ebpf, map_names::MAGLEV),
            conntrack: typed!(ebpf, map_names::CONNTRACK),
            addr_roles: typed!(ebpf, map_names::ADDR_ROLES),
            backend_services: typed!(ebpf, map_names::BACKEND_SERVICES),
            shared_services: typed!(ebpf, map_names::SHARED_SERVICES),
            backend_stats: typed!(ebpf, map_names::BACKEND_STATS),
            verdicts: typed!(ebpf, map_names::VERDICTS),
            conntrack_events: typed!(ebpf, map_names::CONNTRACK_EVENTS),
            vip_limits: typed!(ebpf, map_names::VIP_LIMITS),
            vip_timeouts: typed!(ebpf, map_names::VIP_TIMEOUTS),
            clients: typed!(ebpf, map_names::CLIENTS),
            limit_allow: typed!(ebpf, map_names::LIMIT_ALLOW),
            limited: typed!(ebpf, map_names::LIMITED),
            handshakes: typed!(ebpf, map_names::HANDSHAKES),
            conntrack_capacity: 0,
            occupancy: Arc::new(Mutex::new(Occupancy {
                last: None,
                evicted: 0,
                flows: std::collections::HashMap::new(),
                walking: false,
                max_age: OCCUPANCY_MAX_AGE,
            })),
        }
        .with_conntrack_capacity()
    }

    fn with_conntrack_capacity(mut self) -> Result<Self, DataplaneError> {
        let info = self.conntrack.map().info().map_err(|source| DataplaneError::Map {
            name: map_names::CONNTRACK,
            op: "read info",
            source,
        })?;
        self.conntrack_capacity = info.max_entries();
        Ok(self)
    }

    /// Traffic of one backend id, summed over CPUs.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] if the id is out of range.
    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters, DataplaneError> {
        sum_counters(&self.backend_stats, map_names::BACKEND_STATS, backend_id)
    }

    /// Handshakes of one backend id (`lb_common::handshake`), summed over
    /// CPUs, for passive health.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] if the id is out of range.
    pub fn handshakes(&self, backend_id: u32) -> Result<Handshakes, DataplaneError> {
        let values = self.handshakes.get(&backend_id, 0).map_err(|source| DataplaneError::Map {
            name: map_names::HANDSHAKES,
            op: "read",
            source,
        })?;
        let mut total = Handshakes::default();
        for value in values.iter() {
            total.merge(value);
        }
        Ok(total)
    }

    /// Packets per verdict reason (`lb_common::stats::reason`), summed over CPUs.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] on a failed read.
    pub fn verdicts(&self) -> Result<[u64; reason::COUNT as usize], DataplaneError> {
        sum_per_cpu(&self.verdicts, map_names::VERDICTS)
    }

    /// Which protocols have a VIP on an address (`VIP_ADDR_*` bits); 0 for none.
    pub fn vip_addr_protos(&self, key: &VipAddrKey) -> u32 {
        self.vip_addrs.get(key, 0).map_or(0, |info| info.protos)
    }

    /// Connection-table events (`lb_common::stats::conntrack_event`), summed
    /// over CPUs.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] on a failed read.
    pub fn conntrack_events(&self) -> Result<[u64; conntrack_event::COUNT as usize], DataplaneError> {
        sum_per_cpu(&self.conntrack_events, map_names::CONNTRACK_EVENTS)
    }

    /// Occupancy and lifecycle counts of the connection table. The entry
    /// count is the last one taken (see [`Occupancy`]); when it is older
    /// than [`OCCUPANCY_MAX_AGE`] a new one starts in the background. Only
    /// the first call counts on the caller's thread.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] on a failed read.
    pub fn conntrack(&self) -> Result<ConntrackStats, DataplaneError> {
        let events = self.conntrack_events()?;
        let inserted = events[conntrack_event::INSERTED as usize];
        let (walked, inserted_then, evicted) = self.occupancy(inserted)?;
        let counted_ago =
            self.occupancy.lock().ok().and_then(|o| o.last).map_or(Duration::ZERO, |(at, _, _)| at.elapsed());
        let capacity = u64::from(self.conntrack_capacity);
        // A walk during heavy churn can count an entry twice (get_next_key
        // starts over when the key it stood on was evicted), and inserts
        // beyond the capacity evicted as many: never more than the table holds.
        let entries = walked.saturating_add(inserted.saturating_sub(inserted_then)).min(capacity);
        // Keys inserted that are not present were evicted; a counter never
        // goes down, so the estimate only rises.
        let evicted = evicted.max(inserted.saturating_sub(entries));
        if let Ok(mut occupancy) = self.occupancy.lock() {
            occupancy.evicted = occupancy.evicted.max(evicted);
        }
        Ok(ConntrackStats { entries, capacity, events, evicted, counted_ago })
    }

    /// The backend a tracked client → VIP flow is pinned to, if tracked.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        self.conntrack.get(key, 0).ok()
    }

    /// The last count of entries, the insert count when it began, and the
    /// eviction estimate, starting a new count if it is stale; `inserted` is
    /// the insert count now.
    fn occupancy(&self, inserted: u64) -> Result<(u64, u64, u64), DataplaneError> {
        let mut occupancy = self.occupancy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((at, entries, inserted_then)) = occupancy.last else {
            let began = Instant::now();
            occupancy.record(inserted, began, walk(&self.conntrack));
            let (entries, inserted_then) = occupancy.last.map_or((0, inserted), |l| (l.1, l.2));
            return Ok((entries, inserted_then, occupancy.evicted));
        };
        if at.elapsed() >= occupancy.max_age && !occupancy.walking {
            let handle = self.conntrack_handle()?;
            occupancy.walking = true;
            let shared = Arc::clone(&self.occupancy);
            std::thread::spawn(move || {
                let began = Instant::now();
                let found = walk(&handle);
                let mut occupancy = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                occupancy.record(inserted, began, found);
                occupancy.walking = false;
            });
        }
        Ok((entries, inserted_then, occupancy.evicted))
    }

    /// Live flows pinned to `backend_id`, as of the last count of the
    /// connection table (see [`Maps::conntrack`], which starts counts).
    pub fn live_flows(&self, backend_id: u32) -> u64 {
        let occupancy = self.occupancy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        occupancy.flows.get(&backend_id).copied().unwrap_or(0)
    }

    /// Lets tests see the background count without waiting
    /// [`OCCUPANCY_MAX_AGE`].
    pub fn set_occupancy_max_age(&mut self, max_age: Duration) {
        self.occupancy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).max_age = max_age;
    }

    /// A second handle on `CONNTRACK`, for a walk on another thread.
    fn conntrack_handle(&self) -> Result<HashMap<MapData, FlowKey, FlowState>, DataplaneError> {
        let error = |source| DataplaneError::Map { name: map_names::CONNTRACK, op: "open a second handle", source };
        let fd =
            self.conntrack.map().fd().as_fd().try_clone_to_owned().map_err(|e| error(aya::maps::MapError::from(e)))?;
        let data = MapData::from_fd(fd).map_err(error)?;
        HashMap::try_from(Map::LruHashMap(data)).map_err(error)
    }

    /// Tracked flows, counted by walking the table now: O(entries) syscalls,
    /// so for tests and tools; status pages use [`Maps::conntrack`].
    pub fn tracked_flows(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// Writes a connection-table entry, as the program would: for tests and
    /// tools (e.g. a flow made to look idle).
    ///
    /// # Errors
    /// [`DataplaneError::Map`] on a failed write.
    pub fn set_flow(&mut self, key: &FlowKey, state: FlowState) -> Result<(), DataplaneError> {
        self.conntrack.insert(key, state, 0).map_err(|source| DataplaneError::Map {
            name: map_names::CONNTRACK,
            op: "insert",
            source,
        })
    }

    /// Removes a connection-table entry, as an LRU eviction would: for tests
    /// and tools. Removing one that is absent is not an error.
    pub fn remove_flow(&mut self, key: &FlowKey) {
        let _ = self.conntrack.remove(key);
    }

    /// Opening packets refused per limit (`client_limits::limit`) of VIP
    /// `vip_id`, summed over CPUs.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] on a failed read.
    pub fn limited(&self, vip_id: u32) -> Result<[u64; limit::COUNT as usize], DataplaneError> {
        let mut out = [0; limit::COUNT as usize];
        for (kind, slot) in (0..limit::COUNT).zip(out.iter_mut()) {
            let index = vip_id * limit::COUNT + kind;
            let values = self.limited.get(&index, 0).map_err(|source| DataplaneError::Map {
                name: map_names::LIMITED,
                op: "read",
                source,
            })?;
            *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }

    /// A client's bucket and flow count as the data path keeps them.
    pub fn client(&self, key: &ClientKey) -> Option<ClientState> {
        self.clients.get(key, 0).ok()
    }

    /// Recounts the flows of every client of the VIPs in `prefixes` (VIP id
    /// → its `per` prefix length) from the connection table, and writes the
    /// counts the data path keeps (`CLIENTS`): flows that ended without a
    /// FIN or RST (idle timeout, eviction) are not counted down there. A
    /// flow opened during the walk may be missed, for one recount.
    /// Returns the clients written.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] on a failed write.
    pub fn recount_clients(
        &mut self,
        prefixes: &std::collections::HashMap<u32, u8>,
        now_ns: u64,
    ) -> Result<usize, DataplaneError> {
        let mut counts: std::collections::HashMap<ClientKey, u32> = std::collections::HashMap::new();
        for (key, state) in self.conntrack.iter().filter_map(Result::ok) {
            let Some(&prefix_len) = prefixes.get(&state.vip_id) else { continue };
            let open = state.flags & (FLOW_F_COUNTED | FLOW_F_CLOSING) == FLOW_F_COUNTED;
            if open && !lb_common::timeouts::is_expired(&state, key.proto, now_ns) {
                let client = ClientKey { addr_be: masked(&key.src_be, prefix_len), vip_id: state.vip_id };
                *counts.entry(client).or_default() += 1;
            }
        }
        let clients: Vec<ClientKey> =
            self.clients.keys().filter_map(Result::ok).filter(|k| prefixes.contains_key(&k.vip_id)).collect();
        let mut written = 0;
        for key in clients {
            let Ok(mut state) = self.clients.get(&key, 0) else { continue };
            let count = counts.get(&key).copied().unwrap_or(0);
            if state.connections != count {
                state.connections = count;
                // BPF_EXIST: a client evicted meanwhile stays evicted.
                if self.clients.insert(key, state, BPF_EXIST).is_ok() {
                    written += 1;
                }
            }
        }
        Ok(written)
    }

    /// Backend id in one Maglev array slot.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] if the index is out of range.
    pub fn ring_slot(&self, index: u32) -> Result<u32, DataplaneError> {
        self.maglev.get(&index, 0).map_err(|source| DataplaneError::Map { name: map_names::MAGLEV, op: "read", source })
    }
}

impl Maps {
    /// What pinned maps hold, for [`crate::control::balancer::Balancer::adopt`]:
    /// every `VIPS` entry with its live ring (`ring_size` slots), every used
    /// `BACKENDS` entry, every service entry. One syscall per entry or slot.
    ///
    /// # Errors
    ///
    /// [`DataplaneError::Map`] on a failed read.
    pub fn read_pinned(&self, ring_size: u32) -> Result<PinnedState, DataplaneError> {
        let read = |name: &'static str| move |source| DataplaneError::Map { name, op: "read", source };
        let mut state = PinnedState::default();
        for entry in self.vips.iter() {
            let (key, info) = entry.map_err(read(map_names::VIPS))?;
            let base = ring_base(info.vip_id, info.ring_generation & 1, ring_size);
            let ring = (base..base.saturating_add(ring_size))
                .map(|index| self.maglev.get(&index, 0))
                .collect::<Result<Vec<u32>, _>>()
                .map_err(read(map_names::MAGLEV))?;
            state.vips.push(PinnedVip { key, info, ring });
        }
        for (backend_id, info) in (0u32..).zip(self.backends.iter()) {
            let info = info.map_err(read(map_names::BACKENDS))?;
            if backend_id != BACKEND_ID_NONE && info.state != BACKEND_STATE_UNUSED {
                state.backends.insert(backend_id, info);
            }
        }
        for entry in self.backend_services.iter() {
            let (key, nat) = entry.map_err(read(map_names::BACKEND_SERVICES))?;
            let list = self.shared_services.get(&key, 0).ok();
            state.services.push((key, nat, list));
        }
        Ok(state)
    }
}

/// Every slot of a per-CPU array of counts, summed over CPUs.
fn sum_per_cpu<const N: usize>(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
) -> Result<[u64; N], DataplaneError> {
    let mut out = [0u64; N];
    for (index, slot) in (0u32..).zip(out.iter_mut()) {
        let values = map.get(&index, 0).map_err(|source| DataplaneError::Map { name, op: "read", source })?;
        *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
    }
    Ok(out)
}

fn sum_counters(
    map: &PerCpuArray<MapData, Counters>,
    name: &'static str,
    index: u32,
) -> Result<Counters, DataplaneError> {
    let values = map.get(&index, 0).map_err(|source| DataplaneError::Map { name, op: "read", source })?;
    let mut total = Counters::default();
    for value in values.iter() {
        total.merge(value);
    }
    Ok(total)
}

impl Dataplane for Maps {
    fn upsert_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DataplaneError> {
        self.vips.insert(key, info, 0).map_err(|source| DataplaneError::Map {
            name: map_names::VIPS,
            op: "insert",
            source,
        })
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.vips.remove(key).map_err(|source| DataplaneError::Map { name: map_names::VIPS, op: "remove", source })
    }

    fn set_addr_filter(&mut self, slot: u32) -> Result<(), DataplaneError> {
        self.addr_filter.set(slot, 1, 0).map_err(|source| DataplaneError::Map {
            name: map_names::ADDR_FILTER,
            op: "write",
            source,
        })
    }

    fn set_vip_addr(&mut self, key: VipAddrKey, protos: u32) -> Result<(), DataplaneError> {
        let result = if protos != 0 {
            self.vip_addrs.insert(key, VipAddrInfo { protos }, 0)
        } else if self.vip_addr_protos(&key) != 0 {
            self.vip_addrs.remove(&key)
        } else {
            // No entry to remove: removing it again after a failed write is no error.
            Ok(())
        };
        result.map_err(|source| DataplaneError::Map { name: map_names::VIP_ADDRS, op: "write", source })
    }

    fn set_backend(&mut self, backend_id: u32, info: BackendInfo) -> Result<(), DataplaneError> {
        self.backends.set(backend_id, info, 0).map_err(|source| DataplaneError::Map {
            name: map_names::BACKENDS,
            op: "write",
            source,
        })
    }

    fn write_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), DataplaneError> {
        for &(index, backend_id) in slots {
            self.maglev.set(index, backend_id, 0).map_err(|source| DataplaneError::Map {
                name: map_names::MAGLEV,
                op: "write",
                source,
            })?;
        }
        Ok(())
    }

    fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError> {
        // Refusals by its limits: a counter of the new VIP starts at 0.
        let error = |source| DataplaneError::Map { name: map_names::LIMITED, op: "reset", source };
        for kind in 0..limit::COUNT {
            let index = vip_id * limit::COUNT + kind;
            // One value per possible CPU, which is what a read returns.
            let cpus = self.limited.get(&index, 0).map_err(error)?.len();
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| error(MapError::from(e)))?;
            self.limited.set(index, zeros, 0).map_err(error)?;
        }
        Ok(())
    }

    fn set_addr_roles(&mut self, key: VipAddrKey, roles: u32) -> Result<(), DataplaneError> {
        let result = if roles != 0 {
            self.addr_roles.insert(key, AddrRoles { roles }, 0)
        } else {
            match self.addr_roles.remove(&key) {
                // No entry to remove: removing it again after a failed write is no error.
                Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                other => other,
            }
        };
        result.map_err(|source| DataplaneError::Map { name: map_names::ADDR_ROLES, op: "write", source })
    }

    fn set_backend_service(&mut self, key: ServiceKey, nat: ReplyNat) -> Result<(), DataplaneError> {
        self.backend_services.insert(key, nat, 0).map_err(|source| DataplaneError::Map {
            name: map_names::BACKEND_SERVICES,
            op: "write",
            source,
        })
    }

    fn set_shared_service(&mut self, key: ServiceKey, list: SharedService) -> Result<(), DataplaneError> {
        self.shared_services.insert(key, list, 0).map_err(|source| DataplaneError::Map {
            name: map_names::SHARED_SERVICES,
            op: "write",
            source,
        })?;
        Ok(())
    }

    fn set_vip_timeouts(&mut self, vip_id: u32, timeouts: FlowTimeouts) -> Result<(), DataplaneError> {
        self.vip_timeouts.set(vip_id, timeouts, 0).map_err(|source| DataplaneError::Map {
            name: map_names::VIP_TIMEOUTS,
            op: "write",
            source,
        })
    }

    fn set_vip_limits(&mut self, vip_id: u32, limits: VipLimits) -> Result<(), DataplaneError> {
        self.vip_limits.set(vip_id, limits, 0).map_err(|source| DataplaneError::Map {
            name: map_names::VIP_LIMITS,
            op: "write",
            source,
        })
    }

    fn set_limit_allow(&mut self, vip_id: u32, cidr: Cidr, allowed: bool) -> Result<(), DataplaneError> {
        let key =
            Key::new(32 + u32::from(cidr.prefix_len), AllowKey { vip_id, addr_be: lb_common::addr::words(cidr.addr) });
        let result = if allowed {
            self.limit_allow.insert(&key, 1, 0)
        } else {
            match self.limit_allow.remove(&key) {
                // Not there: removing it again after a failed write is no error.
                Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                other => other,
            }
        };
        result.map_err(|source| DataplaneError::Map { name: map_names::LIMIT_ALLOW, op: "write", source })
    }
}
