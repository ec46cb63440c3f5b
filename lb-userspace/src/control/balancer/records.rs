//! What the balancer keeps per VIP and per backend: the desired state, and
//! what the maps hold for it as last written (the shadows).

use std::net::SocketAddr;

use lb_common::{
    backend::{BACKEND_ID_NONE, BACKEND_STATE_DOWN, BACKEND_STATE_UP},
    vip::{VipInfo, VipKey},
};

use super::{AdminState, BackendView};
use crate::{
    config::model::{
        BackendConfig, HealthCheckConfig, LimitsConfig, OnBackendDown, Protocol, Scheduler, TimeoutsConfig, VipConfig,
    },
    health::Health,
};

/// A VIP: its config, its backends, and what `VIPS` and its two rings hold.
#[derive(Clone, Debug)]
pub(super) struct Vip {
    pub(super) vip_id: u32,
    pub(super) name: String,
    pub(super) listen: SocketAddr,
    pub(super) protocol: Protocol,
    pub(super) scheduler: Scheduler,
    pub(super) health_check: HealthCheckConfig,
    /// `[vip.limits]`, if any.
    pub(super) limits: Option<LimitsConfig>,
    /// `[vip.timeouts]`.
    pub(super) timeouts: TimeoutsConfig,
    pub(super) on_backend_down: OnBackendDown,
    pub(super) key: VipKey,
    pub(super) backend_ids: Vec<u32>,
    /// Backends removed by a reload: written `DOWN` once the ring no longer
    /// names them; their ids are never reused.
    pub(super) retired: Vec<u32>,
    /// What `VIPS` holds for it, as last written; `None` before its first
    /// publish.
    pub(super) live: Option<VipInfo>,
    /// What each generation holds in `MAGLEV`; empty when unknown (after a
    /// failed write, or in a reused id), which makes the next diff rewrite
    /// every slot.
    pub(super) rings: [Vec<u32>; 2],
    /// Its id was a removed VIP's, whose counts `LIMITED` still holds:
    /// zeroed before the first publish.
    pub(super) stale_stats: bool,
    /// Its last sync did not finish (or none ran yet): a reload syncs it
    /// again even if it changes nothing about it.
    pub(super) unsynced: bool,
}

/// A VIP removed by a reload, until the dataplane has forgotten it.
#[derive(Clone, Debug)]
pub(super) struct Removal {
    pub(super) vip_id: u32,
    pub(super) name: String,
    pub(super) key: VipKey,
    /// Whether its `VIPS` entry may still be there.
    pub(super) live: bool,
    /// Every backend it had, all retired: written `DOWN` once its entry is gone.
    pub(super) backend_ids: Vec<u32>,
}

/// A backend of one VIP (a backend serving two VIPs is two of these), and
/// what its `BACKENDS` and `BACKEND_SERVICES` entries hold.
#[derive(Clone, Debug)]
pub(super) struct Backend {
    pub(super) backend_id: u32,
    pub(super) vip_id: u32,
    pub(super) address: SocketAddr,
    /// Maglev identity: the address, so config order does not move flows.
    pub(super) key: String,
    /// The weight in force: the runtime override if any, else the config's.
    pub(super) weight: u32,
    /// The config file's weight.
    pub(super) config_weight: u32,
    /// A weight set at runtime (`lb backend weight`), kept until cleared.
    pub(super) weight_override: Option<u32>,
    /// Drain or maintenance, set at runtime, kept until `enable`.
    pub(super) admin: AdminState,
    /// Its VIP says `on_backend_down = "keep"`: down by its health checks,
    /// it stays `UP` in `BACKENDS` (out of the ring), so its flows stay.
    pub(super) keep_when_down: bool,
    pub(super) backup: bool,
    pub(super) health: Health,
    /// `BACKEND_STATE_*` last written; `None` before the first write or after
    /// a failed one.
    pub(super) written_state: Option<u8>,
    pub(super) ring_slots: u32,
    /// Removed by a reload: down for good, ignored by health events.
    pub(super) retired: bool,
    /// `[vip.backend.health_check]`: its own check, else its VIP's.
    pub(super) health_check: Option<HealthCheckConfig>,
    /// Its service (address, port, protocol) is shared with a backend of
    /// another VIP: `BACKEND_F_SHARED` in its `BACKENDS` entry.
    pub(super) shared: bool,
}

