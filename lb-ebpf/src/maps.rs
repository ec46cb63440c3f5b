//! Every map the program uses: key → value, and who writes it.
//!
//! Capacities come from `lb_common::limits`; the agent resizes `MAGLEV`,
//! `CONNTRACK` from its config before loading.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use lb_common::{
    addr_filter,
    backend::BackendInfo,
    client_limits::{ALLOW_CAPACITY, AllowKey, CLIENT_CAPACITY, ClientKey, ClientState, VipLimits, limit},
    flow::{FlowKey, FlowState, FlowTimeouts, ReplyNat},
    frag::{FragKey, FragState},
    guard::{AddrRoles, DirectFlow, ServiceKey, SharedService},
    handshake::Handshakes,
    limits::{
        ADDR_ROLES_CAPACITY, BACKEND_SERVICES_CAPACITY, CLIENT_HOP_SLOTS, DEFAULT_CONNTRACK_CAPACITY,
        DIRECT_FLOW_CAPACITY, EMBRYO_SLOTS, FRAG_TRACK_CAPACITY, MAX_BACKENDS, MAX_VIPS, NEXT_HOP_CAPACITY,
        reply_bucket,
    },
    stats::{Counters, conntrack_event, reason},
    vip::{VipInfo, VipKey},
    vip_addr::{VipAddrInfo, VipAddrKey},
};

/// `addr_filter::slot(address)` → 1 if some VIP or backend address has
/// that slot (see `lb_common::addr_filter`). Written by the agent.
#[map]
pub static ADDR_FILTER: Array<u8> = Array::with_max_entries(addr_filter::SLOTS, 0);

/// VipKey → VipInfo. Written by the agent.
#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// VipAddrKey → which protocols have a VIP on the address. Written by the
/// agent alongside `VIPS`; read for packets that carry no port (fragments).
#[map]
pub static VIP_ADDRS: HashMap<VipAddrKey, VipAddrInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// backend id → BackendInfo. Written by the agent (address, health).
#[map]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev slots, two rings per VIP (see `VipInfo::ring_base`) → backend id.
/// Written by the agent; sized by it at load time.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// Client → VIP 5-tuple → the flow's backend and when it was last active.
/// Written here on a flow's first packet, when its backend goes down, when it
/// expires (see `lb_common::timeouts`) and about once a second while active;
/// LRU, so flows that never return make room.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_CAPACITY, 0);

/// A fragmented datagram whose first piece was balanced → how its later
/// pieces are rewritten (see `lb_common::frag`). Written here only.
#[map]
pub static FRAGS: LruHashMap<FragKey, FragState> = LruHashMap::with_max_entries(FRAG_TRACK_CAPACITY, 0);

/// Backend id → traffic counters, per CPU. Written here; summed by the agent.
#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Connection-table event (`lb_common::stats::conntrack_event`) → count,
/// per CPU.
#[map]
pub static CONNTRACK_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(conntrack_event::COUNT, 0);

/// Verdict reason (`lb_common::stats::reason`) → packets, per CPU.
#[map]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// The rate limiters of the gateway's own answers, per CPU, one per kind
/// (`lb_common::limits::reply_bucket`): `[credit_ns, last_ns]` of a token
/// bucket (see `answer::allow_reply`). Written here only.
#[map]
pub static REPLY_BUCKETS: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(reply_bucket::COUNT, 0);

/// Address → `ADDR_ROLE_*` bits: the gateway's own addresses and every
/// backend's (see `lb_common::guard`). Written by the agent.
#[map]
pub static ADDR_ROLES: HashMap<VipAddrKey, AddrRoles> = HashMap::with_max_entries(ADDR_ROLES_CAPACITY, 0);

/// A backend's service (address, port, protocol) → the VIP its replies come
/// from, for replies without per-flow state (see `lb_common::guard`).
/// Written by the agent.
#[map]
pub static BACKEND_SERVICES: HashMap<ServiceKey, ReplyNat> = HashMap::with_max_entries(BACKEND_SERVICES_CAPACITY, 0);

/// A backend's service that several VIPs share → those VIPs (see
/// `lb_common::guard`). Written by the agent.
#[map]
pub static SHARED_SERVICES: HashMap<ServiceKey, SharedService> =
    HashMap::with_max_entries(BACKEND_SERVICES_CAPACITY, 0);

/// Backend → client 5-tuple of a flow that reached a backend's service
/// directly, not through a VIP → when its client last sent. Written here
/// only; LRU.
#[map]
pub static DIRECT_FLOWS: LruHashMap<FlowKey, DirectFlow> = LruHashMap::with_max_entries(DIRECT_FLOW_CAPACITY, 0);

