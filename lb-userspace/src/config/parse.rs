//! From a TOML table to a validated [`Config`]: defaults, bounds and the
//! rules between keys. Every check names its key; the first problem wins.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::limits::{
    DEFAULT_CONNTRACK_CAPACITY, DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_MAGLEV_ENTRIES, MAX_SHARED_VIPS, MAX_VIPS,
    RINGS_PER_VIP,
};
use lb_common::timeouts::MAX_TIMEOUT_SECS;
use toml::Table;

use super::{
    error::Problem,
    model::{
        AgentConfig, AnnounceConfig, BackendConfig, Cidr, Config, DnsCheck, DnsType, HealthCheckConfig,
        HealthCheckKind, LimitAction, LimitsConfig, OnBackendDown, Protocol, Scheduler, StatusRange, TimeoutsConfig,
        TlsCheck, VipConfig, XdpMode,
    },
    passive::{PASSIVE_KEYS, passive_health},
    table::Section,
};
use crate::{control::maglev::is_prime, health::probe::https};

type Result<T> = std::result::Result<T, Problem>;

const TOP_KEYS: &[&str] = &["agent", "announce", "vip"];
const ANNOUNCE_KEYS: &[&str] = &["routing_table", "withdraw_delay"];
const AGENT_KEYS: &[&str] = &[
    "interfaces",
    "admin_listen",
    "xdp_mode",
    "conntrack_capacity",
    "ring_size",
    "max_vips",
    "pin_dir",
    "control_socket",
    "control_group",
    "control_listen",
    "control_token_file",
    "state_file",
];
const VIP_KEYS: &[&str] = &[
    "name",
    "listen",
    "protocol",
    "scheduler",
    "health_check",
    "passive_health",
    "on_backend_down",
    "limits",
    "timeouts",
    "backend",
];
const TIMEOUT_KEYS: &[&str] = &["tcp", "tcp_closing", "udp"];
const LIMIT_KEYS: &[&str] =
    &["new_connections_per_second", "burst", "per", "max_connections_per_client", "action", "allow"];
const CHECK_KEYS: &[&str] = &[
    "type",
    "path",
    "host",
    "expect_status",
    "expect_body",
    "sni",
    "tls_verify",
    "tls_ca_file",
    "query_name",
    "query_type",
    "expect_answer",
    "interval",
    "timeout",
    "rise",
    "fall",
    "port",
];
/// Keys of `[vip.health_check]` that only some types take, with those types.
const TYPE_KEYS: &[(&[&str], &[&str])] = &[
    (&["path", "host", "expect_status", "expect_body"], &["http", "https"]),
    (&["sni", "tls_verify", "tls_ca_file"], &["https"]),
    (&["query_name", "query_type", "expect_answer"], &["dns"]),
];
/// Keys a backend's own check inherits from its VIP's even when it sets
/// another `type`: the timing, which means the same for every type.
const TIMING_KEYS: &[&str] = &["interval", "timeout", "rise", "fall"];
/// Longest `expect_body`: it is looked for in the first `MAX_BODY` bytes.
const MAX_EXPECT_BODY: usize = 1024;
const BACKEND_KEYS: &[&str] = &["address", "weight", "backup", "health_check"];

/// Where the admin API listens unless configured. Port 7451: Prometheus'
/// exporter range, 9100-9999, is fully allocated (9100 is node_exporter's,
/// which runs on most monitored hosts), and 7451 is neither in it, nor in
/// `/etc/services`, nor a common daemon's default.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7451));
/// Where the program's links and maps are pinned unless configured (bpffs).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Where the control socket (the admin API's state-changing half) listens unless configured.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb/lb.sock";
/// Where runtime changes (drain, maintenance, weights) are kept unless configured.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/lb/state.json";
/// VIPs the Maglev array has room for unless configured (or more VIPs are configured).
pub const DEFAULT_MAX_VIPS: u32 = 16;
/// Bounds of `agent.conntrack_capacity`.
pub const CONNTRACK_CAPACITY_RANGE: (u32, u32) = (1024, 1 << 26);
/// Smallest `agent.ring_size`: below this Maglev cannot spread weights finely.
pub const MIN_RING_SIZE: u32 = 251;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Health check defaults, close to HAProxy's.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_EXPECT_STATUS: StatusRange = StatusRange { min: 200, max: 399 };
/// Highest rate, burst or concurrent-flow ceiling `[vip.limits]` takes.
pub const MAX_LIMIT: u32 = 10_000_000;
/// Most `limits.allow` prefixes per VIP.
pub const MAX_ALLOW: usize = 256;
/// How long a stopping agent waits between withdrawing its routes and
/// stopping, unless `announce.withdraw_delay` says otherwise.
pub const DEFAULT_WITHDRAW_DELAY: Duration = Duration::from_secs(2);
const MAX_WITHDRAW_DELAY: Duration = Duration::from_secs(300);
/// The kernel's default, main and local tables.
const RESERVED_TABLES: [u32; 3] = [253, 254, 255];
const INTERVAL_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));

