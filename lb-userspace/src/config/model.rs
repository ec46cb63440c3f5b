//! The validated configuration: what the rest of the agent sees.
//!
//! Parsing and validation (`config/mod.rs`, `config/table.rs` and
//! `config/parse.rs`) turn a TOML file into these types; nothing else constructs them from user input,
//! so a `Config` in hand is known to be valid.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// The whole agent configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where it was read from, for error messages and reloads.
    pub source: PathBuf,
    pub agent: AgentConfig,
    /// `[announce]`: announcing VIP addresses to routers, if set.
    pub announce: Option<AnnounceConfig>,
    /// Virtual services, in file order.
    pub vips: Vec<VipConfig>,
}

/// `[agent]`: how the agent attaches and serves.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// NICs to attach the XDP program to (at least one).
    pub interfaces: Vec<String>,
    /// Address of the HTTP server for `/status` and `/metrics`.
    pub admin_listen: SocketAddr,
    pub xdp_mode: XdpMode,
    /// Flows the connection table holds before evicting the least recently used.
    pub conntrack_capacity: u32,
    /// Slots per Maglev ring (prime).
    pub ring_size: u32,
    /// VIPs the Maglev array has room for (at least the number configured).
    pub max_vips: u32,
    /// Whether the file set `max_vips`. Otherwise it follows the number of
    /// VIPs, so a reload that adds or removes VIPs keeps the running value
    /// rather than asking for a restart.
    pub max_vips_set: bool,
    /// The bpffs directory where the program's links and maps are pinned, so
    /// the data path outlives the agent (`/sys/fs/bpf/lb` by default).
    pub pin_dir: PathBuf,
    /// The Unix socket of the admin API's state-changing half (`lb backend`,
    /// `lb reload`): mode 0660, owned by [`AgentConfig::control_group`] if set.
    pub control_socket: PathBuf,
    /// The group that may use the control socket (besides root).
    pub control_group: Option<String>,
    /// An optional TCP address for the control API; every request there
    /// needs the bearer token of [`AgentConfig::control_token_file`].
    pub control_listen: Option<SocketAddr>,
    /// The file holding the control API's bearer token (first line).
    pub control_token_file: Option<PathBuf>,
    /// Where runtime changes (drain, maintenance, weights) are kept, so they
    /// survive restarts and reloads until cleared.
    pub state_file: PathBuf,
}

/// `[announce]`: the agent keeps a route for each VIP address it serves in
/// a kernel routing table of its own; a routing daemon (BIRD's kernel
/// protocol) imports that table and announces the routes to the routers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// The table's number (not 253-255, the kernel's own).
    pub routing_table: u32,
    /// On shutdown, how long to wait after withdrawing before stopping, so
    /// the routers move traffic elsewhere first.
    pub withdraw_delay: Duration,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (fast; veth and most modern NICs support it).
    Native,
    /// In the kernel's generic path (works everywhere, slower).
    Generic,
}

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    /// Lowercase name, as in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `[[vip]]`: one virtual service.
#[derive(Clone, Debug, PartialEq)]
pub struct VipConfig {
    /// Unique name, used in logs, metrics and the status API.
    pub name: String,
    /// Address and port clients connect to.
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// How a new flow picks its backend.
    pub scheduler: Scheduler,
    pub health_check: HealthCheckConfig,
    /// `[vip.limits]`: per-client limits on new connections, if any.
    pub limits: Option<LimitsConfig>,
    /// `[vip.timeouts]`: the connection table's idle timeouts for its flows.
    pub timeouts: TimeoutsConfig,
    /// What happens to the flows of a backend its health checks take down.
    pub on_backend_down: OnBackendDown,
    /// `[vip.passive_health]`: backends taken down by failed handshakes in
    /// client traffic; `None`: off.
    pub passive_health: Option<PassiveHealthConfig>,
    /// At least one.
    pub backends: Vec<BackendConfig>,
}

/// `[vip.limits]`: per-client limits, enforced in the data path on the
/// packet that opens a flow (see `lb_common::client_limits` for how, and
/// what is approximate). At least one of the two limits is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `new_connections_per_second`: a client's token bucket refills at this
    /// rate (nginx's `limit_req rate`).
    pub rate: Option<u32>,
    /// `burst`: most new connections a client may open at once (the
    /// bucket's size); only with a rate. Defaults to one second's worth.
    pub burst: u32,
    /// `max_connections_per_client`: concurrent flows per client (nginx's
    /// `limit_conn`).
    pub max_connections: Option<u32>,
    /// `per`: how many leading bits of the source address name a client:
    /// `"address"` (32 or 128) or `"/N"`.
    pub prefix_len: u8,
    /// `action`: what a refused client gets.
    pub action: LimitAction,
    /// `allow`: clients exempt from the limits.
    pub allow: Vec<Cidr>,
}

