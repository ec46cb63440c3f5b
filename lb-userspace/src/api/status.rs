//! The status snapshot: what `/status` returns and `/metrics` renders.

use lb_common::stats::Counters;
use serde::{Deserialize, Serialize};

/// Everything an operator sees about the running balancer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub vips: Vec<VipStatus>,
    /// Packets per verdict reason since the program was loaded.
    pub verdicts: Vec<VerdictCount>,
}

/// One virtual service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub listen: String,
    pub protocol: String,
    /// Backends up (healthy and taking flows when their weight is above 0).
    pub backends_up: usize,
    pub traffic: Traffic,
    pub backends: Vec<BackendStatus>,
}

/// One backend of one VIP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// `up`, `down`, or `unknown` before its first health check.
    pub health: String,
    /// The last health check's outcome: `ok` or why it failed.
    pub last_check: Option<String>,
    pub traffic: Traffic,
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

/// Packets the program returned for one reason.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerdictCount {
    pub reason: String,
    pub packets: u64,
}
