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

#[cfg(test)]
extern crate std;

#[cfg(feature = "user")]
pub mod addr;
pub mod addr_filter;
pub mod backend;
pub mod client_limits;
pub mod csum;
pub mod embryo;
pub mod flow;
pub mod frag;
pub mod guard;
pub mod handshake;
pub mod layout;
pub mod limits;
pub mod sched;
pub mod stats;
pub mod tcp;
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

/// Names of the maps: each const is the name of a `#[map]` static of the
/// program (`lb-ebpf/src/`), spelled once: its value is its own name, and a
/// test checks that the program declares exactly [`ALL`](map_names::ALL).
pub mod map_names {
    /// Declares each name as a const whose value is its identifier, and `ALL`.
    macro_rules! map_names {
        ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
            $($(#[doc = $doc])+ pub const $name: &str = stringify!($name);)+

            /// Every map the program declares.
            pub const ALL: &[&str] = &[$($name),+];
        };
    }

    map_names! {
        /// VIPs (`VipKey` → `VipInfo`); the agent writes it.
        VIPS,
        /// Protocols with a VIP per address (`VipAddrKey` → `VipAddrInfo`); the agent writes it.
        VIP_ADDRS,
        /// Backends by id (`BackendInfo`); the agent writes it.
        BACKENDS,
        /// The Maglev rings, two per VIP (slot → backend id); the agent writes it.
        MAGLEV,
        /// Client → VIP flows (`FlowKey` → `FlowState`); the program writes it.
        CONNTRACK,
        /// Traffic per backend id (`Counters`, per CPU); the program writes it.
        BACKEND_STATS,
        /// Packets per verdict reason (per CPU); the program writes it.
        VERDICTS,
        /// Connection-table events (per CPU); the program writes it.
        CONNTRACK_EVENTS,
        /// Fragmented datagrams (`FragKey` → `FragState`); the program writes it.
        FRAGS,
        /// The address filter (slot → set); the agent writes it.
        ADDR_FILTER,
        /// Next hops per destination (per CPU); the program's own cache.
        NEXT_HOPS,
        /// Address roles (`VipAddrKey` → `AddrRoles`); the agent writes it.
        ADDR_ROLES,
        /// Backends' services (`ServiceKey` → `ReplyNat`); the agent writes it.
        BACKEND_SERVICES,
        /// The VIPs of services several share (`ServiceKey` → `SharedService`); the agent writes it.
        SHARED_SERVICES,
        /// Flows straight to a backend's service (`FlowKey` → `DirectFlow`); the program writes it.
        DIRECT_FLOWS,
        /// Token buckets of the gateway's own answers (per CPU); the program's own.
        REPLY_BUCKETS,
        /// The forward stage's plan (per CPU); the program's own scratch.
        FORWARD_PLAN,
        /// The next-hop lookup's scratch (per CPU); the program's own.
        NEXT_HOP_SCRATCH,
        /// When a direct flow to each backend id last passed; the program's own.
        DIRECT_SEEN,
        /// TCP SYNs seen, by a hash of their 5-tuple; the program's own.
        EMBRYOS,
        /// The fast path's next hops by backend id (per CPU); the program's own.
        HOPS_BY_BACKEND,
        /// The fast path's next hops of clients (per CPU); the program's own.
        HOPS_BY_CLIENT,
        /// Per-client limits by VIP id (`VipLimits`); the agent writes it.
        VIP_LIMITS,
        /// Clients' buckets and flow counts (`ClientKey` → `ClientState`); the
        /// program writes it, and the agent corrects the counts.
        CLIENTS,
        /// Clients exempt from their VIP's limits (LPM, `AllowKey`); the agent writes it.
        LIMIT_ALLOW,
        /// Opening packets refused per VIP and limit (per CPU); the program writes it.
        LIMITED,
        /// Idle timeouts by VIP id (`FlowTimeouts`); the agent writes it.
        VIP_TIMEOUTS,
        /// Handshakes per backend id (`Handshakes`, per CPU), for passive
        /// health; the program writes it.
        HANDSHAKES,
    }
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

#[cfg(test)]
mod tests {
    use std::{fs, path::Path, string::String, vec::Vec};

    use super::map_names;

    /// The `#[map]` statics of the program, from its sources.
    fn declared_maps(dir: &Path, found: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                declared_maps(&path, found);
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut lines = text.lines().map(str::trim);
            while let Some(line) = lines.next() {
                if !line.starts_with("#[map") {
                    continue;
                }
                let item = lines.find(|l| !l.starts_with("#[")).unwrap_or_default();
                let name = item.trim_start_matches("pub ").trim_start_matches("static ").split(':').next();
                found.push(name.unwrap_or_default().into());
            }
        }
    }

    #[test]
    fn the_program_declares_exactly_the_named_maps() {
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf/src");
        let mut declared = Vec::new();
        declared_maps(&sources, &mut declared);
        declared.sort();
        let mut named: Vec<String> = map_names::ALL.iter().map(|&n| n.into()).collect();
        named.sort();
        assert_eq!(declared, named, "lb-ebpf's #[map] statics and lb_common::map_names differ");
    }
}
