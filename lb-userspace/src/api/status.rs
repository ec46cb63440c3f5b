//! The status snapshot: what `/status` returns and `/metrics` renders.

use lb_common::stats::Counters;
use serde::{Deserialize, Serialize};

/// Everything an operator sees about the running balancer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub vips: Vec<VipStatus>,
    /// Packets per verdict reason since the program was loaded.
    pub verdicts: Vec<VerdictCount>,
    /// The connection table. Absent from older agents' answers.
    #[serde(default)]
    pub conntrack: ConntrackStatus,
    /// The health checkers as a whole. Absent from older agents' answers.
    #[serde(default)]
    pub health_checks: HealthChecksStatus,
    /// The config file and its reloads. Absent from older agents' answers.
    #[serde(default)]
    pub config: ConfigStatus,
}

/// The config running, and how its last reload went.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// 1 for the file read at start, one more per applied reload.
    pub generation: u64,
    /// Whether the last reload (SIGHUP or `lb reload`) was applied; true
    /// before any.
    pub last_reload_successful: bool,
    /// When the config now running was applied (start or reload), in Unix seconds.
    pub last_reload_success_timestamp_seconds: f64,
}

/// The health checkers as a whole.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct HealthChecksStatus {
    /// Probes that may be in flight at once (from the descriptor budget).
    pub probe_slots: u64,
    /// Probes that could not run for a local reason (no descriptor, no
    /// buffer), since the agent started. None counted against a backend.
    pub local_errors: u64,
}

/// The connection table: occupancy, and what happened to its entries since
/// the program was loaded.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ConntrackStatus {
    /// Entries present: live flows, and idle ones not yet reused or evicted.
    /// Counted by walking the table, so up to a few seconds old.
    pub entries: u64,
    /// Entries the table has room for (`agent.conntrack_capacity`).
    pub capacity: u64,
    /// Keys inserted: new flows, and entries a reply put back.
    pub inserted: u64,
    /// Flows idle past their timeout, balanced anew at their next packet.
    pub expired: u64,
    /// TCP flows closed (FIN/RST) whose 5-tuple a new SYN reused before they expired.
    pub reopened: u64,
    /// LRU evictions, estimated as `inserted - entries`.
    pub evicted: u64,
    /// How long ago the count behind `entries` and each backend's
    /// `active_flows` began, in milliseconds (`lb backend wait-drained`
    /// trusts only a count that began after it did).
    #[serde(default)]
    pub counted_ms_ago: u64,
}

impl From<crate::dataplane::ConntrackStats> for ConntrackStatus {
    fn from(c: crate::dataplane::ConntrackStats) -> Self {
        use lb_common::stats::conntrack_event::{EXPIRED, INSERTED, REOPENED};
        ConntrackStatus {
            entries: c.entries,
            capacity: c.capacity,
            inserted: c.events[INSERTED as usize],
            expired: c.events[EXPIRED as usize],
            reopened: c.events[REOPENED as usize],
            evicted: c.evicted,
            counted_ms_ago: u64::try_from(c.counted_ago.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// One virtual service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub listen: String,
    pub protocol: String,
    /// `maglev` or `source-hash`. Absent from older agents' answers.
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    /// Backends up (healthy and taking flows when their weight is above 0).
    pub backends_up: usize,
    pub traffic: Traffic,
    pub backends: Vec<BackendStatus>,
    /// Packets that would have opened a flow, refused by the VIP's
    /// per-client limits (`[vip.limits]`); absent for a VIP without limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limited: Option<Limited>,
}

/// Refusals by each of a VIP's per-client limits, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limited {
    /// Over `new_connections_per_second` (and its burst).
    pub new_connections_per_second: u64,
    /// At `max_connections_per_client`.
    pub max_connections_per_client: u64,
}

/// One backend of one VIP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// Takes new flows only while no primary of the VIP is up with weight.
    /// Absent from older agents' answers.
    #[serde(default)]
    pub backup: bool,
    /// `up`, `down`, or `unknown` before its first health check.
    pub health: String,
    /// The last health check's outcome: `ok` or why it failed.
    pub last_check: Option<String>,
    pub traffic: Traffic,
    /// `ready`, `drain` (no new flows) or `maint` (down, flows moved), set at
    /// runtime with `lb backend`. Absent from older agents' answers.
    #[serde(default = "default_admin")]
    pub admin: String,
    /// The weight in `weight` was set at runtime (`lb backend weight`), not
    /// by the config file.
    #[serde(default)]
    pub weight_set_at_runtime: bool,
    /// Flows in the connection table pinned to it and not idle past their
    /// timeout, as of the last count (at most about 5 s old).
    #[serde(default)]
    pub active_flows: u64,
    /// Why it went down, while it is down: the active checks' reason, or
    /// passive health's (starting `passive:`). Absent while up, and from
    /// older agents' answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_reason: Option<String>,
    /// Its TCP handshakes and UDP unreachables as the data path counted
    /// them, since the program was loaded. Absent from older agents' answers.
    #[serde(default)]
    pub handshakes: Handshakes,
    /// Failed handshakes passive health counted against it while its VIP
    /// had `[vip.passive_health]` and it was up, since this agent started
    /// (or since its VIP last turned passive health on).
    #[serde(default)]
    pub passive_failures: u64,
}

/// A backend's handshakes (`lb_common::handshake`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshakes {
    /// SYNs forwarded to it.
    pub syns: u64,
    /// SYN+ACKs it answered.
    pub syn_acks: u64,
    /// RSTs it answered a SYN with.
    pub resets: u64,
    /// ICMP port or host unreachables quoting a UDP datagram to it.
    pub unreachables: u64,
}

impl From<lb_common::handshake::Handshakes> for Handshakes {
    fn from(h: lb_common::handshake::Handshakes) -> Self {
        Handshakes { syns: h.syns, syn_acks: h.syn_acks, resets: h.resets, unreachables: h.unreachables }
    }
}

fn default_admin() -> String {
    "ready".to_owned()
}

/// What agents from before schedulers used.
fn default_scheduler() -> String {
    "maglev".to_owned()
}

/// Traffic counters, summed over CPUs; both directions count.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rescheduled_flows: u64,
}

impl From<Counters> for Traffic {
    fn from(c: Counters) -> Self {
        Traffic { packets: c.packets, bytes: c.bytes, new_flows: c.new_flows, rescheduled_flows: c.rescheduled_flows }
    }
}

impl std::ops::AddAssign for Traffic {
    /// Wrapping, like the per-CPU sums the counters come from.
    fn add_assign(&mut self, t: Traffic) {
        self.packets = self.packets.wrapping_add(t.packets);
        self.bytes = self.bytes.wrapping_add(t.bytes);
        self.new_flows = self.new_flows.wrapping_add(t.new_flows);
        self.rescheduled_flows = self.rescheduled_flows.wrapping_add(t.rescheduled_flows);
    }
}

/// Packets the program returned for one reason.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerdictCount {
    pub reason: String,
    pub packets: u64,
    /// What the reason means (`lb_common::stats::reason::HELP`). Absent from
    /// older agents' answers.
    #[serde(default)]
    pub help: String,
}
