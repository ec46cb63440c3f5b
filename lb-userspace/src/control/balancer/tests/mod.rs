//! Tests of the balancer against [`FakeDataplane`], which checks the
//! readers' invariant after every call; by topic, with the builders and
//! checks they share here.

mod addresses;
mod adopt;
mod backups;
mod health;
mod install;
mod reload;
mod vips;

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use lb_common::{
    FAMILY_V4, FAMILY_V6,
    backend::{BACKEND_ID_NONE, BACKEND_STATE_DOWN, BACKEND_STATE_UP, BackendInfo},
    guard::{ADDR_ROLE_BACKEND, ADDR_ROLE_LOCAL, ServiceKey},
    limits::MAX_BACKENDS,
    vip::{VipInfo, VipKey, ring_base},
    vip_addr::{VIP_ADDR_TCP, VIP_ADDR_UDP, VipAddrKey, proto_bit},
};

use super::{
    AdminState, Balancer, Change, StateError,
    testing::{Call, FakeDataplane},
};
use crate::{
    config::model::{
        AgentConfig, BackendConfig, Config, HealthCheckConfig, HealthCheckKind, OnBackendDown, Protocol, Scheduler,
        VipConfig, XdpMode,
    },
    control::{
        maglev::{self, MaglevBackend},
        plan::Action,
    },
    health::Health,
};

const M: u32 = lb_common::limits::DEFAULT_RING_SIZE;

fn vip_key(listen: SocketAddr, protocol: Protocol) -> VipKey {
    VipKey::new(listen, protocol.number())
}

fn backend_info(address: SocketAddr, state: u8) -> BackendInfo {
    BackendInfo::new(address, state)
}
/// A smaller prime for tests that rebuild rings hundreds of times.
const SMALL_M: u32 = 4099;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

fn vip_config(name: &str, listen: &str, backends: &[(&str, u32)], kind: HealthCheckKind) -> VipConfig {
    VipConfig {
        name: name.to_owned(),
        listen: addr(listen),
        protocol: Protocol::Tcp,
        scheduler: Scheduler::Maglev,
        health_check: HealthCheckConfig {
            kind,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            port: None,
        },
        passive_health: None,
        limits: None,
        timeouts: Default::default(),
        on_backend_down: OnBackendDown::Reschedule,
        backends: backends
            .iter()
            .map(|&(a, weight)| BackendConfig { address: addr(a), weight, backup: false, health_check: None })
            .collect(),
    }
}

fn config(ring_size: u32, vips: Vec<VipConfig>) -> Config {
    Config {
        source: PathBuf::from("test.toml"),
        agent: AgentConfig {
            interfaces: vec!["veth-test".to_owned()],
            admin_listen: addr("127.0.0.1:9900"),
            xdp_mode: XdpMode::Native,
            conntrack_capacity: 1024,
            ring_size,
            max_vips: 4,
            max_vips_set: true,
            pin_dir: PathBuf::from("/sys/fs/bpf/lb-test"),
            control_socket: PathBuf::from("/run/lb-test/lb.sock"),
            control_group: None,
            control_listen: None,
            control_token_file: None,
            state_file: PathBuf::from("/var/lib/lb-test/state.json"),
        },
        announce: None,
        vips,
    }
}

/// One VIP with `n` equal backends, always up (no health checks).
fn equal_vip(n: usize) -> VipConfig {
    let addrs: Vec<String> = (0..n).map(|i| format!("198.18.2.{}:8080", i + 10)).collect();
    let backends: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
    vip_config("web", "198.18.0.10:80", &backends, HealthCheckKind::None)
}

/// `vip` with the backends at `positions` (0-based, config order) made backups.
fn with_backups(mut vip: VipConfig, positions: &[usize]) -> VipConfig {
    for &i in positions {
        if let Some(backend) = vip.backends.get_mut(i) {
            backend.backup = true;
        }
    }
    vip
}

fn balancer(config: &Config) -> Balancer {
    Balancer::new(config).unwrap_or_else(|e| panic!("config refused: {e}"))
}

fn installed(config: &Config) -> (Balancer, FakeDataplane) {
    let mut balancer = balancer(config);
    let mut dp = FakeDataplane::for_config(config);
    balancer.install(&mut dp).unwrap_or_else(|e| panic!("install failed: {e}"));
    (balancer, dp)
}

/// The verdict a health check sends: up or down.
fn health(up: bool) -> Health {
    if up { Health::Up } else { Health::Down }
}

fn set(balancer: &mut Balancer, dp: &mut FakeDataplane, backend_id: u32, up: bool) -> Change {
    balancer.set_health(backend_id, health(up), dp).unwrap_or_else(|e| panic!("set_health({backend_id}, {up}): {e}"))
}

