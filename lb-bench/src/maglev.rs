//! Maglev tables: build time and map writes, through the agent's own code.
//!
//! For each ring size and backend count, every run measures:
//!
//! - `maglev_builder`: `maglev::build_ring` over all backends (a full
//!   build), then the rebuild without one backend and `ring_diff` against
//!   the first (its changed slots are the writes a minimal update needs);
//! - `maglev_control`: the control plane (`balancer::Balancer`) from a fresh
//!   start, against a counting dataplane and against the real kernel maps:
//!   `install`, the first backend going down, it coming back, and then
//!   another backend going down. The Balancer double-buffers each ring, so
//!   a change writes the differences against the generation packets are
//!   not reading, which is the ring from two changes ago.
//!
//! A backend count the control plane refuses (over `MAX_BACKENDS`) is
//! reported with the refusal, and only the builder is measured for it.

use std::{path::Path, time::Instant};

use anyhow::{Context as _, ensure};
use lb::{
    config::{Cidr, Config},
    control::{
        balancer::{Balancer, Change, StateError},
        maglev::{self, MaglevBackend},
    },
    dataplane::{Dataplane, DataplaneError, LoadOptions, Maps, Program},
    health::Health,
};
use lb_common::{
    backend::{BACKEND_ID_NONE, BackendInfo},
    client_limits::VipLimits,
    flow::{FlowTimeouts, ReplyNat},
    guard::{ServiceKey, SharedService},
    vip::{VipInfo, VipKey},
    vip_addr::VipAddrKey,
};
use serde_json::json;

use crate::emit;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backend counts (one VIP with this many backends).
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 1000, 10_000])]
    pub backends: Vec<usize>,
    /// Ring sizes (primes).
    #[arg(long, value_delimiter = ',', default_values_t = [65_537u32, 655_373])]
    pub rings: Vec<u32>,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
}

/// The `maglev` subcommand.
///
/// # Errors
/// When a ring size is not prime, or loading the program or a map write fails.
pub fn run(args: &Args) -> anyhow::Result<()> {
    for &ring in &args.rings {
        ensure!(maglev::is_prime(ring), "ring size {ring} is not prime");
        let mut kernel = KernelMaps::load(ring)?;
        for &count in &args.backends {
            let keys = backend_keys(count);
            let config = balancer_config(ring, &keys);
            if let Err(refusal) = &config {
                emit(
                    &json!({ "kind": "maglev_refused", "ring": ring, "backends": count, "reason": format!("{refusal:#}") }),
                );
            }
            for run in 0..args.runs {
                builder(ring, &keys, run);
                if let Ok(config) = &config {
                    control_plane(config, &mut Counting::default(), "counting", run)?;
                    control_plane(config, &mut kernel.maps, "kernel", run)?;
                }
            }
        }
    }
    Ok(())
}

/// `count` distinct backend addresses in 198.18.4.0 and up, as the config
/// writes them (the Balancer's Maglev keys are these strings).
fn backend_keys(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("198.18.{}.{}:8080", 4 + i / 250, i % 250 + 1)).collect()
}

/// One VIP over `keys`, no health checks (so every backend starts up), the
/// given ring size; refused as the agent would refuse it.
fn balancer_config(ring: u32, keys: &[String]) -> anyhow::Result<Config> {
    let mut text = format!(
        "[agent]\ninterfaces = [\"lbb-c\"]\nring_size = {ring}\n\n[[vip]]\nname = \"bench\"\nlisten = \"198.18.0.100:80\"\n[vip.health_check]\ntype = \"none\"\n"
    );
    for key in keys {
        text.push_str(&format!("[[vip.backend]]\naddress = \"{key}\"\n"));
    }
    let config = Config::parse(&text, Path::new("maglev-bench.toml"))?;
    Balancer::new(&config)?;
    Ok(config)
}

/// The builder alone: a full build, then a rebuild without the middle
/// backend and the diff between the two.
fn builder(ring: u32, keys: &[String], run: u32) {
    let all: Vec<MaglevBackend<'_>> =
        (1u32..).zip(keys).map(|(id, key)| MaglevBackend { id, key, weight: 1 }).collect();
    let gone = all.len() / 2;
    let fewer: Vec<MaglevBackend<'_>> = all.iter().enumerate().filter(|&(i, _)| i != gone).map(|(_, b)| *b).collect();

    let started = Instant::now();
    let full = maglev::build_ring(ring, &all);
    let build_ns = started.elapsed().as_nanos();
    let started = Instant::now();
    let after = maglev::build_ring(ring, &fewer);
    let changed = maglev::ring_diff(&full, &after);
    let diff_ns = started.elapsed().as_nanos();

    emit(&json!({
        "kind": "maglev_builder",
        "ring": ring,
        "backends": keys.len(),
        "run": run,
        "build_ns": u64::try_from(build_ns).unwrap_or(u64::MAX),
        "full_slots": full.iter().filter(|&&id| id != BACKEND_ID_NONE).count(),
        "rebuild_and_diff_ns": u64::try_from(diff_ns).unwrap_or(u64::MAX),
        "changed_slots": changed.len(),
    }));
}

