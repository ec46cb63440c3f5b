//! The connection table: which backend each flow is pinned to, and how its
//! replies are translated back.

use bytemuck::{Pod, Zeroable};

/// A flow's 5-tuple as one direction of a packet names it.
///
/// Key of `CONNTRACK` (client → VIP direction) and of `DIRECT_FLOWS`
/// (backend → client direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// Source address, network byte order; IPv4 uses word 0 only.
    pub src_be: [u32; 4],
    /// Destination address, network byte order; IPv4 uses word 0 only.
    pub dst_be: [u32; 4],
    /// Source port, network byte order.
    pub src_port_be: u16,
    /// Destination port, network byte order.
    pub dst_port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of `CONNTRACK`: the backend a client → VIP flow is pinned to, and
/// how long it has been idle (see `crate::timeouts` for the lifecycle).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowState {
    /// Backend id; an index into `BACKENDS`.
    pub backend_id: u32,
    /// VIP id; an index into `VIP_LIMITS` and `VIP_TIMEOUTS`.
    pub vip_id: u32,
    /// When a packet of the flow, either direction, was last seen:
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE), refreshed at most once per
    /// `timeouts::TOUCH_INTERVAL_NS`.
    pub last_seen_ns: u64,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    /// Its VIP's idle timeouts when it was pinned, in seconds (0: the
    /// protocol's default; see `crate::timeouts`).
    pub timeouts: FlowTimeouts,
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 24);

/// A VIP's connection-table idle timeouts (`[vip.timeouts]`), in seconds;
/// 0 means the protocol's default. The value of `VIP_TIMEOUTS` (by VIP id),
/// copied into each flow's entry when it is pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowTimeouts {
    /// An established TCP flow, or a UDP flow.
    pub idle_secs: u16,
    /// A TCP flow after a FIN or RST.
    pub closing_secs: u16,
}
const _: () = assert!(core::mem::size_of::<FlowTimeouts>() == 4);

/// A TCP FIN or RST was seen, either direction: the flow is ending, so it
/// expires after `timeouts::TCP_CLOSING_NS` idle, and a new SYN on its
/// 5-tuple starts a new flow at once.
pub const FLOW_F_CLOSING: u32 = 1 << 0;
/// The flow's backend serves several VIPs on its address, port and
/// protocol: its replies find their VIP by the flow's entry, so every
/// packet refreshes `last_seen_ns` (the most recent flow of a client's
/// 5-tuple wins), not once per touch interval.
pub const FLOW_F_SHARED: u32 = 1 << 1;
/// The flow counts toward its client's concurrent flows (its VIP has
/// per-client limits, `crate::client_limits`): its first FIN or RST takes
/// it off the count.
pub const FLOW_F_COUNTED: u32 = 1 << 2;

/// What a reply's source is rewritten to: the value of `BACKEND_SERVICES`
/// (and the entries of `SHARED_SERVICES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ReplyNat {
    /// VIP address, network byte order; IPv4 uses word 0 only.
    pub vip_addr_be: [u32; 4],
    /// VIP port, network byte order.
    pub vip_port_be: u16,
    /// `SERVICE_F_*` bits.
    pub flags: u16,
    /// VIP id, for counting reply traffic.
    pub vip_id: u32,
    /// Backend id, for counting reply traffic.
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<ReplyNat>() == 28);

/// The backend's service is shared by several VIPs: `SHARED_SERVICES` lists
/// them, and the other fields name only the first.
pub const SERVICE_F_SHARED: u16 = 1 << 0;

impl FlowKey {
    /// The 5-tuple of the other direction: what a reply carries.
    #[inline(always)]
    #[must_use]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src_be: self.dst_be,
            dst_be: self.src_be,
            src_port_be: self.dst_port_be,
            dst_port_be: self.src_port_be,
            ..*self
        }
    }
}

#[cfg(feature = "user")]
impl FlowKey {
    /// The key of a packet from `src` to `dst` of IP protocol `proto`; both
    /// addresses of one family (the family is `src`'s).
    #[must_use]
    pub fn new(src: core::net::SocketAddr, dst: core::net::SocketAddr, proto: u8) -> Self {
        FlowKey {
            src_be: crate::addr::words(src.ip()),
            dst_be: crate::addr::words(dst.ip()),
            src_port_be: src.port().to_be(),
            dst_port_be: dst.port().to_be(),
            proto,
            family: crate::addr::family(src.ip()),
            _pad: [0; 2],
        }
    }
}

#[cfg(feature = "user")]
impl ReplyNat {
    /// A reply translation to the address and port of VIP `vip` (id
    /// `vip_id`), counted under `backend_id`.
    #[must_use]
    pub fn new(vip: &crate::vip::VipKey, vip_id: u32, backend_id: u32) -> Self {
        ReplyNat { vip_addr_be: vip.addr_be, vip_port_be: vip.port_be, flags: 0, vip_id, backend_id }
    }
}

crate::user_pod!(FlowKey, FlowState, FlowTimeouts, ReplyNat);

/// The flow hash that picks a Maglev slot: `flow_hash(key) % ring_size`.
///
/// Shared so the agent and the tests can predict the kernel's choice. It is
/// murmur3's finaliser over the 5-tuple words: cheap on eBPF (no loops the
/// verifier must bound) and well mixed in the low bits the modulo keeps.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    seeded_flow_hash(key, 0x9e37_79b9)
}

/// [`flow_hash`] from another seed: a hash of the 5-tuple whose bits are
/// independent of `flow_hash`'s (e.g. a tag to tell apart the 5-tuples that
/// share a slot chosen by `flow_hash`).
#[inline(always)]
pub fn seeded_flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let ports = (u32::from(key.src_port_be) << 16) | u32::from(key.dst_port_be);
    let mut h: u32 = seed ^ u32::from(key.proto);
    h = mix(h, key.src_be[0]);
    h = mix(h, key.src_be[1]);
    h = mix(h, key.src_be[2]);
    h = mix(h, key.src_be[3]);
    h = mix(h, key.dst_be[0]);
    h = mix(h, key.dst_be[1]);
    h = mix(h, key.dst_be[2]);
    h = mix(h, key.dst_be[3]);
    h = mix(h, ports);
    fmix32(h)
}

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