impl LimitsConfig {
    /// The data path's form of these limits.
    pub fn to_map(&self) -> lb_common::client_limits::VipLimits {
        use lb_common::client_limits::{LIMIT_F_ALLOW_LIST, LIMIT_F_RST, VipLimits};
        let mut flags = 0;
        if self.action == LimitAction::Rst {
            flags |= LIMIT_F_RST;
        }
        if !self.allow.is_empty() {
            flags |= LIMIT_F_ALLOW_LIST;
        }
        VipLimits::new(self.rate.unwrap_or(0), self.burst, self.max_connections.unwrap_or(0), self.prefix_len, flags)
    }
}

/// `limits.action`: what a client over a limit gets for the packet that
/// would have opened a flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LimitAction {
    /// Nothing: the packet is dropped (the client's SYN retransmits).
    #[default]
    Drop,
    /// A TCP RST, or ICMP port unreachable for UDP, within the gateway's
    /// rate limit for its own answers: the client fails at once.
    Rst,
}

/// An address prefix, `198.18.0.0/24` or `2001:db8::/48`; the address has
/// no bits set past the prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// `[vip.timeouts]`: how long a flow of the VIP may stay idle before its
/// connection-table entry no longer holds, in whole seconds (at most
/// 65,535); `None` keeps the default (`lb_common::timeouts`). Applies to
/// flows opened after it is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeoutsConfig {
    /// `tcp` (established) for a TCP VIP, `udp` for a UDP one.
    pub idle_secs: Option<u16>,
    /// `tcp_closing`: a TCP flow after a FIN or RST.
    pub closing_secs: Option<u16>,
}

impl TimeoutsConfig {
    /// The data path's form.
    #[must_use]
    pub fn to_map(self) -> lb_common::flow::FlowTimeouts {
        lb_common::flow::FlowTimeouts {
            idle_secs: self.idle_secs.unwrap_or(0),
            closing_secs: self.closing_secs.unwrap_or(0),
        }
    }
}

/// `vip.on_backend_down`: what a backend's health checks going down does to
/// the flows already on it. Either way it gets no new flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnBackendDown {
    /// Its flows move to another backend at their next packet (a TCP one is
    /// reset by its new backend): clients of a dead backend fail fast.
    #[default]
    Reschedule,
    /// Its flows stay on it (HAProxy's and IPVS's default): a health blip
    /// resets nothing, but clients of a dead backend wait for their own
    /// timeouts. Maintenance (`lb backend disable`) still moves them.
    Keep,
}

impl OnBackendDown {
    /// Lowercase name, as in the config file.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            OnBackendDown::Reschedule => "reschedule",
            OnBackendDown::Keep => "keep",
        }
    }
}

/// `vip.scheduler`: which hash of a new flow picks its backend. Either way
/// the choice is pinned in the connection table for the rest of the flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// Maglev over the 5-tuple: a client's connections spread.
    #[default]
    Maglev,
    /// Maglev over the client address only (nginx's `ip_hash`): all flows of
    /// one client go to one backend while the VIP's set of backends is stable.
    SourceHash,
}

impl Scheduler {
    /// Every scheduler, for error messages.
    pub const ALL: [Scheduler; 2] = [Scheduler::Maglev, Scheduler::SourceHash];

    /// The name, as in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::SourceHash => "source-hash",
        }
    }

    /// The scheduler called `name` in the config file.
    pub fn from_name(name: &str) -> Option<Self> {
        Scheduler::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Its `VIP_F_*` bits for `VipInfo.flags`.
    pub fn vip_flags(self) -> u32 {
        match self {
            Scheduler::Maglev => 0,
            Scheduler::SourceHash => lb_common::vip::VIP_F_SOURCE_HASH,
        }
    }
}

/// `[vip.health_check]`.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    /// Time between the starts of two probes of one backend.
    pub interval: Duration,
    /// How long one probe may take (above 0, at most `interval`).
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up (at least 1).
    pub rise: u32,
    /// Consecutive failures that take an up backend down (at least 1).
    pub fall: u32,
    /// Port to probe instead of the backend's own (HAProxy's `port`), e.g.
    /// an HTTP health endpoint next to a UDP service.
    pub port: Option<u16>,
}