/// Builds a validated config from the parsed file.
///
/// `[agent]` is read first so its problems are reported in file order;
/// `max_vips` is settled only once the VIPs are counted, since its default
/// and its lower bound depend on them.
pub fn config(table: Table, source: &Path) -> Result<Config> {
    let mut top = Section::new("", table, TOP_KEYS);
    let agent = top.table("agent", AGENT_KEYS)?.ok_or_else(|| top.problem("agent", "missing ([agent] is required)"))?;
    let announce = top.table("announce", ANNOUNCE_KEYS)?;
    let vip_sections = top.tables("vip", VIP_KEYS)?;
    top.finish()?;
    let agent = agent_settings(agent)?;
    let announce = announce.map(announce_settings).transpose()?;
    if vip_sections.is_empty() {
        return Err(Problem::new("vip", "no [[vip]] configured; at least one is required"));
    }
    let vips = vip_sections.into_iter().map(vip).collect::<Result<Vec<_>>>()?;
    check_unique_vips(&vips)?;
    check_backend_services(&vips)?;
    let agent = agent.resolve(vips.len())?;
    check_backend_count(&vips)?;
    check_ring_fits_backends(agent.ring_size, &vips)?;
    Ok(Config { source: source.to_owned(), agent, announce, vips })
}

/// `[announce]`: the kernel routing table the agent writes its VIP routes
/// to, for BIRD (or another daemon) to export.
fn announce_settings(mut s: Section) -> Result<AnnounceConfig> {
    let routing_table = s.integer("routing_table", 1_u32, u32::MAX)?.ok_or_else(|| {
        s.problem("routing_table", "missing: the kernel routing table (a number) BIRD's kernel protocol reads")
    })?;
    if RESERVED_TABLES.contains(&routing_table) {
        return Err(s.problem(
            "routing_table",
            format!(
                "{routing_table} is one of the kernel's own tables (253 default, 254 main, 255 local); pick another"
            ),
        ));
    }
    let withdraw_delay = duration(&mut s, "withdraw_delay")?.unwrap_or(DEFAULT_WITHDRAW_DELAY);
    if withdraw_delay > MAX_WITHDRAW_DELAY {
        return Err(s.problem("withdraw_delay", "at most 5 minutes"));
    }
    s.finish()?;
    Ok(AnnounceConfig { routing_table, withdraw_delay })
}

/// `[agent]` as written, before `max_vips` is checked against the VIPs.
struct AgentSettings {
    interfaces: Vec<String>,
    admin_listen: SocketAddr,
    xdp_mode: XdpMode,
    conntrack_capacity: u32,
    ring_size: u32,
    /// `None` when not set: then it is derived from the number of VIPs.
    max_vips: Option<u32>,
    pin_dir: PathBuf,
    control_socket: PathBuf,
    control_group: Option<String>,
    control_listen: Option<SocketAddr>,
    control_token_file: Option<PathBuf>,
    state_file: PathBuf,
}

fn agent_settings(mut s: Section) -> Result<AgentSettings> {
    let interfaces = interfaces(&mut s)?;
    let admin_listen = match s.string("admin_listen")? {
        Some(text) => text
            .parse::<SocketAddr>()
            .map_err(|_| s.problem("admin_listen", format!("{text:?} is not an address and port")))?,
        None => DEFAULT_ADMIN_LISTEN,
    };
    let xdp_mode = match s.string("xdp_mode")?.as_deref() {
        None | Some("native") => XdpMode::Native,
        Some("generic") => XdpMode::Generic,
        Some(other) => return Err(s.problem("xdp_mode", format!("{other:?} is not one of: native, generic"))),
    };
    let (lo, hi) = CONNTRACK_CAPACITY_RANGE;
    let conntrack_capacity = s.integer("conntrack_capacity", lo, hi)?.unwrap_or(DEFAULT_CONNTRACK_CAPACITY);
    let ring_size = ring_size(&mut s)?;
    let max_vips = s.integer("max_vips", 1, MAX_VIPS)?;
    if let Some(max_vips) = max_vips {
        let fit = vips_that_fit(ring_size);
        if max_vips > fit {
            return Err(s.problem(
                "max_vips",
                format!(
                    "{max_vips} VIPs of ring_size {ring_size} need {} Maglev entries, over the limit of \
                     {MAX_MAGLEV_ENTRIES}; at most {fit} fit",
                    maglev_entries(max_vips, ring_size)
                ),
            ));
        }
    }
    let pin_dir = pin_dir(&mut s)?;
    let control_socket = absolute_path(&mut s, "control_socket", DEFAULT_CONTROL_SOCKET)?;
    let control_group = s.string("control_group")?;
    if let Some(group) = &control_group
        && group.is_empty()
    {
        return Err(s.problem("control_group", "empty; name a group, or leave it out"));
    }
    let state_file = absolute_path(&mut s, "state_file", DEFAULT_STATE_FILE)?;
    let (control_listen, control_token_file) = control_tcp(&mut s)?;
    s.finish()?;
    Ok(AgentSettings {
        interfaces,
        admin_listen,
        xdp_mode,
        conntrack_capacity,
        ring_size,
        max_vips,
        pin_dir,
        control_socket,
        control_group,
        control_listen,
        control_token_file,
        state_file,
    })
}