/// A fresh Balancer through install, one backend down, it back up, and
/// another one down, each step timed and its writes counted.
fn control_plane<D: Reset>(config: &Config, dp: &mut D, dataplane: &'static str, run: u32) -> anyhow::Result<()> {
    dp.reset()?;
    let mut balancer = Balancer::new(config)?;
    let backends = config.vips.first().map_or(0, |vip| vip.backends.len());
    // Backend ids count from 1 in config order.
    let (first, second) = (u32::try_from(backends / 2)?.max(1), u32::try_from(backends / 3)?.max(1));
    let at = Step { dataplane, ring: config.agent.ring_size, backends, run };
    at.timed("install", dp, |dp| balancer.install(dp))?;
    at.timed("first_down", dp, |dp| balancer.set_health(first, Health::Down, dp))?;
    at.timed("back_up", dp, |dp| balancer.set_health(first, Health::Up, dp))?;
    at.timed("later_down", dp, |dp| balancer.set_health(second, Health::Down, dp))?;
    Ok(())
}

/// Where a control-plane step runs, for its output line.
struct Step {
    dataplane: &'static str,
    ring: u32,
    backends: usize,
    run: u32,
}

impl Step {
    /// Runs and times one step; where `dp` counts its writes, they must be
    /// what the balancer reports it wrote.
    fn timed<D: Reset>(
        &self,
        step: &str,
        dp: &mut D,
        apply: impl FnOnce(&mut D) -> Result<Change, StateError>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let change = apply(dp).with_context(|| format!("{step} with {} backends", self.backends))?;
        let ns = started.elapsed().as_nanos();
        if let Some(counted) = dp.take_counted() {
            ensure!(counted == change, "{step}: the balancer reports {change:?}, the dataplane counted {counted:?}");
        }
        emit(&json!({
            "kind": "maglev_control",
            "dataplane": self.dataplane,
            "ring": self.ring,
            "backends": self.backends,
            "run": self.run,
            "step": step,
            "ns": u64::try_from(ns).unwrap_or(u64::MAX),
            "slots_written": change.slots_written,
            "backends_written": change.backends_written,
            "rings_published": change.rings_published,
        }));
        Ok(())
    }
}

/// A dataplane that can be put back to its freshly loaded state, so every
/// run starts as the agent does.
trait Reset: Dataplane {
    fn reset(&mut self) -> anyhow::Result<()>;

    /// What it counted since the last call, if it counts.
    fn take_counted(&mut self) -> Option<Change> {
        None
    }
}

/// Counts the writes that cost (backend entries, ring slots, VIP
/// publishes) and keeps nothing: the control plane's own CPU time, and a
/// check of what it reports writing.
#[derive(Default)]
struct Counting(Change);

