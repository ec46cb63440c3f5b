//! What the packet benchmark runs on: a gateway's links in the current
//! network namespace, `lb_xdp` loaded and filled by the agent's own control
//! plane, and the wrapper programs of `lb-bench-ebpf`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapInfo, ProgramArray},
    programs::{ProgramFd, TestRun as _, TestRunOptions, Xdp},
};
use lb::{
    config::Config,
    control::balancer::Balancer,
    dataplane::{LoadOptions, Maps, Program},
};
use lb_bench_ebpf::{EMBRYO_NONE, EMBRYO_SEED, FRAME_MAX, Frame};
use lb_common::{
    flow::{FlowKey, FlowState},
    map_names,
};

use crate::frames::{
    BACKEND_TCP_LIMITED_PORT, BACKEND_TCP_PORT, BACKEND_UDP_PORT, BACKENDS, CLIENT_MAC, Family, GW_BACKEND_MAC,
    GW_CLIENT_MAC, LIMITED_RATE, VIP_TCP_LIMITED_PORT, VIP_TCP_PORT, VIP_UDP_PORT, backend_mac,
};

/// The gateway's client-side link (requests arrive here).
pub const CLIENT_IF: &str = "lbb-c";
/// The gateway's backend-side link (replies arrive here).
pub const BACKEND_IF: &str = "lbb-b";

/// The benchmark programs, embedded at build time by `build.rs`.
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));
const RESTORE_PROGRAM: &str = "lb_xdp_bench_restore";
const VERDICT_PROGRAM: &str = "lb_xdp_bench_verdict";

/// XDP verdicts as the kernel numbers them.
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// Builds the gateway's links in the current namespace: a veth pair whose
/// ends carry the client-side and backend-side addresses, with permanent
/// neighbours for the client and the backends, so `bpf_fib_lookup`
/// answers with a next hop as on a real gateway. Refuses the host's
/// namespace: it must be one made for the benchmark.
///
/// # Errors
/// When run in the host's namespace or an `ip` command fails.
pub fn set_up_links() -> anyhow::Result<()> {
    ensure_private_netns()?;
    for (key, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv6/conf/all/forwarding", "1"),
        // Namespaces need not start with IPv6 on; set it before any link exists.
        ("net/ipv6/conf/all/disable_ipv6", "0"),
        ("net/ipv6/conf/default/disable_ipv6", "0"),
        // No address sits tentative (duplicate address detection) once added.
        ("net/ipv6/conf/default/accept_dad", "0"),
    ] {
        let path = Path::new("/proc/sys").join(key);
        std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
    }
    ip(&["link", "add", CLIENT_IF, "type", "veth", "peer", "name", BACKEND_IF])?;
    ip(&["link", "set", CLIENT_IF, "address", &mac_str(GW_CLIENT_MAC)])?;
    ip(&["link", "set", BACKEND_IF, "address", &mac_str(GW_BACKEND_MAC)])?;
    for dev in ["lo", CLIENT_IF, BACKEND_IF] {
        ip(&["link", "set", dev, "up"])?;
    }
    for (addr, dev) in [
        ("198.18.1.1/24", CLIENT_IF),
        ("198.18.2.1/24", BACKEND_IF),
        ("2001:db8:1::1/64", CLIENT_IF),
        ("2001:db8:2::1/64", BACKEND_IF),
    ] {
        ip(&["addr", "add", addr, "dev", dev, "nodad"])?;
    }
    for family in Family::ALL {
        ip(&[
            "neigh",
            "add",
            &family.client().to_string(),
            "lladdr",
            &mac_str(CLIENT_MAC),
            "dev",
            CLIENT_IF,
            "nud",
            "permanent",
        ])?;
        for i in 1..=BACKENDS {
            let addr = family.backend(i).to_string();
            ip(&[
                "neigh",
                "add",
                &addr,
                "lladdr",
                &mac_str(backend_mac(10 + i)),
                "dev",
                BACKEND_IF,
                "nud",
                "permanent",
            ])?;
        }
    }
    Ok(())
}

/// Fails unless the current network namespace is a fresh one: `lo` and
/// nothing else, so this can never add links next to real ones.
fn ensure_private_netns() -> anyhow::Result<()> {
    let names = interface_names()?;
    ensure!(
        names.iter().all(|n| n == "lo"),
        "refusing to add links to a network namespace that has interfaces ({}): run `lb-bench packet` in a \
         fresh one (`cargo xtask bench --only packet` does)",
        names.join(", ")
    );
    Ok(())
}