impl AgentSettings {
    /// Fills in `max_vips` and checks that the `vip_count` VIPs fit, naming
    /// `max_vips` if the user set it too low, else `ring_size`, which is then
    /// what makes them not fit.
    fn resolve(self, vip_count: usize) -> Result<AgentConfig> {
        let vip_count = u32::try_from(vip_count).unwrap_or(u32::MAX);
        let fit = vips_that_fit(self.ring_size);
        let max_vips = match self.max_vips {
            Some(n) if vip_count > n => {
                return Err(Problem::new(
                    "agent.max_vips",
                    format!("{vip_count} VIPs are configured but max_vips is {n}"),
                ));
            }
            Some(n) => n,
            None if vip_count > fit => {
                return Err(Problem::new(
                    "agent.ring_size",
                    format!(
                        "{vip_count} VIPs of ring_size {} need {} Maglev entries, over the limit of \
                         {MAX_MAGLEV_ENTRIES}; at most {fit} fit",
                        self.ring_size,
                        maglev_entries(vip_count, self.ring_size)
                    ),
                ));
            }
            None => DEFAULT_MAX_VIPS.max(vip_count).min(fit),
        };
        let max_vips_set = self.max_vips.is_some();
        let AgentSettings {
            interfaces,
            admin_listen,
            xdp_mode,
            conntrack_capacity,
            ring_size,
            pin_dir,
            control_socket,
            control_group,
            control_listen,
            control_token_file,
            state_file,
            ..
        } = self;
        Ok(AgentConfig {
            interfaces,
            admin_listen,
            xdp_mode,
            conntrack_capacity,
            ring_size,
            max_vips,
            max_vips_set,
            pin_dir,
            control_socket,
            control_group,
            control_listen,
            control_token_file,
            state_file,
        })
    }
}

/// `agent.pin_dir`: an absolute path, by default [`DEFAULT_PIN_DIR`]; its
/// parent must be on a bpffs (the agent mounts one on `/sys/fs/bpf` if none is).
fn pin_dir(s: &mut Section) -> Result<PathBuf> {
    let Some(text) = s.string("pin_dir")? else { return Ok(PathBuf::from(DEFAULT_PIN_DIR)) };
    let path = PathBuf::from(&text);
    if !path.is_absolute() || path.parent().is_none() {
        return Err(s.problem("pin_dir", format!("{text:?} is not an absolute path below a bpffs mount")));
    }
    Ok(path)
}

/// `agent.control_listen` and `agent.control_token_file`: the control API
/// over TCP is optional, and never without a token.
fn control_tcp(s: &mut Section) -> Result<(Option<SocketAddr>, Option<PathBuf>)> {
    let listen = match s.string("control_listen")? {
        Some(text) => Some(
            text.parse::<SocketAddr>()
                .map_err(|_| s.problem("control_listen", format!("{text:?} is not an address and port")))?,
        ),
        None => None,
    };
    let token = match s.string("control_token_file")? {
        Some(text) if PathBuf::from(&text).is_absolute() => Some(PathBuf::from(text)),
        Some(text) => return Err(s.problem("control_token_file", format!("{text:?} is not an absolute path"))),
        None => None,
    };
    if listen.is_some() && token.is_none() {
        return Err(s.problem(
            "control_listen",
            "set, but agent.control_token_file is not: the state-changing API over TCP requires a bearer token",
        ));
    }
    Ok((listen, token))
}

/// An absolute path at `key`, or `default`.
fn absolute_path(s: &mut Section, key: &str, default: &str) -> Result<PathBuf> {
    let Some(text) = s.string(key)? else { return Ok(PathBuf::from(default)) };
    let path = PathBuf::from(&text);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(s.problem(key, format!("{text:?} is not an absolute file path")));
    }
    Ok(path)
}

/// `agent.interfaces`: required, non-empty, valid and unique names.
fn interfaces(s: &mut Section) -> Result<Vec<String>> {
    let interfaces = s.strings("interfaces")?.ok_or_else(|| s.problem("interfaces", "missing (required)"))?;
    if interfaces.is_empty() {
        return Err(s.problem("interfaces", "empty; name at least one interface"));
    }
    let mut seen = HashSet::new();
    for (i, name) in interfaces.iter().enumerate() {
        let key = format!("interfaces[{}]", i + 1);
        check_interface_name(name).map_err(|reason| s.problem(&key, reason))?;
        if !seen.insert(name) {
            return Err(s.problem(&key, format!("{name:?} is listed twice")));
        }
    }
    Ok(interfaces)
}

/// `agent.ring_size`: a prime from [`MIN_RING_SIZE`] up to what one VIP's two
/// rings may take of the Maglev array.
fn ring_size(s: &mut Section) -> Result<u32> {
    let max_ring = u32::try_from(MAX_MAGLEV_ENTRIES / u64::from(RINGS_PER_VIP)).unwrap_or(u32::MAX);
    let ring_size = s.integer("ring_size", MIN_RING_SIZE, max_ring)?.unwrap_or(DEFAULT_RING_SIZE);
    if !is_prime(ring_size) {
        return Err(s.problem("ring_size", format!("{ring_size} is not prime (Maglev needs a prime, e.g. 65537)")));
    }
    Ok(ring_size)
}

/// Entries of the Maglev array that `vips` VIPs with rings of `ring_size` take.
fn maglev_entries(vips: u32, ring_size: u32) -> u64 {
    u64::from(vips) * u64::from(RINGS_PER_VIP) * u64::from(ring_size)
}

/// How many VIPs with rings of `ring_size` the Maglev array and VIP map hold.
fn vips_that_fit(ring_size: u32) -> u32 {
    let per_vip = u64::from(RINGS_PER_VIP) * u64::from(ring_size.max(1));
    u32::try_from(MAX_MAGLEV_ENTRIES / per_vip).unwrap_or(u32::MAX).min(MAX_VIPS)
}

/// Linux interface names: 1 to 15 bytes, no `/`, no whitespace, not `.` or `..`.
fn check_interface_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} is not an interface name (1 to 15 bytes)"));
    }
    if name == "." || name == ".." || name.contains('/') || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{name:?} is not an interface name"));
    }
    Ok(())
}