impl HealthCheckConfig {
    /// Where probes of the backend at `backend` go.
    pub fn target(&self, backend: std::net::SocketAddr) -> std::net::SocketAddr {
        self.port.map_or(backend, |port| std::net::SocketAddr::new(backend.ip(), port))
    }
}

/// What a probe does.
#[derive(Clone, Debug, PartialEq)]
pub enum HealthCheckKind {
    /// HTTP/1.1 GET `path` with a Host header; healthy when the status is in
    /// range and, with `expect_body`, the body holds that text.
    Http { path: String, expect_status: StatusRange, host: Option<String>, expect_body: Option<String> },
    /// The same GET over TLS (`type = "https"`).
    Https { path: String, expect_status: StatusRange, host: Option<String>, expect_body: Option<String>, tls: TlsCheck },
    /// Healthy when a TCP connection is accepted.
    Tcp,
    /// A DNS query over UDP (`type = "dns"`); healthy on a matching answer.
    Dns(DnsCheck),
    /// No probes: the backend is always up.
    None,
}

/// The TLS half of a `type = "https"` check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsCheck {
    /// `sni`: the server name sent in the handshake and, with `verify`, the
    /// name the certificate must be for. `None`: the check's `host` (without
    /// a port) if it is a DNS name, else no SNI and the certificate must be
    /// for the backend's IP address.
    pub sni: Option<String>,
    /// `tls_verify`: whether the certificate must chain to a trusted root and
    /// name the server. Off, any certificate is accepted (the handshake's
    /// signatures are still checked).
    pub verify: bool,
    /// `tls_ca_file`: PEM file of the roots to trust; `None` trusts the
    /// system's store (`/etc/ssl/certs`).
    pub ca_file: Option<PathBuf>,
}

/// A `type = "dns"` check: one query over UDP to the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsCheck {
    /// `query_name`, fully qualified, without the trailing dot (`""` is the root).
    pub name: String,
    /// `query_type`, e.g. A (1) or AAAA (28).
    pub qtype: DnsType,
    /// `expect_answer`: healthy needs an answer record of `qtype`; without
    /// it, rcode NOERROR alone is enough (an empty answer, "NODATA", passes).
    pub expect_answer: bool,
}

/// A DNS record type, by number, with its name for the config and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsType(pub u16);

impl DnsType {
    /// The types `query_type` accepts by name.
    pub const NAMED: [(&'static str, u16); 9] = [
        ("A", 1),
        ("NS", 2),
        ("CNAME", 5),
        ("SOA", 6),
        ("PTR", 12),
        ("MX", 15),
        ("TXT", 16),
        ("AAAA", 28),
        ("SRV", 33),
    ];

    /// The type called `name` (any case).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        DnsType::NAMED.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|&(_, code)| DnsType(code))
    }
}

impl std::fmt::Display for DnsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match DnsType::NAMED.iter().find(|(_, code)| *code == self.0) {
            Some((name, _)) => f.write_str(name),
            None => write!(f, "TYPE{}", self.0),
        }
    }
}

/// An inclusive range of HTTP status codes, written `"200-399"` or `"200"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    pub min: u16,
    pub max: u16,
}

impl StatusRange {
    /// Whether `status` is in the range.
    pub fn contains(self, status: u16) -> bool {
        (self.min..=self.max).contains(&status)
    }
}

/// `[[vip.backend]]`: one real server.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    /// Address and port of the server (the port may differ from the VIP's).
    pub address: SocketAddr,
    /// Share of new flows, relative to the VIP's other backends; 0 takes no new flows.
    pub weight: u32,
    /// A backup takes new flows only while no primary (non-backup) backend
    /// of its VIP is up with a weight above 0.
    pub backup: bool,
    /// `[vip.backend.health_check]`: this backend's own check, the VIP's
    /// with the keys it sets; `None` uses the VIP's.
    pub health_check: Option<HealthCheckConfig>,
}

impl BackendConfig {
    /// The check that probes this backend: its own, else `vip`'s.
    #[must_use]
    pub fn check<'a>(&'a self, vip: &'a HealthCheckConfig) -> &'a HealthCheckConfig {
        self.health_check.as_ref().unwrap_or(vip)
    }
}

/// `[vip.passive_health]`: nginx's `max_fails` / `fail_timeout` at layer 4
/// (see `crate::health::passive` for the exact rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveHealthConfig {
    /// Failed handshakes, with no success in between, that take an up
    /// backend down (at least 1).
    pub max_fails: u32,
    /// How far back failures count.
    pub fail_timeout: Duration,
}