impl Dataplane for Counting {
    fn upsert_vip(&mut self, _key: VipKey, _info: VipInfo) -> Result<(), DataplaneError> {
        self.0.rings_published += 1;
        Ok(())
    }
    fn remove_vip(&mut self, _key: &VipKey) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_backend(&mut self, _backend_id: u32, _info: BackendInfo) -> Result<(), DataplaneError> {
        self.0.backends_written += 1;
        Ok(())
    }
    fn set_addr_filter(&mut self, _slot: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_vip_addr(&mut self, _key: VipAddrKey, _protos: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn write_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), DataplaneError> {
        self.0.slots_written += slots.len();
        Ok(())
    }
    fn reset_vip_stats(&mut self, _vip_id: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_addr_roles(&mut self, _key: VipAddrKey, _roles: u32) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_shared_service(&mut self, _key: ServiceKey, _list: SharedService) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_backend_service(&mut self, _key: ServiceKey, _nat: ReplyNat) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_vip_limits(&mut self, _vip_id: u32, _limits: VipLimits) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_vip_timeouts(&mut self, _vip_id: u32, _timeouts: FlowTimeouts) -> Result<(), DataplaneError> {
        Ok(())
    }
    fn set_limit_allow(&mut self, _vip_id: u32, _cidr: Cidr, _allowed: bool) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl Reset for Counting {
    fn reset(&mut self) -> anyhow::Result<()> {
        self.0 = Change::default();
        Ok(())
    }

    fn take_counted(&mut self) -> Option<Change> {
        Some(std::mem::take(&mut self.0))
    }
}

/// lb_xdp's real maps (loaded, not attached), sized for one VIP of `ring` slots.
struct KernelMaps {
    // Keeps the maps' program loaded (dropping it changes nothing for the
    // maps, which hold their own fds, but keeps the pair together).
    _program: Program,
    maps: KernelDataplane,
}

/// The real maps, and what to zero between runs.
struct KernelDataplane {
    maps: Maps,
    ring: u32,
}

impl KernelMaps {
    fn load(ring: u32) -> anyhow::Result<Self> {
        let mut program = Program::load(&LoadOptions { ring_size: ring, max_vips: 1, conntrack_capacity: 1024 })
            .context("loading lb_xdp for its maps")?;
        let maps = program.maps()?;
        Ok(Self { _program: program, maps: KernelDataplane { maps, ring } })
    }
}

impl Dataplane for KernelDataplane {
    fn upsert_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DataplaneError> {
        self.maps.upsert_vip(key, info)
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.maps.remove_vip(key)
    }
    fn set_backend(&mut self, backend_id: u32, info: BackendInfo) -> Result<(), DataplaneError> {
        self.maps.set_backend(backend_id, info)
    }
    fn set_addr_filter(&mut self, slot: u32) -> Result<(), DataplaneError> {
        self.maps.set_addr_filter(slot)
    }
    fn set_vip_addr(&mut self, key: VipAddrKey, protos: u32) -> Result<(), DataplaneError> {
        self.maps.set_vip_addr(key, protos)
    }
    fn write_ring_slots(&mut self, slots: &[(u32, u32)]) -> Result<(), DataplaneError> {
        self.maps.write_ring_slots(slots)
    }
    fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError> {
        self.maps.reset_vip_stats(vip_id)
    }
    fn set_addr_roles(&mut self, key: VipAddrKey, roles: u32) -> Result<(), DataplaneError> {
        self.maps.set_addr_roles(key, roles)
    }
    fn set_shared_service(&mut self, key: ServiceKey, list: SharedService) -> Result<(), DataplaneError> {
        self.maps.set_shared_service(key, list)
    }
    fn set_vip_limits(&mut self, vip_id: u32, limits: VipLimits) -> Result<(), DataplaneError> {
        self.maps.set_vip_limits(vip_id, limits)
    }
    fn set_vip_timeouts(&mut self, vip_id: u32, timeouts: FlowTimeouts) -> Result<(), DataplaneError> {
        self.maps.set_vip_timeouts(vip_id, timeouts)
    }
    fn set_limit_allow(&mut self, vip_id: u32, cidr: Cidr, allowed: bool) -> Result<(), DataplaneError> {
        self.maps.set_limit_allow(vip_id, cidr, allowed)
    }
    fn set_backend_service(&mut self, key: ServiceKey, nat: ReplyNat) -> Result<(), DataplaneError> {
        self.maps.set_backend_service(key, nat)
    }
}

impl Reset for KernelDataplane {
    /// Zeroes both rings, as a fresh load leaves them (the Balancer starts
    /// from that assumption); not timed.
    fn reset(&mut self) -> anyhow::Result<()> {
        let zeros: Vec<(u32, u32)> = (0..2 * self.ring).map(|slot| (slot, BACKEND_ID_NONE)).collect();
        self.maps.write_ring_slots(&zeros)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lb::control::balancer::testing::FakeDataplane;

    use super::*;

    impl Reset for FakeDataplane {
        /// Each run gets a fresh fake instead.
        fn reset(&mut self) -> anyhow::Result<()> {
            Ok(())
        }
    }

    /// The measured steps are what the agent does: the shared fake checks
    /// the readers' invariant after every write, and the counting dataplane
    /// sees exactly the writes the balancer reports.
    #[test]
    fn the_control_plane_steps_are_valid_and_counted() {
        let keys = backend_keys(10);
        let config = balancer_config(4099, &keys).expect("a valid config");
        control_plane(&config, &mut FakeDataplane::for_config(&config), "fake", 0).expect("against the fake");
        control_plane(&config, &mut Counting::default(), "counting", 0).expect("counted");
    }
}