fn vip(mut s: Section) -> Result<VipConfig> {
    let name = s.required_string("name")?;
    if !valid_name(&name) {
        return Err(s.problem("name", format!("{name:?} must be 1 to 64 letters, digits, '_', '.' or '-'")));
    }
    let path = format!("{} ({name})", s.path());
    s.rename(path);
    let listen = service_addr(&mut s, "listen")?;
    let protocol = match s.string("protocol")?.as_deref() {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => return Err(s.problem("protocol", format!("{other:?} is not one of: tcp, udp"))),
    };
    let scheduler = scheduler(&mut s)?;
    let on_backend_down = match s.string("on_backend_down")?.as_deref() {
        None | Some("reschedule") => OnBackendDown::Reschedule,
        Some("keep") => OnBackendDown::Keep,
        Some(other) => {
            return Err(s.problem("on_backend_down", format!("{other:?} is not one of: reschedule, keep")));
        }
    };
    // Kept as TOML too: each backend's own check starts from it.
    let check_table = s.raw_table("health_check")?;
    let health_check = match &check_table {
        Some(table) => health_check(Section::new(s.key("health_check"), table.clone(), CHECK_KEYS))?,
        None => default_health_check(),
    };
    if let Some(reason) = transport_problem(protocol, &health_check) {
        return Err(s.problem("health_check", reason));
    }
    let passive_health = match s.table("passive_health", PASSIVE_KEYS)? {
        Some(section) => Some(passive_health(section, &health_check)?),
        None => None,
    };
    let timeouts = match s.table("timeouts", TIMEOUT_KEYS)? {
        Some(section) => timeouts(section, protocol)?,
        None => TimeoutsConfig::default(),
    };
    let limits = match s.table("limits", LIMIT_KEYS)? {
        Some(section) => Some(limits(section, listen)?),
        None => None,
    };
    let sections = s.tables("backend", BACKEND_KEYS)?;
    if sections.is_empty() {
        return Err(s.problem("backend", "no [[vip.backend]] configured; at least one is required"));
    }
    let backends =
        sections.into_iter().map(|b| backend(b, check_table.as_ref(), protocol)).collect::<Result<Vec<_>>>()?;
    let mut seen = HashSet::new();
    for (i, b) in backends.iter().enumerate() {
        let key = format!("backend[{}].address", i + 1);
        if !seen.insert(b.address) {
            return Err(s.problem(&key, format!("{} is listed twice", b.address)));
        }
        check_same_family(listen, b.address).map_err(|reason| s.problem(&key, reason))?;
    }
    s.finish()?;
    Ok(VipConfig {
        name,
        listen,
        protocol,
        scheduler,
        health_check,
        passive_health,
        on_backend_down,
        limits,
        timeouts,
        backends,
    })
}

/// `[vip.timeouts]` of a `protocol` VIP: `tcp` and `tcp_closing`, or `udp`.
fn timeouts(mut s: Section, protocol: Protocol) -> Result<TimeoutsConfig> {
    let (idle_key, other) = match protocol {
        Protocol::Tcp => ("tcp", ["udp"].as_slice()),
        Protocol::Udp => ("udp", ["tcp", "tcp_closing"].as_slice()),
    };
    for key in other {
        if s.string(key)?.is_some() {
            return Err(s.problem(
                key,
                format!("only for {} VIPs; this one is {}", other_protocol(protocol), protocol.as_str()),
            ));
        }
    }
    let idle_secs = timeout_secs(&mut s, idle_key)?;
    let closing_secs = if protocol == Protocol::Tcp { timeout_secs(&mut s, "tcp_closing")? } else { None };
    s.finish()?;
    Ok(TimeoutsConfig { idle_secs, closing_secs })
}

fn other_protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "udp",
        Protocol::Udp => "tcp",
    }
}

/// A timeout in whole seconds, 1 s to [`MAX_TIMEOUT_SECS`].
fn timeout_secs(s: &mut Section, key: &str) -> Result<Option<u16>> {
    let Some(d) = duration(s, key)? else { return Ok(None) };
    let secs = u16::try_from(d.as_secs()).ok().filter(|&n| n >= 1 && d.subsec_nanos() == 0);
    secs.map(Some).ok_or_else(|| {
        s.problem(
            key,
            format!(
                "{} must be whole seconds from 1s to {MAX_TIMEOUT_SECS}s (about 18 hours)",
                humantime::format_duration(d)
            ),
        )
    })
}