impl Backend {
    pub(super) fn new(backend_id: u32, vip_id: u32, config: &BackendConfig, health: Health) -> Self {
        Backend {
            backend_id,
            vip_id,
            address: config.address,
            key: config.address.to_string(),
            weight: config.weight,
            config_weight: config.weight,
            weight_override: None,
            admin: AdminState::Ready,
            keep_when_down: false,
            backup: config.backup,
            health,
            written_state: None,
            ring_slots: 0,
            retired: false,
            shared: false,
            health_check: config.health_check.clone(),
        }
    }

    /// The state `BACKENDS` must hold. Weight 0 or drain is still `UP`:
    /// such a backend takes no new flows but keeps its existing ones.
    /// Maintenance is `DOWN` whatever its health: its flows move.
    pub(super) fn wanted_state(&self) -> u8 {
        if self.admin == AdminState::Maint || self.retired {
            BACKEND_STATE_DOWN
        } else if self.keep_when_down && self.health == Health::Down {
            // Out of the ring (not available), but its flows stay.
            BACKEND_STATE_UP
        } else {
            self.health.backend_state()
        }
    }

    /// Whether it may take new flows: up, with weight, not drained or in maintenance.
    pub(super) fn available(&self) -> bool {
        self.health.is_up() && self.weight > 0 && self.admin == AdminState::Ready
    }

    /// Sets the runtime weight override (`None` clears it) and the weight in force.
    pub(super) fn set_weight_override(&mut self, weight: Option<u32>) {
        self.weight_override = weight;
        self.weight = weight.unwrap_or(self.config_weight);
    }

    /// A reload's new config weight; a runtime override stays in force.
    pub(super) fn set_config_weight(&mut self, weight: u32) {
        self.config_weight = weight;
        self.weight = self.weight_override.unwrap_or(weight);
    }

    /// Down for good: a reload removed it (or its VIP).
    pub(super) fn retire(&mut self) {
        self.health = Health::Down;
        self.retired = true;
        self.ring_slots = 0;
    }
}

impl Vip {
    /// `reused`: the id was a removed VIP's, so its rings and counters hold
    /// that VIP's state.
    pub(super) fn new(vip_id: u32, config: &VipConfig, backend_ids: Vec<u32>, ring_size: u32, reused: bool) -> Self {
        let rings = if reused {
            [Vec::new(), Vec::new()]
        } else {
            // The loader creates MAGLEV zeroed, so an id never used has both
            // rings all BACKEND_ID_NONE and zero slots need no write.
            // (Untouched zeroed Vecs cost no memory until written.)
            [vec![BACKEND_ID_NONE; ring_size as usize], vec![BACKEND_ID_NONE; ring_size as usize]]
        };
        Vip {
            vip_id,
            name: config.name.clone(),
            listen: config.listen,
            protocol: config.protocol,
            scheduler: config.scheduler,
            health_check: config.health_check.clone(),
            limits: config.limits.clone(),
            timeouts: config.timeouts,
            on_backend_down: config.on_backend_down,
            key: VipKey::new(config.listen, config.protocol.number()),
            backend_ids,
            retired: Vec::new(),
            live: None,
            rings,
            stale_stats: reused,
            unsynced: true,
        }
    }
}

impl Backend {
    pub(super) fn view(&self) -> BackendView {
        BackendView {
            backend_id: self.backend_id,
            vip_id: self.vip_id,
            address: self.address,
            weight: self.weight,
            backup: self.backup,
            health: self.health,
            admin: self.admin,
            weight_override: self.weight_override,
            ring_slots: self.ring_slots,
        }
    }
}

/// Index into `Balancer::backends`; id 0 maps past the end, so it is never found.
pub(super) fn backend_index(backend_id: u32) -> usize {
    (backend_id as usize).wrapping_sub(1)
}