/// The ring Maglev gives for the primaries of `vip_id` that are up with
/// weight, or if there are none, for its backups that are.
fn expected_ring(balancer: &Balancer, vip_id: u32) -> Vec<u32> {
    let vip = balancer.vip(vip_id).unwrap_or_else(|| panic!("no vip {vip_id}"));
    let available = |backup: bool| -> Vec<(u32, String, u32)> {
        vip.backends
            .iter()
            .filter(|b| b.backup == backup && b.health.is_up() && b.weight > 0)
            .map(|b| (b.backend_id, b.address.to_string(), b.weight))
            .collect()
    };
    let primaries = available(false);
    let keys = if primaries.is_empty() { available(true) } else { primaries };
    let members: Vec<MaglevBackend<'_>> =
        keys.iter().map(|(id, key, weight)| MaglevBackend { id: *id, key, weight: *weight }).collect();
    maglev::build_ring(balancer.ring_size(), &members)
}

/// The fake's maps must hold exactly the balancer's VIPs, `VIP_ADDRS` as
/// `VIPS` implies it, and each live ring must equal the shadow and what
/// Maglev prescribes.
fn assert_consistent(balancer: &Balancer, dp: &FakeDataplane) {
    let mut running: Vec<(VipKey, u32)> = balancer.vips().map(|v| (vip_key(v.listen, v.protocol), v.vip_id)).collect();
    let mut mapped: Vec<(VipKey, u32)> = dp.vips.iter().map(|(key, info)| (*key, info.vip_id)).collect();
    running.sort_by_key(|&(_, id)| id);
    mapped.sort_by_key(|&(_, id)| id);
    assert_eq!(mapped, running, "VIPS holds other vips than the balancer runs");
    assert_eq!(dp.vip_addrs, vip_addrs_of(dp.vips.keys()), "VIP_ADDRS differs from what VIPS holds");
    for vip in balancer.vips() {
        let key = vip_key(vip.listen, vip.protocol);
        let live = dp.live_ring(&key).unwrap_or_else(|| panic!("vip {} not in the fake", vip.name));
        assert_eq!(Some(live), balancer.live_ring(vip.vip_id), "vip {}: shadow differs from the map", vip.name);
        assert!(live == expected_ring(balancer, vip.vip_id).as_slice(), "vip {}: live ring is stale", vip.name);
        for b in &vip.backends {
            let state = if b.health.is_up() { BACKEND_STATE_UP } else { BACKEND_STATE_DOWN };
            assert_eq!(dp.backends.get(&b.backend_id), Some(&backend_info(b.address, state)));
            let slots = live.iter().filter(|&&id| id == b.backend_id).count();
            assert_eq!(b.ring_slots as usize, slots, "backend {}: ring_slots", b.backend_id);
        }
    }
}

/// `VIP_ADDRS` as it must be for `keys` in `VIPS`: per address, a bit per
/// protocol with a VIP there.
fn vip_addrs_of<'a>(keys: impl Iterator<Item = &'a VipKey>) -> HashMap<VipAddrKey, u32> {
    let mut addrs = HashMap::new();
    for key in keys {
        *addrs.entry(key.addr_key()).or_insert(0) |= proto_bit(key.proto);
    }
    addrs
}

fn fraction_changed(old: &[u32], new: &[u32]) -> f64 {
    maglev::ring_diff(old, new).len() as f64 / new.len() as f64
}

/// Backends of `key`'s live ring, deduplicated and sorted.
fn ring_members(dp: &FakeDataplane, key: &VipKey) -> Vec<u32> {
    let mut ids: Vec<u32> = dp.live_ring(key).unwrap_or_else(|| panic!("no live ring")).to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn state_of(dp: &FakeDataplane, backend_id: u32) -> Option<u8> {
    dp.backends.get(&backend_id).map(|b| b.state)
}

/// Two primaries (ids 1, 2) and one backup (id 3), no health checks.
fn primaries_and_a_backup() -> Config {
    config(
        SMALL_M,
        vec![with_backups(
            vip_config(
                "web",
                "198.18.0.10:80",
                &[("198.18.2.10:80", 1), ("198.18.2.11:80", 1), ("198.18.2.12:80", 1)],
                HealthCheckKind::None,
            ),
            &[2],
        )],
    )
}

fn reload(balancer: &mut Balancer, dp: &mut FakeDataplane, old: &Config, new: &Config) -> Change {
    let actions = crate::control::plan::reload(old, new).unwrap_or_else(|e| panic!("plan: {e}"));
    let change = balancer.apply_reload(&actions, dp).unwrap_or_else(|e| panic!("apply: {e}"));
    assert_consistent(balancer, dp);
    change
}

fn ids_of(balancer: &Balancer, vip_id: u32) -> Vec<(u32, String)> {
    balancer
        .vip(vip_id)
        .map(|v| v.backends.iter().map(|b| (b.backend_id, b.address.to_string())).collect())
        .unwrap_or_default()
}
