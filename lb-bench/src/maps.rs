//! A running agent's BPF maps: what the kernel charges for each, and
//! tracked flows written into its connection table.
//!
//! The maps are found through the process's file descriptors:
//! `/proc/<pid>/fdinfo/<fd>` of a BPF map holds its `map_id`, `map_type`,
//! `max_entries` and `memlock` (the bytes the kernel charges for it: for
//! preallocated hash maps, the whole capacity, filled or not). The names
//! come from the kernel's map info by id.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{HashMap, Map, MapData, MapInfo};
use lb_bench_ebpf::v4_source;
use lb_common::{
    PROTO_TCP,
    flow::{FlowKey, FlowState},
    map_names,
};
use serde_json::json;

use crate::emit;

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The process whose maps to list (the agent).
    #[arg(long)]
    pub pid: u32,
}

#[derive(Debug, clap::Args)]
pub struct FillArgs {
    /// The agent whose CONNTRACK to fill.
    #[arg(long)]
    pub pid: u32,
    /// Flows to write (each one entry in both maps).
    #[arg(long)]
    pub flows: u32,
    /// The IPv4 TCP VIP the flows are for (`address:port`).
    #[arg(long)]
    pub vip: SocketAddr,
    /// Its id in the agent (VIPs count from 1 in config order).
    #[arg(long, default_value_t = 1)]
    pub vip_id: u32,
    /// The VIP's backends in config order; flows are spread over them and
    /// take ids from 1 in this order.
    #[arg(long = "backend", required = true)]
    pub backends: Vec<SocketAddr>,
}

/// One BPF map as `/proc/<pid>/fdinfo` shows it.
#[derive(Debug, Default, Clone)]
struct FdInfo {
    map_type: u32,
    max_entries: u64,
    key_size: u64,
    value_size: u64,
    memlock: u64,
}

/// The `maps` subcommand: one line per map of the process.
///
/// # Errors
/// When the process's fdinfo cannot be read.
pub fn list(args: &ListArgs) -> anyhow::Result<()> {
    for (id, info) in maps_of(args.pid)? {
        let name = MapInfo::from_id(id).ok().and_then(|m| m.name_as_str().map(str::to_owned)).unwrap_or_default();
        emit(&json!({
            "kind": "map",
            "id": id,
            "name": name,
            "map_type": info.map_type,
            "max_entries": info.max_entries,
            "key_size": info.key_size,
            "value_size": info.value_size,
            "memlock": info.memlock,
        }));
    }
    Ok(())
}

/// The BPF maps open in process `pid`, by map id (a map open twice counts once).
fn maps_of(pid: u32) -> anyhow::Result<BTreeMap<u32, FdInfo>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut maps = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = entry.with_context(|| format!("reading {dir}"))?.path();
        // An fd may close while we read; skip it then.
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if let Some((id, info)) = parse_fdinfo(&text) {
            maps.insert(id, info);
        }
    }
    Ok(maps)
}

/// A map's id and fields from one fdinfo file; `None` if it is not a BPF map.
fn parse_fdinfo(text: &str) -> Option<(u32, FdInfo)> {
    let mut id = None;
    let mut info = FdInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key {
            "map_id" => id = value.parse().ok(),
            "map_type" => info.map_type = value.parse().ok()?,
            "max_entries" => info.max_entries = value.parse().ok()?,
            "key_size" => info.key_size = value.parse().ok()?,
            "value_size" => info.value_size = value.parse().ok()?,
            "memlock" => info.memlock = value.parse().ok()?,
            _ => {}
        }
    }
    Some((id?, info))
}

/// The `fill-flows` subcommand: `flows` client → VIP flows, spread over
/// the backends, written into the agent's CONNTRACK as the program would
/// have written them (replies need no state of their own).
///
/// # Errors
/// When the agent's maps cannot be found or a write fails (e.g. the flows
/// do not fit).
pub fn fill(args: &FillArgs) -> anyhow::Result<()> {
    let IpAddr::V4(vip) = args.vip.ip() else { bail!("--vip must be IPv4") };
    ensure!(args.backends.iter().all(SocketAddr::is_ipv4), "--backend must be IPv4");
    let conntrack_id = connection_table_id(args.pid)?;
    let mut conntrack = HashMap::<_, FlowKey, FlowState>::try_from(Map::LruHashMap(MapData::from_id(conntrack_id)?))?;
    let now = monotonic_ns()?;
    let started = Instant::now();
    for i in 0..args.flows {
        let (client, client_port) = v4_source(i);
        let slot = i as usize % args.backends.len();
        let backend_id = u32::try_from(slot + 1)?;
        let forward = flow_key(client, client_port, u32::from(vip), args.vip.port());
        let state =
            FlowState { backend_id, vip_id: args.vip_id, last_seen_ns: now, flags: 0, timeouts: Default::default() };
        conntrack.insert(forward, state, 0).context("writing CONNTRACK")?;
    }
    emit(&json!({ "kind": "filled", "flows": args.flows, "seconds": started.elapsed().as_secs_f64() }));
    Ok(())
}

/// The id of the CONNTRACK map process `pid` holds.
fn connection_table_id(pid: u32) -> anyhow::Result<u32> {
    for id in maps_of(pid)?.into_keys() {
        if MapInfo::from_id(id)?.name_as_str() == Some(map_names::CONNTRACK) {
            return Ok(id);
        }
    }
    bail!("process {pid} holds no CONNTRACK map")
}

/// A TCP IPv4 flow key; addresses and ports in host order here, stored in
/// network order as the program reads them off the wire.
fn flow_key(src: u32, sport: u16, dst: u32, dport: u16) -> FlowKey {
    FlowKey::new((Ipv4Addr::from(src), sport).into(), (Ipv4Addr::from(dst), dport).into(), PROTO_TCP)
}

/// CLOCK_MONOTONIC now: at most a tick ahead of the coarse clock the program
/// reads (`bpf_ktime_get_coarse_ns`), which counts as idle 0: the flows look
/// freshly active to the program.
fn monotonic_ns() -> anyhow::Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ensure!(rc == 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Ok(u64::try_from(ts.tv_sec)? * 1_000_000_000 + u64::try_from(ts.tv_nsec)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_map() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2063\nmap_type:\t9\nkey_size:\t40\nvalue_size:\t24\n\
                    max_entries:\t1048576\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t109051904\nmap_id:\t42\nfrozen:\t0\n";
        let (id, info) = parse_fdinfo(text).expect("a map");
        assert_eq!((id, info.map_type, info.max_entries, info.memlock), (42, 9, 1_048_576, 109_051_904));
    }

    #[test]
    fn fdinfo_of_a_file_is_not_a_map() {
        assert!(parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t7\n").is_none());
    }
}
