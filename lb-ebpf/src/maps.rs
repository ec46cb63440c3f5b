//! Every map the program uses: key → value, and who writes it.
//!
//! Capacities come from `lb_common::limits`; the agent resizes `MAGLEV`,
//! `CONNTRACK` and `REPLY_NAT` from its config before loading.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    backend::BackendInfo,
    flow::{FlowKey, FlowState, ReplyNat},
    limits::{DEFAULT_CONNTRACK_CAPACITY, MAX_BACKENDS, MAX_VIPS},
    stats::{Counters, reason},
    vip::{VipInfo, VipKey},
};

/// VipKey → VipInfo. Written by the agent.
#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// backend id → BackendInfo. Written by the agent (address, health).
#[map]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev slots, two rings per VIP (see `VipInfo::ring_base`) → backend id.
/// Written by the agent; sized by it at load time.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// Client → VIP 5-tuple → the flow's backend. Written here on a flow's first
/// packet (and when its backend goes down); LRU, so idle flows age out.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// Backend → client 5-tuple → the VIP the reply must come from. Written here
/// together with `CONNTRACK`.
#[map]
pub static REPLY_NAT: LruHashMap<FlowKey, ReplyNat> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// VIP id → traffic counters, per CPU. Written here; summed by the agent.
#[map]
pub static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_VIPS + 1, 0);

/// Backend id → traffic counters, per CPU. Written here; summed by the agent.
#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Verdict reason (`lb_common::stats::reason`) → packets, per CPU.
#[map]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);
