//! Capacities and defaults, in one place so both sides size maps alike.

/// Entries in the VIP map: the most virtual services one gateway serves.
pub const MAX_VIPS: u32 = 1024;

/// Entries in the backend array, counting one per (VIP, backend) pair, plus
/// slot 0, which is never allocated so a zeroed Maglev slot can never route:
/// 8191 backends. Ids are not reused while the agent runs, so the headroom
/// over the 4096 a config may reasonably hold also serves reloads that add
/// backends. 20 bytes each (and 32 per CPU of counters).
pub const MAX_BACKENDS: u32 = 8192;

/// Default Maglev ring size per VIP, in slots. Must be prime; 65537 keeps the
/// imbalance between equal backends under 1% for up to a few hundred backends.
pub const DEFAULT_RING_SIZE: u32 = 65537;

/// Each VIP owns two rings in the Maglev array: the one packets read and the
/// one the agent rewrites, switched by one write of `VipInfo::ring_generation`.
pub const RINGS_PER_VIP: u32 = 2;

/// Default capacity of the connection table, in flows (one `CONNTRACK`
/// entry each; replies need no state of their own).
pub const DEFAULT_CONNTRACK_CAPACITY: u32 = 1 << 20;

/// Most entries the Maglev array may have (`vip_slots * RINGS_PER_VIP *
/// ring_size`), 4 bytes each: 1 GiB, far above any sane configuration.
pub const MAX_MAGLEV_ENTRIES: u64 = 1 << 28;

/// Answers the gateway sends on its own when a VIP has no backend up (TCP
/// RSTs and ICMP port unreachables) refill their token bucket, per CPU, at
/// this many answers per second...
pub const REPLY_RATE_PER_SEC: u64 = 100;
/// ...and hold at most this many, so a burst after a quiet spell may reach
/// it. Over the limit the packet is dropped and counted.
pub const REPLY_BURST: u64 = 100;

/// The gateway's own answers, by kind: each kind has its own token bucket
/// per CPU (`REPLY_BUCKETS`), so one kind can never use up another's budget
/// (a ping flood must not starve path-MTU discovery). ("Answers": what the
/// gateway builds itself; a "reply" is a backend's packet, translated on its
/// way back. The `REPLY_*` names here predate that split.)
pub mod reply_bucket {
    /// RST or ICMP port unreachable from a VIP with no backend up.
    pub const NO_BACKEND: u32 = 0;
    /// RST or ICMP port unreachable from a VIP address, to a port or
    /// protocol no VIP of that address serves.
    pub const NO_SERVICE: u32 = 1;
    /// ICMP echo replies for VIP addresses.
    pub const ECHO: u32 = 2;
    /// ICMP fragmentation needed / packet too big for packets of balanced
    /// flows. Over its limit the packet goes to the kernel (which has its
    /// own ICMP rate limits), never silently dropped.
    pub const FRAG_NEEDED: u32 = 3;
    /// RST or ICMP port unreachable to a client over a per-client limit of
    /// a VIP whose limits answer (`crate::client_limits`).
    pub const LIMITED: u32 = 4;
    /// Number of buckets; the size of `REPLY_BUCKETS`.
    pub const COUNT: u32 = 5;
    /// Refill rate of each bucket, in answers per second, by kind.
    pub const RATE_PER_SEC: [u64; COUNT as usize] = [super::REPLY_RATE_PER_SEC, 100, 100, 1000, 1000];
    /// Most answers each bucket holds, by kind.
    pub const BURST: [u64; COUNT as usize] = [super::REPLY_BURST, 100, 100, 1000, 1000];
}

/// Fragmented datagrams tracked at once (`FRAGS`, 80 bytes an entry plus the
/// kernel's overhead): their first pieces balanced, their later pieces still
/// to come. LRU, so a burst of fragments only ages out old datagrams.
pub const FRAG_TRACK_CAPACITY: u32 = 16384;

/// Destinations whose next hop each CPU caches (`NEXT_HOPS`, per-CPU LRU,
/// about 80 bytes an entry per CPU): backends and the clients' next hops.
pub const NEXT_HOP_CAPACITY: u32 = 65536;
/// Entries in `ADDR_ROLES`: every backend address, plus the gateway's own
/// addresses (up to 1024).
pub const ADDR_ROLES_CAPACITY: u32 = MAX_BACKENDS + 1024;
/// Entries in `BACKEND_SERVICES`: one per backend address, port and
/// protocol, which a backend id never outnumbers. `SHARED_SERVICES` has as
/// many, for the services several VIPs share.
pub const BACKEND_SERVICES_CAPACITY: u32 = MAX_BACKENDS;
/// Most VIPs one backend service (address, port, protocol) may serve: a
/// shared service's reply tries each one's connection-table entry.
pub const MAX_SHARED_VIPS: u32 = 4;
/// Flows that reach a backend's service directly, not through a VIP, tracked
/// at once (`DIRECT_FLOWS`, LRU, 48 bytes an entry plus the kernel's
/// overhead). Such flows are rare: operators and monitoring, not clients.
pub const DIRECT_FLOW_CAPACITY: u32 = 65536;

/// Slots of the table of TCP SYNs seen (`EMBRYOS`, 8 bytes each: 512 KiB),
/// which a flow's first ACK must find to be tracked (see `crate::embryo`).
/// A SYN flood overwrites slots; it never touches the connection table.
pub const EMBRYO_SLOTS: u32 = 1 << 16;
/// How long a SYN's slot lets its first ACK be tracked, in ns: a handshake
/// that takes longer (SYNs retransmitted for half a minute) is not tracked,
/// and its flow is forwarded by its Maglev slot alone.
pub const EMBRYO_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

/// Slots of the fast path's cache of clients' next hops (`HOPS_BY_CLIENT`,
/// per CPU, about 64 bytes a slot): a slot holds the last client that hashed
/// to it. Clients usually sit behind a few routers, but each address has a
/// slot of its own; a collision only sends a reply through the pipeline.
pub const CLIENT_HOP_SLOTS: u32 = 4096;
/// How long a cached next hop is used before the FIB is asked again, in ns:
/// a route or neighbour change takes at most this long to reach the fast path.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
