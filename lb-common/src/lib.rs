//! Types shared by the XDP program (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy` and `bytemuck::Pod` (which
//! refuses to compile a type with hidden padding), and its size is asserted, so
//! the two sides cannot silently disagree about a layout. Addresses and ports
//! carry their byte order in their names: `_be` fields hold the bytes exactly as
//! they appear on the wire. With the `user` feature, each type also has a
//! constructor from std's address types (see [`addr`] for the encoding), the
//! one place the agent, the tests and the benchmarks build them.
#![no_std]

#[cfg(feature = "user")]
pub mod addr;
pub mod addr_filter;
pub mod backend;
pub mod flow;
pub mod frag;
pub mod guard;
pub mod limits;
pub mod sched;
pub mod stats;
pub mod timeouts;
pub mod vip;
pub mod vip_addr;

/// Address family of a VIP, backend or flow: IPv4.
pub const FAMILY_V4: u8 = 4;
/// Address family of a VIP, backend or flow: IPv6.
pub const FAMILY_V6: u8 = 6;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Names of the maps, shared so the agent finds what the program declares:
/// each const is the symbol name of a map in `lb-ebpf/src/maps.rs`.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const REPLY_NAT: &str = "REPLY_NAT";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const CONNTRACK_EVENTS: &str = "CONNTRACK_EVENTS";
    pub const FRAGS: &str = "FRAGS";
    pub const ADDR_FILTER: &str = "ADDR_FILTER";
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    pub const ADDR_ROLES: &str = "ADDR_ROLES";
    pub const BACKEND_SERVICES: &str = "BACKEND_SERVICES";
    pub const DIRECT_FLOWS: &str = "DIRECT_FLOWS";
    pub const REPLY_BUCKETS: &str = "REPLY_BUCKETS";
}

/// Implements `aya::Pod` for the agent's side only; the kernel side has no aya.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is #[repr(C)] and derives bytemuck::Pod, which proves
            // it has no padding and that every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;