/// `[vip.limits]`, for a VIP listening on `listen`.
fn limits(mut s: Section, listen: SocketAddr) -> Result<LimitsConfig> {
    let rate = s.integer("new_connections_per_second", 1, MAX_LIMIT)?;
    let burst = s.integer("burst", 1, MAX_LIMIT)?;
    if burst.is_some() && rate.is_none() {
        return Err(s.problem("burst", "only with new_connections_per_second"));
    }
    let max_connections = s.integer("max_connections_per_client", 1, MAX_LIMIT)?;
    if rate.is_none() && max_connections.is_none() {
        return Err(s.problem(
            "new_connections_per_second",
            "[vip.limits] sets no limit: set new_connections_per_second or max_connections_per_client",
        ));
    }
    let bits = if listen.is_ipv4() { 32 } else { 128 };
    let prefix_len = match s.string("per")?.as_deref() {
        None | Some("address") => bits,
        Some(text) => {
            text.strip_prefix('/').and_then(|n| n.parse::<u8>().ok()).filter(|&n| (1..=bits).contains(&n)).ok_or_else(
                || s.problem("per", format!("{text:?} is not \"address\" or a prefix length \"/1\" to \"/{bits}\"")),
            )?
        }
    };
    let action = match s.string("action")?.as_deref() {
        None | Some("drop") => LimitAction::Drop,
        Some("rst") => LimitAction::Rst,
        Some(other) => return Err(s.problem("action", format!("{other:?} is not one of: drop, rst"))),
    };
    let mut allow = Vec::new();
    for text in s.strings("allow")?.unwrap_or_default() {
        let cidr = parse_cidr(&text).map_err(|reason| s.problem("allow", reason))?;
        if cidr.addr.is_ipv4() != listen.is_ipv4() {
            return Err(s.problem(
                "allow",
                format!("{text} is {} but the VIP is {}", ip_family(cidr.addr), ip_family(listen.ip())),
            ));
        }
        allow.push(cidr);
    }
    allow.sort();
    allow.dedup();
    if allow.len() > MAX_ALLOW {
        return Err(s.problem("allow", format!("{} prefixes; at most {MAX_ALLOW} per VIP", allow.len())));
    }
    s.finish()?;
    Ok(LimitsConfig { rate, burst: burst.or(rate).unwrap_or(1), max_connections, prefix_len, action, allow })
}

/// A prefix written `address/length`, with no host bits set.
fn parse_cidr(text: &str) -> std::result::Result<Cidr, String> {
    let (addr, len) = text.split_once('/').ok_or_else(|| format!("{text:?} is not a prefix like \"198.18.0.0/24\""))?;
    let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = len
        .parse::<u8>()
        .ok()
        .filter(|&n| n <= bits)
        .ok_or_else(|| format!("{len:?} is not a prefix length 0 to {bits}"))?;
    let masked = lb_common::client_limits::masked(&lb_common::addr::words(addr), prefix_len);
    if masked != lb_common::addr::words(addr) {
        return Err(format!("{text} has bits set past its prefix length"));
    }
    Ok(Cidr { addr, prefix_len })
}

