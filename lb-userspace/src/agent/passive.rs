//! The agent's side of passive health (`crate::health::passive`): every
//! [`SAMPLE_INTERVAL`] it reads each backend's handshake counters, feeds
//! them to the backend's window, marks down the backends whose window
//! reached `max_fails`, and has their checkers start over from down, so the
//! active checks bring them back through `rise`.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use super::AgentState;
use crate::{
    config::{Config, model::PassiveHealthConfig},
    control::balancer::AdminState,
    health::{
        Health,
        passive::{Reading, SAMPLE_INTERVAL},
    },
};

/// How often [`sample`] runs.
pub const INTERVAL: std::time::Duration = SAMPLE_INTERVAL;

/// Reads the counters of every backend of every VIP and marks down those
/// passive health condemns; returns their ids, whose checkers must start
/// over from down. Reads nothing while no VIP has `[vip.passive_health]`
/// and no window is left from one that had.
pub fn sample(state: &Mutex<AgentState>, config: &Config) -> Vec<u32> {
    let Ok(mut guard) = state.lock() else { return Vec::new() };
    let AgentState { balancer, maps, passive, down_reasons, .. } = &mut *guard;
    let configs: HashMap<&str, &PassiveHealthConfig> =
        config.vips.iter().filter_map(|v| v.passive_health.as_ref().map(|p| (v.name.as_str(), p))).collect();
    if configs.is_empty() && passive.is_empty() {
        return Vec::new();
    }
    let mut readings = Vec::new();
    // Only VIPs with passive health are read; the others' windows are
    // dropped, and a VIP that turns it on starts from a fresh baseline.
    for vip in balancer.vips() {
        let Some(config) = configs.get(vip.name).copied() else { continue };
        for b in &vip.backends {
            let Ok(counters) = maps.handshakes(b.backend_id) else { continue };
            // Only an up backend in service can be taken down.
            let judging = b.health == Health::Up && b.admin != AdminState::Maint;
            readings.push(Reading { backend_id: b.backend_id, config: Some(config), judging, counters });
        }
    }
    let condemned = passive.sample(Instant::now(), readings);
    let mut down = Vec::new();
    for (backend_id, reason) in condemned {
        let name = balancer.describe_backend(backend_id);
        match balancer.set_health(backend_id, Health::Down, maps) {
            Ok(change) => {
                tracing::warn!(backend = %name, %reason, slots = change.slots_written, "backend down");
                down_reasons.insert(backend_id, reason);
                down.push(backend_id);
            }
            Err(error) => tracing::error!(backend = %name, error = %format!("{error:#}"), "updating the maps failed"),
        }
    }
    down
}