/// The interfaces of the current network namespace.
fn interface_names() -> anyhow::Result<Vec<String>> {
    // SAFETY: if_nameindex returns a list ended by a zero entry, or null.
    let list = unsafe { libc::if_nameindex() };
    ensure!(!list.is_null(), "if_nameindex: {}", std::io::Error::last_os_error());
    let mut names = Vec::new();
    let mut entry = list;
    // SAFETY: entries up to the terminating zero one are valid; each name
    // is a C string owned by the list, freed below.
    unsafe {
        while (*entry).if_index != 0 {
            names.push(std::ffi::CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned());
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(index != 0, "no interface {name}");
    Ok(index)
}

/// The agent's config for the benchmark gateway: a TCP and a UDP VIP per
/// family, three backends each, no health checks (backends start up), the
/// agent's defaults for everything else but `conntrack_capacity`; then,
/// after them (so the others' ids do not change), a TCP VIP per family with
/// per-client limits it never reaches, for the hostile cases.
fn config_text(conntrack_capacity: u32) -> String {
    let mut text = format!(
        "[agent]\ninterfaces = [\"{CLIENT_IF}\", \"{BACKEND_IF}\"]\nconntrack_capacity = {conntrack_capacity}\n"
    );
    for family in Family::ALL {
        for (proto, vip_port, backend_port) in
            [("tcp", VIP_TCP_PORT, BACKEND_TCP_PORT), ("udp", VIP_UDP_PORT, BACKEND_UDP_PORT)]
        {
            let vip = std::net::SocketAddr::new(family.vip(), vip_port);
            text.push_str(&format!(
                "\n[[vip]]\nname = \"{proto}-{}\"\nlisten = \"{vip}\"\nprotocol = \"{proto}\"\n[vip.health_check]\ntype = \"none\"\n",
                family.name()
            ));
            for i in 1..=BACKENDS {
                let backend = std::net::SocketAddr::new(family.backend(i), backend_port);
                text.push_str(&format!("[[vip.backend]]\naddress = \"{backend}\"\n"));
            }
        }
    }
    for family in Family::ALL {
        let vip = std::net::SocketAddr::new(family.vip(), VIP_TCP_LIMITED_PORT);
        text.push_str(&format!(
            "\n[[vip]]\nname = \"tcp-limited-{}\"\nlisten = \"{vip}\"\n[vip.health_check]\ntype = \"none\"\n\
             [vip.limits]\nnew_connections_per_second = {LIMITED_RATE}\nburst = {LIMITED_RATE}\n",
            family.name()
        ));
        for i in 1..=BACKENDS {
            let backend = std::net::SocketAddr::new(family.backend(i), BACKEND_TCP_LIMITED_PORT);
            text.push_str(&format!("[[vip.backend]]\naddress = \"{backend}\"\n"));
        }
    }
    text
}

/// `lb_xdp` loaded with maps sized and filled as the agent would for
/// [`config_text`].
pub struct Lb {
    pub program: Program,
    pub maps: Maps,
    pub client_if: u32,
    pub backend_if: u32,
}

impl Lb {
    /// Loads a fresh program with empty connection tables of `conntrack_capacity`.
    ///
    /// # Errors
    /// When the config is refused, the verifier rejects the program, or a
    /// map write fails.
    pub fn load(conntrack_capacity: u32) -> anyhow::Result<Self> {
        let config = Config::parse(&config_text(conntrack_capacity), Path::new("lb-bench.toml"))
            .context("the benchmark's config")?;
        let mut program = Program::load(&LoadOptions {
            ring_size: config.agent.ring_size,
            max_vips: config.agent.max_vips,
            conntrack_capacity: config.agent.conntrack_capacity,
        })
        .context("loading lb_xdp")?;
        let mut maps = program.maps().context("opening lb_xdp's maps")?;
        let mut balancer = Balancer::new(&config).context("the benchmark's control plane")?;
        balancer.install(&mut maps).context("filling lb_xdp's maps")?;
        Ok(Self { program, maps, client_if: ifindex(CLIENT_IF)?, backend_if: ifindex(BACKEND_IF)? })
    }

    /// Runs lb_xdp once on `frame`, outside the wrapper: returns its verdict
    /// and the frame as it left.
    ///
    /// # Errors
    /// When the test run fails.
    pub fn run_once(&mut self, frame: &[u8], ingress: u32) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = xdp_md(frame.len(), ingress)?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        };
        let result = self.program.xdp()?.test_run(opts).context("test run of lb_xdp")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs lb_xdp directly `repeat` times, outside the wrapper: valid only
    /// for a frame it leaves untouched (every iteration then sees the same
    /// bytes), which makes it a check on the wrapper's subtraction.
    ///
    /// # Errors
    /// When the test run fails.
    pub fn run_repeated(&mut self, frame: &[u8], ingress: u32, repeat: u32) -> anyhow::Result<Sample> {
        run(self.program.xdp()?, frame, ingress, repeat)
    }

    /// Entries in CONNTRACK now, counted by walking it (a syscall per
    /// entry: about a second per million).
    ///
    /// # Errors
    /// When the program's maps cannot be found or opened.
    pub fn table_entries(&mut self) -> anyhow::Result<u64> {
        count_keys::<FlowState>(self.map_id(map_names::CONNTRACK)?)
    }

    /// Zeroes `DIRECT_SEEN` for the benchmark's backends: after a plain
    /// `repeat` whose rewritten frames went on as a direct flow to a backend
    /// (client → backend service), so that no later case pays for the
    /// checks a recent direct flow forces on new flows and replies of that
    /// backend. Its `DIRECT_FLOWS` entries stay, unread while the backend
    /// has no recent direct flow.
    ///
    /// # Errors
    /// When the map cannot be found or written.
    pub fn forget_direct_flows(&mut self) -> anyhow::Result<()> {
        let id = self.map_id(map_names::DIRECT_SEEN)?;
        let mut seen = Array::<_, u64>::try_from(Map::Array(MapData::from_id(id)?))?;
        // Backend ids count from 1 in config order: 4 VIPs of BACKENDS
        // each, far below this bound.
        for backend_id in 0..256 {
            seen.set(backend_id, 0, 0).context("zeroing DIRECT_SEEN")?;
        }
        Ok(())
    }

    /// The id of the program's map `name`.
    fn map_id(&mut self, name: &str) -> anyhow::Result<u32> {
        let ids = self.program.xdp()?.info()?.map_ids()?.context("the kernel does not list a program's maps")?;
        for id in ids {
            if MapInfo::from_id(id)?.name_as_str() == Some(name) {
                return Ok(id);
            }
        }
        bail!("lb_xdp has no map {name}")
    }

    /// The program's file descriptor, for the wrapper's tail call.
    fn fd(&mut self) -> anyhow::Result<&ProgramFd> {
        Ok(self.program.xdp()?.fd()?)
    }
}

/// Keys in the connection-table map with id `id`, walked with a handle of our own.
fn count_keys<V: aya::Pod>(id: u32) -> anyhow::Result<u64> {
    let map = HashMap::<_, FlowKey, V>::try_from(Map::LruHashMap(MapData::from_id(id)?))?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// `struct xdp_md` for `ctx_in`: the frame spans `0..len`, arriving on `ingress`.
pub fn xdp_md(len: usize, ingress: u32) -> anyhow::Result<[u8; 24]> {
    let len = u32::try_from(len).context("frame length")?;
    let fields = [0u32, len, 0, ingress, 0, 0];
    let mut out = [0u8; 24];
    for (chunk, value) in out.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    Ok(out)
}

/// One BPF_PROG_TEST_RUN: the verdict of the last iteration and the
/// kernel's average time per iteration.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub verdict: u32,
    pub ns: u64,
}

const FRAME_SIZE: usize = size_of::<Frame>();

/// A bpffs instance of this process's own, mounted on a fresh directory
/// under the system's temporary directory: where `lb_xdp`'s `EMBRYOS` is
/// pinned for the moment it takes to load the wrapper onto it (aya 0.14
/// can reuse an existing map only through a pin). Unmounted and removed
/// when dropped.
pub struct BpfFs {
    dir: PathBuf,
}

impl BpfFs {
    /// Mounts it.
    ///
    /// # Errors
    /// When the directory cannot be made or the mount fails.
    pub fn mount() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-bench-bpffs-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let fs = Self { dir };
        let target = std::ffi::CString::new(fs.dir.as_os_str().as_encoded_bytes()).context("bpffs path")?;
        // SAFETY: valid C strings; no data argument.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        ensure!(rc == 0, "mounting a bpffs on {}: {}", fs.dir.display(), std::io::Error::last_os_error());
        Ok(fs)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string. Fails harmlessly if never mounted.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The wrapper and floor programs with their maps.
pub struct Wrapper {
    ebpf: Ebpf,
    frame: Array<MapData, [u8; FRAME_SIZE]>,
    target: ProgramArray<MapData>,
}

impl Wrapper {
    /// Loads both programs through the verifier, the wrapper's `EMBRYOS`
    /// being `lb`'s (pinned in `fs` for the load, unpinned after), so the
    /// wrapper can seed `lb`'s SYNs for first-ACK cases.
    ///
    /// # Errors
    /// When the object is refused or the map cannot be shared.
    pub fn load(lb: &mut Lb, fs: &BpfFs) -> anyhow::Result<Self> {
        let pin = fs.dir.join(map_names::EMBRYOS);
        MapData::from_id(lb.map_id(map_names::EMBRYOS)?)?
            .pin(&pin)
            .with_context(|| format!("pinning lb_xdp's EMBRYOS at {}", pin.display()))?;
        let loaded = EbpfLoader::new()
            .map_pin_path(map_names::EMBRYOS, pin.as_path())
            .load(BENCH_OBJECT)
            .context("loading lb-bench-ebpf");
        // The pin only served the load: the map lives on in both programs.
        std::fs::remove_file(&pin).with_context(|| format!("removing the pin {}", pin.display()))?;
        let mut ebpf = loaded?;
        for name in [RESTORE_PROGRAM, VERDICT_PROGRAM] {
            program(&mut ebpf, name)?.load().with_context(|| format!("the kernel refused {name}"))?;
        }
        let frame = ebpf.take_map("FRAME").context("lb-bench-ebpf has no FRAME map")?.try_into()?;
        let target = ebpf.take_map("TARGET").context("lb-bench-ebpf has no TARGET map")?.try_into()?;
        Ok(Self { ebpf, frame, target })
    }

    /// Sets the frame every iteration starts from, how it varies, and
    /// whether each varied flow's SYN is seeded first (`first_ack`); the
    /// iteration counter carries on, so no run repeats an earlier flow.
    ///
    /// # Errors
    /// When the frame is too long or the map write fails.
    pub fn set_frame(&mut self, bytes: &[u8], vary: u32, first_ack: bool) -> anyhow::Result<()> {
        ensure!(
            !bytes.is_empty() && bytes.len() <= FRAME_MAX,
            "frame of {} bytes does not fit the wrapper",
            bytes.len()
        );
        let raw = self.frame.get(&0, 0)?;
        let mut frame: Frame = bytemuck::pod_read_unaligned(&raw);
        frame.len = u32::try_from(bytes.len())?;
        frame.vary = vary;
        frame.embryo = if first_ack { EMBRYO_SEED } else { EMBRYO_NONE };
        frame.bytes = [0; FRAME_MAX];
        frame.bytes[..bytes.len()].copy_from_slice(bytes);
        let raw: [u8; FRAME_SIZE] = bytemuck::bytes_of(&frame).try_into()?;
        self.frame.set(0, raw, 0)?;
        Ok(())
    }

    /// Points the wrapper's tail call at lb_xdp.
    ///
    /// # Errors
    /// When the kernel refuses the program in the array.
    pub fn target_lb(&mut self, lb: &mut Lb) -> anyhow::Result<()> {
        self.target.set(0, lb.fd()?, 0).context("putting lb_xdp in the wrapper's TARGET")
    }

    /// Points the wrapper's tail call at the verdict-only program, to
    /// measure the wrapper itself.
    ///
    /// # Errors
    /// When the kernel refuses the program in the array.
    pub fn target_floor(&mut self) -> anyhow::Result<()> {
        let fd = program(&mut self.ebpf, VERDICT_PROGRAM)?.fd()?;
        self.target.set(0, fd, 0).context("putting the verdict-only program in TARGET")
    }

    /// Runs the wrapper (and whatever it tail-calls) `repeat` times.
    ///
    /// # Errors
    /// When the test run fails.
    pub fn run_wrapped(&mut self, frame: &[u8], ingress: u32, repeat: u32) -> anyhow::Result<Sample> {
        run(program(&mut self.ebpf, RESTORE_PROGRAM)?, frame, ingress, repeat)
    }

    /// Runs the verdict-only program directly `repeat` times: the floor.
    ///
    /// # Errors
    /// When the test run fails.
    pub fn run_floor(&mut self, frame: &[u8], ingress: u32, repeat: u32) -> anyhow::Result<Sample> {
        run(program(&mut self.ebpf, VERDICT_PROGRAM)?, frame, ingress, repeat)
    }

    /// Size of each program as the JIT left it, in bytes.
    pub fn jited_sizes(&mut self) -> anyhow::Result<Vec<(&'static str, u32)>> {
        [RESTORE_PROGRAM, VERDICT_PROGRAM]
            .into_iter()
            .map(|name| Ok((name, program(&mut self.ebpf, name)?.info()?.size_jitted())))
            .collect()
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let program = ebpf.program_mut(name).with_context(|| format!("lb-bench-ebpf has no program {name}"))?;
    program.try_into().with_context(|| format!("{name} is not an XDP program"))
}

fn run(program: &mut Xdp, frame: &[u8], ingress: u32, repeat: u32) -> anyhow::Result<Sample> {
    let ctx = xdp_md(frame.len(), ingress)?;
    let opts = TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), repeat, ..TestRunOptions::default() };
    let result = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    let ns = u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX);
    Ok(Sample { verdict: result.return_value, ns })
}