fn ip_family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// `vip.scheduler`, `"maglev"` unless set.
fn scheduler(s: &mut Section) -> Result<Scheduler> {
    match s.string("scheduler")? {
        None => Ok(Scheduler::default()),
        Some(name) => Scheduler::from_name(&name).ok_or_else(|| {
            let names: Vec<&str> = Scheduler::ALL.iter().map(|known| known.as_str()).collect();
            s.problem("scheduler", format!("{name:?} is not one of: {}", names.join(", ")))
        }),
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// `listen` or `address`: an IPv4 `a.b.c.d:port` or IPv6 `[addr]:port` that
/// can carry balanced traffic (see [`check_service_ip`]), port not 0.
fn service_addr(s: &mut Section, key: &str) -> Result<SocketAddr> {
    let text = s.required_string(key)?;
    let addr = parse_socket_addr(&text).map_err(|reason| s.problem(key, format!("{text:?} {reason}")))?;
    if addr.port() == 0 {
        return Err(s.problem(key, format!("{text:?}: port 0 is not a port")));
    }
    if let SocketAddr::V6(v6) = addr
        && v6.scope_id() != 0
    {
        return Err(s.problem(
            key,
            format!(
                "{text:?}: a zone index (%{}) is not supported; the data path routes by address alone",
                v6.scope_id()
            ),
        ));
    }
    check_service_ip(addr.ip()).map_err(|reason| s.problem(key, format!("{text:?}: {reason}")))?;
    Ok(addr)
}

/// Parses `address:port`; the error completes `"TEXT" ...`, with a hint for
/// the usual slips (no port, IPv6 without brackets).
fn parse_socket_addr(text: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    Err(match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => "has no port; write it as address:port, e.g. \"198.18.0.100:80\"".to_owned(),
        Ok(IpAddr::V6(_)) => {
            "is an IPv6 address without a port; write \"[ADDRESS]:PORT\", e.g. \"[2001:db8::100]:80\"".to_owned()
        }
        Err(_) => "is not an address and port (IPv4 \"198.18.0.100:80\" or IPv6 \"[2001:db8::100]:80\")".to_owned(),
    })
}

/// Refuses addresses that cannot be a VIP or a backend of an XDP NAT
/// balancer: no packet on a NIC is to or from them, or (link-local) they
/// name no host without an interface, which the data path's FIB lookup does
/// not have.
fn check_service_ip(ip: IpAddr) -> std::result::Result<(), String> {
    let what = match ip {
        IpAddr::V4(v4) => ipv4_unusable(v4),
        IpAddr::V6(v6) => ipv6_unusable(v6),
    };
    match what {
        Some(what) => Err(format!("{ip} is {what}; a VIP or backend needs a unicast address")),
        None => Ok(()),
    }
}

fn ipv4_unusable(ip: Ipv4Addr) -> Option<&'static str> {
    let first = ip.octets()[0];
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if first == 0 {
        // RFC 1122 3.2.1.3: "this host on this network", a source only.
        Some("in 0.0.0.0/8 (\"this network\", never a destination)")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if first >= 240 {
        // RFC 1112 4: reserved; kernels and routers drop it.
        Some("in 240.0.0.0/4 (reserved, not routed)")
    } else {
        None
    }
}

fn ipv6_unusable(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("the loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_unicast_link_local() {
        Some("link-local (it needs an interface to mean a host)")
    } else if ip.to_ipv4_mapped().is_some() {
        // On the wire such a flow is IPv4; the data path would never see this address.
        Some("IPv4-mapped (write the IPv4 address itself)")
    } else if ip.to_ipv4().is_some() {
        // `::a.b.c.d` (RFC 4291 2.5.5.1, deprecated): unspecified and
        // loopback are caught above; the rest means an IPv4 host.
        Some("IPv4-compatible, a deprecated form (write the IPv4 address itself)")
    } else {
        None
    }
}

/// The data path sends a VIP's flows only to backends of its own family (it
/// translates addresses, not IP versions).
fn check_same_family(listen: SocketAddr, backend: SocketAddr) -> std::result::Result<(), String> {
    if listen.is_ipv4() == backend.is_ipv4() {
        return Ok(());
    }
    Err(format!(
        "{backend} is {} but the VIP listens on {}; a VIP's backends must be of its family",
        family_name(backend),
        family_name(listen)
    ))
}

fn family_name(addr: SocketAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn default_health_check() -> HealthCheckConfig {
    HealthCheckConfig {
        kind: HealthCheckKind::Http {
            path: "/".to_owned(),
            expect_status: DEFAULT_EXPECT_STATUS,
            host: None,
            expect_body: None,
        },
        interval: DEFAULT_INTERVAL,
        timeout: DEFAULT_TIMEOUT,
        rise: DEFAULT_RISE,
        fall: DEFAULT_FALL,
        port: None,
    }
}

/// Why backends of a `protocol` VIP cannot be probed with `check`, if so:
/// the probe's transport must match the backend's port unless `port` says
/// where else to probe.
fn transport_problem(protocol: Protocol, check: &HealthCheckConfig) -> Option<&'static str> {
    if check.port.is_some() {
        return None;
    }
    match (protocol, &check.kind) {
        (_, HealthCheckKind::None) | (Protocol::Udp, HealthCheckKind::Dns(_)) => None,
        (Protocol::Udp, _) => Some(
            "a udp VIP's backends cannot be probed over TCP on their own port: set health_check.port or \
             type = \"none\", or use type = \"dns\" for a DNS service",
        ),
        (Protocol::Tcp, HealthCheckKind::Dns(_)) => Some(
            "a dns check queries over UDP, and a tcp VIP's backends listen on TCP: set health_check.port to \
             their UDP DNS port",
        ),
        (Protocol::Tcp, _) => None,
    }
}

/// A backend's `[vip.backend.health_check]` on top of its VIP's check
/// (`vip_check`, as written): every key it does not set is the VIP's, but
/// when it sets another `type`, only the timing keys carry over, since the
/// rest belong to the VIP's type.
fn merged_check(vip_check: Option<&Table>, own: Table) -> Table {
    let type_of = |table: &Table| table.get("type").and_then(|v| v.as_str()).unwrap_or("http").to_owned();
    let mut merged = vip_check.cloned().unwrap_or_default();
    if own.contains_key("type") && type_of(&own) != type_of(&merged) {
        merged.retain(|key, _| TIMING_KEYS.contains(&key));
    }
    merged.extend(own);
    merged
}

fn health_check(mut s: Section) -> Result<HealthCheckConfig> {
    let kind_name = s.string("type")?.unwrap_or_else(|| "http".to_owned());
    if !["http", "https", "tcp", "dns", "none"].contains(&kind_name.as_str()) {
        return Err(s.problem("type", format!("{kind_name:?} is not one of: http, tcp, none, https, dns")));
    }
    for (keys, types) in TYPE_KEYS {
        if types.contains(&kind_name.as_str()) {
            continue;
        }
        if let Some(key) = keys.iter().find(|key| s.contains(key)) {
            let types: Vec<String> = types.iter().map(|t| format!("{t:?}")).collect();
            return Err(s.problem(key, format!("only for type = {}, not {kind_name:?}", types.join(" or "))));
        }
    }
    let kind = match kind_name.as_str() {
        "http" => {
            let HttpFields { path, expect_status, host, expect_body } = http_check(&mut s)?;
            HealthCheckKind::Http { path, expect_status, host, expect_body }
        }
        "https" => {
            let HttpFields { path, expect_status, host, expect_body } = http_check(&mut s)?;
            let tls = tls_check(&mut s)?;
            HealthCheckKind::Https { path, expect_status, host, expect_body, tls }
        }
        "dns" => HealthCheckKind::Dns(dns_check(&mut s)?),
        "tcp" => HealthCheckKind::Tcp,
        _ => HealthCheckKind::None,
    };
    let interval = duration(&mut s, "interval")?.unwrap_or(DEFAULT_INTERVAL);
    let (lo, hi) = INTERVAL_RANGE;
    if interval < lo || interval > hi {
        return Err(
            s.problem("interval", format!("{} is out of range (100ms to 1h)", humantime::format_duration(interval)))
        );
    }
    let timeout = duration(&mut s, "timeout")?.unwrap_or(DEFAULT_TIMEOUT.min(interval));
    if timeout.is_zero() || timeout > interval {
        return Err(s.problem(
            "timeout",
            format!(
                "{} must be above 0 and at most the interval ({})",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ),
        ));
    }
    let rise = s.integer("rise", 1, 100)?.unwrap_or(DEFAULT_RISE);
    let fall = s.integer("fall", 1, 100)?.unwrap_or(DEFAULT_FALL);
    let port = s.integer("port", 1_u16, u16::MAX)?;
    s.finish()?;
    Ok(HealthCheckConfig { kind, interval, timeout, rise, fall, port })
}

/// The keys `http` and `https` checks share.
struct HttpFields {
    path: String,
    expect_status: StatusRange,
    host: Option<String>,
    expect_body: Option<String>,
}

fn http_check(s: &mut Section) -> Result<HttpFields> {
    let path = s.string("path")?.unwrap_or_else(|| "/".to_owned());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(s.problem("path", format!("{path:?} must start with '/' and contain no spaces")));
    }
    let host = s.string("host")?;
    if let Some(h) = host.as_ref().filter(|h| h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control())) {
        return Err(s.problem("host", format!("{h:?} is not a host name")));
    }
    // A bare IPv6 literal is not valid Host syntax (RFC 9110 7.2 wants brackets).
    if let Some(h) = host.as_ref().filter(|h| h.parse::<Ipv6Addr>().is_ok()) {
        return Err(s.problem("host", format!("{h:?} is an IPv6 address; a Host header needs brackets: \"[{h}]\"")));
    }
    let expect_status = match s.string("expect_status")? {
        Some(text) => status_range(&text).ok_or_else(|| {
            s.problem("expect_status", format!("{text:?} is not a status or range like \"200-399\" (100 to 599)"))
        })?,
        None => DEFAULT_EXPECT_STATUS,
    };
    let expect_body = s.string("expect_body")?;
    if let Some(text) = &expect_body {
        if text.is_empty() {
            return Err(s.problem("expect_body", "empty; give the text the body must contain, or leave it out"));
        }
        if text.len() > MAX_EXPECT_BODY {
            return Err(s.problem(
                "expect_body",
                format!("{} bytes; at most {MAX_EXPECT_BODY} (the probe reads a short health page)", text.len()),
            ));
        }
    }
    Ok(HttpFields { path, expect_status, host, expect_body })
}

