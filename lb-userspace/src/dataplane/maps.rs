//! Typed wrappers over the program's maps.
//! (aya handles LRU hash maps with its plain `HashMap` type.)

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
};
use lb_common::{
    backend::BackendInfo,
    flow::{FlowKey, FlowState, ReplyNat},
    map_names,
    stats::{Counters, reason},
    vip::{VipInfo, VipKey},
};

use super::DataplaneError;
use crate::lb::dataplane::Dataplane;

/// The program's maps, taken out of the loaded object.
pub struct Maps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    backends: Array<MapData, BackendInfo>,
    maglev: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, FlowState>,
    reply_nat: HashMap<MapData, FlowKey, ReplyNat>,
    vip_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    verdicts: PerCpuArray<MapData, u64>,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataplaneError> {
    ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name })
}

/// Converts an untyped map, checking key and value sizes against lb-common.
macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?
            .try_into()
            .map_err(|source| DataplaneError::Map { name: $name, op: "open", source })?
    };
}

impl Maps {
    pub(super) fn take_from(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            vips: typed!(ebpf, map_names::VIPS),
            backends: typed!(ebpf, map_names::BACKENDS),
            maglev: typed!(ebpf, map_names::MAGLEV),
            conntrack: typed!(ebpf, map_names::CONNTRACK),
            reply_nat: typed!(ebpf, map_names::REPLY_NAT),
            vip_stats: typed!(ebpf, map_names::VIP_STATS),
            backend_stats: typed!(ebpf, map_names::BACKEND_STATS),
            verdicts: typed!(ebpf, map_names::VERDICTS),
        })
    }

    /// Traffic of one VIP, summed over CPUs.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] if the id is out of range.
    pub fn vip_counters(&self, vip_id: u32) -> Result<Counters, DataplaneError> {
        sum_counters(&self.vip_stats, map_names::VIP_STATS, vip_id)
    }

    /// Traffic of one backend id, summed over CPUs.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] if the id is out of range.
    pub fn backend_counters(&self, backend_id: u32) -> Result<Counters, DataplaneError> {
        sum_counters(&self.backend_stats, map_names::BACKEND_STATS, backend_id)
    }

    /// Packets per verdict reason (`lb_common::stats::reason`), summed over CPUs.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] on a failed read.
    pub fn verdicts(&self) -> Result<[u64; reason::COUNT as usize], DataplaneError> {
        let mut out = [0u64; reason::COUNT as usize];
        for (index, slot) in (0u32..).zip(out.iter_mut()) {
            let values = self.verdicts.get(&index, 0).map_err(|source| DataplaneError::Map {
                name: map_names::VERDICTS,
                op: "read",
                source,
            })?;
            *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }

    /// The backend a tracked client → VIP flow is pinned to, if tracked.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        self.conntrack.get(key, 0).ok()
    }

    /// The reply translation of a tracked backend → client tuple, if tracked.
    pub fn reply_nat(&self, key: &FlowKey) -> Option<ReplyNat> {
        self.reply_nat.get(key, 0).ok()
    }

    /// Tracked flows, counted by walking the table: O(capacity), so only for
    /// status pages and tests, not per packet or per scrape.
    pub fn tracked_flows(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// Backend id in one Maglev array slot.
    ///
    /// # Errors
    /// [`DataplaneError::Map`] if the index is out of range.
    pub fn ring_slot(&self, index: u32) -> Result<u32, DataplaneError> {
        self.maglev
            .get(&index, 0)
            .map_err(|source| DataplaneError::Map { name: map_names::MAGLEV, op: "read", source })
    }
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
    fn upsert_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), crate::lb::dataplane::DataplaneError> {
        self.vips
            .insert(key, info, 0)
            .map_err(|source| DataplaneError::Map { name: map_names::VIPS, op: "insert", source })?;
        Ok(())
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<(), crate::lb::dataplane::DataplaneError> {
        self.vips
            .remove(key)
            .map_err(|source| DataplaneError::Map { name: map_names::VIPS, op: "remove", source })?;
        Ok(())
    }

    fn set_backend(&mut self, backend_id: u32, info: BackendInfo) -> Result<(), crate::lb::dataplane::DataplaneError> {
        self.backends
            .set(backend_id, info, 0)
            .map_err(|source| DataplaneError::Map { name: map_names::BACKENDS, op: "write", source })?;
        Ok(())
    }

    fn write_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), crate::lb::dataplane::DataplaneError> {
        for &(index, backend_id) in slots {
            self.maglev
                .set(index, backend_id, 0)
                .map_err(|source| DataplaneError::Map { name: map_names::MAGLEV, op: "write", source })?;
        }
        Ok(())
    }
}