/// Key of `NEXT_HOPS`: a destination, as seen from one ingress interface.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHopKey {
    /// Destination address, network byte order; IPv4 in word 0.
    pub dst_be: [u32; 4],
    pub ifindex: u32,
    /// 1 for IPv6: an IPv6 address whose last 96 bits are zero must not
    /// share an entry with the IPv4 address in its first 32.
    pub ipv6: u32,
}

/// Value of `NEXT_HOPS`: what the FIB answered, and when.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHop {
    /// Egress device.
    pub ifindex: u32,
    /// The route's MTU, in bytes.
    pub mtu: u16,
    pub _pad: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// `conntrack::now_ns` when asked.
    pub refreshed_ns: u64,
}

/// Destination and ingress interface → next hop, per CPU (see `nexthop`).
/// Written here only; the agent never reads it.
#[map]
pub static NEXT_HOPS: LruPerCpuHashMap<NextHopKey, NextHop> = LruPerCpuHashMap::with_max_entries(NEXT_HOP_CAPACITY, 0);

/// The scratch slot `nexthop::lookup` talks to its call through, per CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHopScratch {
    pub query: crate::nexthop::Query,
    pub hop: NextHop,
    pub key: NextHopKey,
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
}

/// Backend id → when a direct flow to its service last passed
/// (`conntrack::now_ns`; 0: never). The fast path leaves replies of a backend
/// with a recent one to the pipeline (see `fast`). Written here only.
#[map]
pub static DIRECT_SEEN: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Backend id → the next hop to it, per CPU, as the pipeline last learned
/// it (see `fast`). Written here only.
#[map]
pub static HOPS_BY_BACKEND: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// A client's next hop, cached by the fast path's reply direction.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClientHop {
    /// The client's address (IPv4 in word 0), to tell slots' owners apart.
    pub dst_be: [u32; 4],
    /// 1 for IPv6.
    pub ipv6: u32,
    pub _pad: u32,
    pub hop: NextHop,
}

/// `nexthop::client_slot(client)` → the client's next hop, per CPU, as the
/// pipeline last learned it; a slot holds the last client that hashed to
/// it (see `fast`). Written here only.
#[map]
pub static HOPS_BY_CLIENT: PerCpuArray<ClientHop> = PerCpuArray::with_max_entries(CLIENT_HOP_SLOTS, 0);

/// `lb_common::embryo::slot(5-tuple)` → the last TCP SYN seen with that
/// slot: a tag of its 5-tuple and when (see `lb_common::embryo`). Written
/// here only; a SYN flood overwrites it, never the connection table.
#[map]
pub static EMBRYOS: Array<u64> = Array::with_max_entries(EMBRYO_SLOTS, 0);

/// What the forward stage does with the packet, per CPU (see `forward`).
/// Written here only.
#[map]
pub static FORWARD_PLAN: PerCpuArray<crate::forward::Plan> = PerCpuArray::with_max_entries(1, 0);

/// One `NextHopScratch` per CPU. Written here only.
#[map]
pub static NEXT_HOP_SCRATCH: PerCpuArray<NextHopScratch> = PerCpuArray::with_max_entries(1, 0);

/// VIP id → its per-client limits (`lb_common::client_limits`), read only
/// for VIPs with `VIP_F_LIMITED`. Written by the agent.
#[map]
pub static VIP_LIMITS: Array<VipLimits> = Array::with_max_entries(MAX_VIPS + 1, 0);

/// (VIP id, client) → its bucket and flow count. Written here; the agent
/// corrects the counts (flows that ended without FIN or RST).
#[map]
pub static CLIENTS: LruHashMap<ClientKey, ClientState> = LruHashMap::with_max_entries(CLIENT_CAPACITY, 0);

/// (VIP id, client CIDR) → 1: clients exempt from the VIP's limits.
/// Written by the agent.
#[map]
pub static LIMIT_ALLOW: LpmTrie<AllowKey, u8> = LpmTrie::with_max_entries(ALLOW_CAPACITY, 0);

/// `vip_id * limit::COUNT + limit` → opening packets refused, per CPU.
/// Written here only.
#[map]
pub static LIMITED: PerCpuArray<u64> = PerCpuArray::with_max_entries((MAX_VIPS + 1) * limit::COUNT, 0);

/// VIP id → its idle timeouts (`[vip.timeouts]`), copied into a flow's
/// entry when it is pinned; zero for the defaults. Written by the agent.
#[map]
pub static VIP_TIMEOUTS: Array<FlowTimeouts> = Array::with_max_entries(MAX_VIPS + 1, 0);

/// Backend id → its handshakes (`lb_common::handshake`), per CPU, for
/// passive health. Written here; read by the agent.
#[map]
pub static HANDSHAKES: PerCpuArray<Handshakes> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