/// `sni`, `tls_verify` and `tls_ca_file` of an `https` check. The CA file
/// is read now, so a reload with a bad one is refused, not every probe.
fn tls_check(s: &mut Section) -> Result<TlsCheck> {
    let sni = s.string("sni")?;
    if let Some(name) = &sni
        && https::server_name(Some(name), None).is_none()
    {
        return Err(s.problem(
            "sni",
            format!("{name:?} is not a DNS name (to verify a certificate for the backend's IP address, leave sni out)"),
        ));
    }
    let verify = s.boolean("tls_verify")?.unwrap_or(true);
    let ca_file = match s.string("tls_ca_file")? {
        None => None,
        Some(_) if !verify => {
            return Err(s.problem("tls_ca_file", "only with tls_verify = true: nothing is verified without it"));
        }
        Some(text) => {
            let path = PathBuf::from(&text);
            if !path.is_absolute() {
                return Err(s.problem("tls_ca_file", format!("{text:?} is not an absolute path")));
            }
            https::load_ca_file(&path).map_err(|reason| s.problem("tls_ca_file", reason))?;
            Some(path)
        }
    };
    Ok(TlsCheck { sni, verify, ca_file })
}

/// `query_name`, `query_type` and `expect_answer` of a `dns` check.
fn dns_check(s: &mut Section) -> Result<DnsCheck> {
    let text = s
        .string("query_name")?
        .ok_or_else(|| s.problem("query_name", "missing: the name to query, e.g. \"health.example.com\""))?;
    let name = dns_name(&text).map_err(|reason| s.problem("query_name", format!("{text:?} {reason}")))?;
    let qtype = match s.string("query_type")? {
        None => DnsType(1),
        Some(t) => DnsType::from_name(&t).ok_or_else(|| {
            let names: Vec<&str> = DnsType::NAMED.iter().map(|(n, _)| *n).collect();
            s.problem("query_type", format!("{t:?} is not one of: {}", names.join(", ")))
        })?,
    };
    let expect_answer = s.boolean("expect_answer")?.unwrap_or(true);
    Ok(DnsCheck { name, qtype, expect_answer })
}

/// A DNS name as queried: labels of 1 to 63 letters, digits, '-' or '_',
/// 253 bytes in all; a trailing dot is allowed, "." is the root. Returns it
/// without the trailing dot; the error completes `"NAME" ...`.
fn dns_name(text: &str) -> std::result::Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() || name.len() > 253 {
        return Err("is not a DNS name (1 to 253 bytes, e.g. \"health.example.com\")".to_owned());
    }
    if name.is_empty() {
        return Ok(String::new());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("has an empty label or one longer than 63 bytes".to_owned());
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("has a label {label:?} with other than letters, digits, '-' or '_'"));
        }
    }
    Ok(name.to_owned())
}

fn status_range(text: &str) -> Option<StatusRange> {
    let (min, max) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let code = text.trim().parse().ok()?;
            (code, code)
        }
    };
    ((100..=599).contains(&min) && (100..=599).contains(&max) && min <= max).then_some(StatusRange { min, max })
}

pub(super) fn duration(s: &mut Section, key: &str) -> Result<Option<Duration>> {
    match s.string(key)? {
        None => Ok(None),
        Some(text) => humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| s.problem(key, format!("{text:?} is not a duration like \"500ms\" or \"2s\": {e}"))),
    }
}

/// `[[vip.backend]]` of a `protocol` VIP whose check is `vip_check` as written.
fn backend(mut s: Section, vip_check: Option<&Table>, protocol: Protocol) -> Result<BackendConfig> {
    let address = service_addr(&mut s, "address")?;
    let weight = s.integer("weight", 0, MAX_WEIGHT)?.unwrap_or(1);
    let backup = s.boolean("backup")?.unwrap_or(false);
    let health_check = match s.raw_table("health_check")? {
        Some(own) => {
            let merged = merged_check(vip_check, own);
            let check = health_check(Section::new(s.key("health_check"), merged, CHECK_KEYS))?;
            if let Some(reason) = transport_problem(protocol, &check) {
                return Err(s.problem("health_check", reason));
            }
            Some(check)
        }
        None => None,
    };
    s.finish()?;
    Ok(BackendConfig { address, weight, backup, health_check })
}

fn check_unique_vips(vips: &[VipConfig]) -> Result<()> {
    let mut names = HashSet::new();
    let mut services = HashSet::new();
    for (i, vip) in vips.iter().enumerate() {
        let path = vip_path(i, vip);
        if !names.insert(vip.name.as_str()) {
            return Err(Problem::new(format!("{path}.name"), format!("{:?} is used by an earlier VIP", vip.name)));
        }
        if !services.insert((vip.listen, vip.protocol)) {
            return Err(Problem::new(
                format!("{path}.listen"),
                format!("{} {} is served by an earlier VIP", vip.protocol.as_str(), vip.listen),
            ));
        }
    }
    Ok(())
}

/// A service the data path tells apart: address, port and protocol.
type Service = (SocketAddr, Protocol);

/// Refuses backends the data path cannot serve, across VIPs:
///
/// - a backend that is a VIP's own `listen` (same protocol): the balanced
///   packet would be balanced again, so it loops, whether the VIP is the
///   backend's own or another that backs it in turn;
/// - a backend on a VIP's address, on any port: the data path answers for
///   a VIP address itself (a port or protocol no VIP serves is refused with
///   a RST or port unreachable), so nothing reaches a backend there;
/// - one backend (address, port, protocol) under more than
///   `limits::MAX_SHARED_VIPS` VIPs: a shared backend's reply finds its VIP
///   by trying each one's connection-table entry for its client, so the
///   data path looks at no more than that many.
fn check_backend_services(vips: &[VipConfig]) -> Result<()> {
    let listeners: HashMap<Service, usize> =
        vips.iter().enumerate().map(|(i, vip)| ((vip.listen, vip.protocol), i)).collect();
    let vip_ips: HashMap<IpAddr, usize> = vips.iter().enumerate().map(|(i, vip)| (vip.listen.ip(), i)).collect();
    let mut owners: HashMap<Service, Vec<usize>> = HashMap::new();
    for (i, vip) in vips.iter().enumerate() {
        for (j, backend) in vip.backends.iter().enumerate() {
            let key = format!("{}.backend[{}].address", vip_path(i, vip), j + 1);
            let service = (backend.address, vip.protocol);
            if let Some(&target) = listeners.get(&service) {
                return Err(Problem::new(key, backend_is_a_vip(service, i, target, vips)));
            }
            if let Some(&target) = vip_ips.get(&backend.address.ip()) {
                return Err(Problem::new(
                    key,
                    format!(
                        "{} is the address of {}; a backend cannot live on a VIP's address (the gateway answers \
                         for every port of it)",
                        backend.address.ip(),
                        vip_path(target, &vips[target])
                    ),
                ));
            }
            // Backends are unique within a VIP, so the owners are other VIPs.
            let others = owners.entry(service).or_default();
            if others.len() >= MAX_SHARED_VIPS as usize {
                let names: Vec<String> = others.iter().map(|&o| vip_path(o, &vips[o])).collect();
                return Err(Problem::new(
                    key,
                    format!(
                        "{} {} is also a backend of {}; at most {MAX_SHARED_VIPS} VIPs may share a backend's \
                         address, port and protocol (its replies find their VIP by trying each)",
                        service.1.as_str(),
                        service.0,
                        names.join(", ")
                    ),
                ));
            }
            others.push(i);
        }
    }
    Ok(())
}

/// Why backend `service` of VIP `vip` cannot be VIP `target`'s listen address.
fn backend_is_a_vip(service: Service, vip: usize, target: usize, vips: &[VipConfig]) -> String {
    let (address, protocol) = (service.0, service.1.as_str());
    if vip == target {
        format!("{protocol} {address} is this VIP's own listen address; a VIP cannot be its own backend (a loop)")
    } else {
        format!(
            "{protocol} {address} is the listen address of {}; a backend cannot be a VIP (its packets would \
             be balanced again, and two VIPs backing each other loop)",
            vip_path(target, &vips[target])
        )
    }
}

/// `vip[N] (NAME)`, as keys name a VIP.
fn vip_path(index: usize, vip: &VipConfig) -> String {
    format!("vip[{}] ({})", index + 1, vip.name)
}

fn check_backend_count(vips: &[VipConfig]) -> Result<()> {
    let total: usize = vips.iter().map(|v| v.backends.len()).sum();
    let max = MAX_BACKENDS as usize - 1;
    if total > max {
        return Err(Problem::new("vip", format!("{total} backends over all VIPs; at most {max} are supported")));
    }
    Ok(())
}

/// Maglev needs more slots than backends to give each one a place.
fn check_ring_fits_backends(ring_size: u32, vips: &[VipConfig]) -> Result<()> {
    for (i, vip) in vips.iter().enumerate() {
        if vip.backends.len() >= ring_size as usize {
            return Err(Problem::new(
                format!("{}.backend", vip_path(i, vip)),
                format!("{} backends do not fit agent.ring_size {ring_size}", vip.backends.len()),
            ));
        }
    }
    Ok(())
}
