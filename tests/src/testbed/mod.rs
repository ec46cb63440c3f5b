//! A throwaway network of namespaces for end-to-end tests and the demo.
//!
//! ```text
//!  client ns                   gateway ns                                  switch ns
//!  <id>c 198.18.1.2/24 ─────── <id>gc 198.18.1.1/24                        bridge <id>br
//!        2001:db8:1::2/64            2001:db8:1::1/64
//!  default via 198.18.1.1      <id>gb 198.18.2.1/24 ────────────────────── <id>sg (port)
//!      and via 2001:db8:1::1         2001:db8:2::1/64                      <id>s1 (port) ──┐
//!                              ip_forward=1, rp_filter=0,                  <id>s2 (port) ──┼─ …
//!                              ipv6 forwarding=1                                           │
//!                              (the load balancer runs here)                               │
//!                                                                                          │
//!  backend-i ns (i = 1..N):  <id>b<i> 198.18.2.(10+i)/24, 2001:db8:2::(10+i)/64  ──────────┘
//!                            default via 198.18.2.1 and via 2001:db8:2::1
//!                            lb-testbed-backend --name b<i>, http [::]:8080, udp [::]:8081
//! ```
//!
//! Every namespace is dual-stack. A backend's IPv6 host part is its IPv4 last
//! octet written as hex digits (b1 is 198.18.2.11 and 2001:db8:2::11, b99 is
//! 198.18.2.109 and 2001:db8:2::109), so the two read alike. The backends
//! listen on `[::]` with `net.ipv6.bindv6only=0`, so one socket serves both
//! families.
//!
//! IPv6 is set up explicitly in each namespace rather than inherited:
//! `disable_ipv6=0`, and `accept_dad=0` before any link exists, so that no
//! address (link-local ones included) sits tentative for the 1-2 s that
//! duplicate address detection takes, during which the kernel neither uses
//! it nor sends neighbour solicitations from it; the global addresses are
//! also added with `nodad`.
//!
//! `<id>` is `t<pid>x<n>`: interface names are that plus a role (`c`, `gc`, `gb`, `sg`, `br`,
//! `s<i>`, `b<i>`), namespaces `lbt<pid>x<n>-<role>`, so testbeds in parallel,
//! in one process or several, never collide. Each veth is created directly
//! between its two namespaces and never exists in the host namespace.
//!
//! The [`VIP`] (198.18.0.100, tcp [`VIP_HTTP_PORT`], udp [`VIP_UDP_PORT`]) and
//! the [`VIP6`] (2001:db8::100, same ports) are owned by nobody: the client
//! reaches them through its default routes to the gateway, where the load
//! balancer's XDP program rewrites them. Without the load balancer, traffic
//! to them fails.
//!
//! For XDP_REDIRECT between the gateway's veths, the peers that receive
//! redirected frames (the client's veth and the switch port facing the
//! gateway) have GRO on, which gives them NAPI; without it redirected frames
//! vanish. Transmit checksum offload is off on the client's, backends' and
//! gateway's veths, so packets rewritten by XDP carry full checksums.
//!
//! Dropping the [`Testbed`] stops its backends and deletes its namespaces
//! (which deletes the veths and the bridge), also when a test panics or
//! construction failed half-way. A watchdog process does the same if this
//! process dies without unwinding (Ctrl-C, SIGKILL).

pub mod client;
mod far_client;
mod netns;
pub mod raw;
mod scratch;

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail, ensure};
pub use client::{HttpResponse, Spread};
pub use far_client::{FAR_CLIENT_ADDR, FAR_CLIENT_ADDR6};
pub use netns::{ChildGuard, Namespace};
use netns::{Reaper, ip};
pub use scratch::ScratchNamespace;

/// The virtual IP the load balancer serves; no namespace owns it.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// TCP (HTTP) port of the VIP.
pub const VIP_HTTP_PORT: u16 = 80;
/// UDP port of the VIP.
pub const VIP_UDP_PORT: u16 = 5353;
/// TCP port each backend serves HTTP on.
pub const BACKEND_HTTP_PORT: u16 = 8080;
/// UDP port each backend echoes on.
pub const BACKEND_UDP_PORT: u16 = 8081;
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The gateway's address on the client side (the client's default route).
pub const GATEWAY_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The gateway's address on the backend side (the backends' default route).
pub const GATEWAY_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// Prefix length of both subnets.
pub const PREFIX_LEN: u8 = 24;
/// The IPv6 virtual IP, served on the same ports as [`VIP`]; no namespace owns it.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
/// The client's IPv6 address.
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The gateway's IPv6 address on the client side (the client's IPv6 default route).
pub const GATEWAY_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The gateway's IPv6 address on the backend side (the backends' IPv6 default route).
pub const GATEWAY_BACKEND_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// Prefix length of both IPv6 subnets.
pub const PREFIX_LEN6: u8 = 64;
/// Most backends a testbed can have (addresses 198.18.2.11 to .109, and
/// interface names stay within 15 bytes).
pub const MAX_BACKENDS: usize = 99;
/// How long a backend may take to print `listening`.
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-process testbed counter, half of the unique name.
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
/// Serialises `ip netns add`: the first calls in a process race to set up
/// the `/run/netns` mount.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Options for [`Testbed`]; start with [`Testbed::builder`].
#[derive(Debug, Clone)]
pub struct TestbedBuilder {
    backends: usize,
    backend_bin: Option<PathBuf>,
}

impl TestbedBuilder {
    /// Number of backends, 0 to [`MAX_BACKENDS`] (default 3).
    #[must_use]
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// Path of `lb-testbed-backend`; default [`crate::backend_bin`].
    #[must_use]
    pub fn backend_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.backend_bin = Some(path.into());
        self
    }

    /// Creates the namespaces, links, addresses and routes, and starts the
    /// backends (each has printed `listening` when this returns).
    ///
    /// # Errors
    ///
    /// When not root, the backend binary is missing, or any step fails;
    /// whatever was made so far is removed again.
    pub fn build(self) -> anyhow::Result<Testbed> {
        ensure!(self.backends <= MAX_BACKENDS, "at most {MAX_BACKENDS} backends, not {}", self.backends);
        crate::require_root()?;
        let backend_bin = match self.backend_bin {
            Some(path) => path,
            None => crate::backend_bin()?,
        };
        let id = format!("{}x{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let ifname = |role: &str| -> anyhow::Result<String> {
            let name = format!("t{id}{role}");
            // IFNAMSIZ is 16 with the NUL.
            ensure!(name.len() <= 15, "interface name {name} is longer than 15 bytes");
            Ok(name)
        };
        let ns = |role: &str| Namespace::new(format!("lbt{id}-{role}"));
        let backends = (1..=self.backends)
            .map(|i| {
                Ok(Backend {
                    ns: ns(&format!("b{i}")),
                    ifname: ifname(&format!("b{i}"))?,
                    switch_port: ifname(&format!("s{i}"))?,
                    process: Mutex::new(None),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let mut testbed = Testbed {
            client: ns("client"),
            gateway: ns("gw"),
            switch: ns("sw"),
            client_if: ifname("c")?,
            gateway_client_if: ifname("gc")?,
            gateway_backend_if: ifname("gb")?,
            switch_gateway_port: ifname("sg")?,
            bridge: ifname("br")?,
            backends,
            backend_bin,
            id,
            created: Vec::new(),
            reaper: Some(Reaper::spawn()?),
            far_client: None,
        };
        // On error, dropping `testbed` removes what exists so far.
        testbed.set_up().with_context(|| format!("setting up testbed {}", testbed.id))?;
        Ok(testbed)
    }
}

/// One backend's namespace, links and server process.
#[derive(Debug)]
struct Backend {
    ns: Namespace,
    ifname: String,
    switch_port: String,
    process: Mutex<Option<ChildGuard>>,
}

/// A client, a gateway, a switch (bridge) and N backends, each in its own
/// network namespace; see the [module docs](self) for the picture.
///
/// Backends are numbered from 1, as their names (`b1`, `b2`, …); accessors
/// taking `i` panic outside `1..=backend_count()`.
///
/// Drop it after any [`ChildGuard`] running inside its namespaces (declare
/// such guards after the testbed, or drop them first); processes still left
/// in its namespaces when it drops are killed, since they would keep the
/// namespaces alive.
///
/// ```no_run
/// use lb_tests::{Spread, Testbed};
///
/// let testbed = Testbed::new(3)?;
/// let results = testbed.client_requests(testbed.backend_http(1), 10, true);
/// assert_eq!(Spread::of(&results).count("b1"), 10);
/// # anyhow::Ok(())
/// ```
#[derive(Debug)]
pub struct Testbed {
    id: String,
    client: Namespace,
    gateway: Namespace,
    switch: Namespace,
    client_if: String,
    gateway_client_if: String,
    gateway_backend_if: String,
    switch_gateway_port: String,
    bridge: String,
    backends: Vec<Backend>,
    backend_bin: PathBuf,
    /// Namespaces that exist, in creation order; Drop deletes exactly these.
    created: Vec<Namespace>,
    reaper: Option<Reaper>,
    /// See [`Testbed::add_far_client`].
    far_client: Option<Namespace>,
}

impl Testbed {
    /// Builder with 3 backends and the default backend binary.
    #[must_use]
    pub fn builder() -> TestbedBuilder {
        TestbedBuilder { backends: 3, backend_bin: None }
    }

    /// A testbed with `backends` backends; see [`TestbedBuilder::build`].
    ///
    /// # Errors
    ///
    /// As [`TestbedBuilder::build`].
    pub fn new(backends: usize) -> anyhow::Result<Self> {
        Self::builder().backends(backends).build()
    }

    fn set_up(&mut self) -> anyhow::Result<()> {
        let all: Vec<Namespace> = [&self.client, &self.gateway, &self.switch]
            .into_iter()
            .cloned()
            .chain(self.backends.iter().map(|b| b.ns.clone()))
            .collect();
        for ns in all {
            {
                let _serial = lock(&NETNS_ADD);
                ip(&["netns", "add", ns.name()])?;
            }
            self.created.push(ns.clone());
            if let Some(reaper) = &mut self.reaper {
                reaper.watch(&ns)?;
            }
            ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
            enable_ipv6(&ns)?;
        }

        let (client, gateway, switch) = (self.client.name(), self.gateway.name(), self.switch.name());
        let veth = |ns_a: &str, a: &str, ns_b: &str, b: &str| {
            ip(&["-n", ns_a, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b])
        };
        veth(client, &self.client_if, gateway, &self.gateway_client_if)?;
        veth(gateway, &self.gateway_backend_if, switch, &self.switch_gateway_port)?;
        ip(&["-n", switch, "link", "add", &self.bridge, "type", "bridge"])?;
        for b in &self.backends {
            veth(b.ns.name(), &b.ifname, switch, &b.switch_port)?;
        }

        // Links made in a namespace take its `default` settings; set them on
        // each link too, in case a peer was set up by its creator's.
        for (ns, dev) in self.links() {
            ns.set_sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")?;
            ns.set_sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
        }

        // Gateway: a router that must not drop asymmetric or rewritten flows.
        self.gateway.set_sysctl("net.ipv4.ip_forward", "1")?;
        // IPv6 has no rp_filter; forwarding is all it needs.
        self.gateway.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // One [::] socket per backend port serves IPv4 too (mapped addresses).
        for b in &self.backends {
            b.ns.set_sysctl("net.ipv6.bindv6only", "0")?;
        }
        for dev in ["all", "default", &self.gateway_client_if, &self.gateway_backend_if] {
            self.gateway.set_sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        }

        // NAPI (via GRO) on the receivers of redirected frames; no partial
        // checksums from senders (see the module docs).
        self.client.exec_ok(&["ethtool", "-K", &self.client_if, "tx", "off", "gro", "on"])?;
        self.gateway.exec_ok(&["ethtool", "-K", &self.gateway_client_if, "tx", "off"])?;
        self.gateway.exec_ok(&["ethtool", "-K", &self.gateway_backend_if, "tx", "off"])?;
        self.switch.exec_ok(&["ethtool", "-K", &self.switch_gateway_port, "gro", "on"])?;
        for b in &self.backends {
            b.ns.exec_ok(&["ethtool", "-K", &b.ifname, "tx", "off"])?;
        }

        for (ns, dev, v4, v6) in [
            (client, &self.client_if, CLIENT_ADDR, CLIENT_ADDR6),
            (gateway, &self.gateway_client_if, GATEWAY_CLIENT_ADDR, GATEWAY_CLIENT_ADDR6),
            (gateway, &self.gateway_backend_if, GATEWAY_BACKEND_ADDR, GATEWAY_BACKEND_ADDR6),
        ] {
            add_addresses(ns, dev, v4, v6)?;
        }
        for (i, b) in self.backends.iter().enumerate() {
            add_addresses(b.ns.name(), &b.ifname, backend_addr_of(i + 1), backend_addr6_of(i + 1))?;
        }

        ip(&["-n", switch, "link", "set", &self.bridge, "up"])?;
        for port in std::iter::once(&self.switch_gateway_port).chain(self.backends.iter().map(|b| &b.switch_port)) {
            ip(&["-n", switch, "link", "set", port, "master", &self.bridge, "up"])?;
        }
        ip(&["-n", client, "link", "set", &self.client_if, "up"])?;
        ip(&["-n", gateway, "link", "set", &self.gateway_client_if, "up"])?;
        ip(&["-n", gateway, "link", "set", &self.gateway_backend_if, "up"])?;
        for b in &self.backends {
            ip(&["-n", b.ns.name(), "link", "set", &b.ifname, "up"])?;
        }

        add_default_routes(client, GATEWAY_CLIENT_ADDR, GATEWAY_CLIENT_ADDR6)?;
        for b in &self.backends {
            add_default_routes(b.ns.name(), GATEWAY_BACKEND_ADDR, GATEWAY_BACKEND_ADDR6)?;
        }

        for i in 1..=self.backends.len() {
            self.start_backend(i)?;
        }
        Ok(())
    }

    /// Every veth end with its namespace (the bridge's ports carry no addresses
    /// but get the same settings, so nothing differs by accident).
    fn links(&self) -> Vec<(&Namespace, &str)> {
        let mut links = vec![
            (&self.client, self.client_if.as_str()),
            (&self.gateway, self.gateway_client_if.as_str()),
            (&self.gateway, self.gateway_backend_if.as_str()),
            (&self.switch, self.switch_gateway_port.as_str()),
        ];
        for b in &self.backends {
            links.push((&b.ns, b.ifname.as_str()));
            links.push((&self.switch, b.switch_port.as_str()));
        }
        links
    }

    /// This testbed's unique id, `<pid>x<n>`.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The client namespace.
    #[must_use]
    pub fn client(&self) -> &Namespace {
        &self.client
    }

    /// The gateway namespace, where the load balancer runs.
    #[must_use]
    pub fn gateway(&self) -> &Namespace {
        &self.gateway
    }

    /// The switch namespace, which holds the bridge.
    #[must_use]
    pub fn switch(&self) -> &Namespace {
        &self.switch
    }

    /// Backend `i`'s namespace.
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_ns(&self, i: usize) -> &Namespace {
        &self.backend(i).ns
    }

    /// Every namespace of the testbed, client first.
    #[must_use]
    pub fn namespaces(&self) -> Vec<&Namespace> {
        [&self.client, &self.gateway, &self.switch].into_iter().chain(self.backends.iter().map(|b| &b.ns)).collect()
    }

    /// The client's veth (in the client namespace).
    #[must_use]
    pub fn client_if(&self) -> &str {
        &self.client_if
    }

    /// The gateway's client-facing veth (in the gateway namespace).
    #[must_use]
    pub fn gateway_client_if(&self) -> &str {
        &self.gateway_client_if
    }

    /// The gateway's backend-facing veth (in the gateway namespace).
    #[must_use]
    pub fn gateway_backend_if(&self) -> &str {
        &self.gateway_backend_if
    }

    /// The bridge port peering with the gateway's backend-facing veth (switch namespace).
    #[must_use]
    pub fn switch_gateway_port(&self) -> &str {
        &self.switch_gateway_port
    }

    /// The bridge (switch namespace).
    #[must_use]
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Backend `i`'s veth (in its namespace).
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_if(&self, i: usize) -> &str {
        &self.backend(i).ifname
    }

    /// The bridge port peering with backend `i`'s veth (switch namespace).
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn switch_port(&self, i: usize) -> &str {
        &self.backend(i).switch_port
    }

    /// Number of backends.
    #[must_use]
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Backend `i`'s name, `b<i>`, as it appears in its answers.
    #[must_use]
    pub fn backend_name(&self, i: usize) -> String {
        let _ = self.backend(i);
        format!("b{i}")
    }

    /// Backend `i`'s address, 198.18.2.(10+i).
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        let _ = self.backend(i);
        backend_addr_of(i)
    }

    /// Backend `i`'s HTTP address, 198.18.2.(10+i):8080.
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_http(&self, i: usize) -> SocketAddr {
        (self.backend_addr(i), BACKEND_HTTP_PORT).into()
    }

    /// Backend `i`'s UDP echo address, 198.18.2.(10+i):8081.
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_udp(&self, i: usize) -> SocketAddr {
        (self.backend_addr(i), BACKEND_UDP_PORT).into()
    }

    /// Backend `i`'s IPv6 address, 2001:db8:2::(10+i) (the decimal digits of
    /// 10+i read as hex, see the module docs).
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        let _ = self.backend(i);
        backend_addr6_of(i)
    }

    /// Backend `i`'s HTTP address over IPv6, [2001:db8:2::(10+i)]:8080.
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_http6(&self, i: usize) -> SocketAddr {
        (self.backend_addr6(i), BACKEND_HTTP_PORT).into()
    }

    /// Backend `i`'s UDP echo address over IPv6, [2001:db8:2::(10+i)]:8081.
    ///
    /// # Panics
    ///
    /// When `i` is not in `1..=backend_count()`.
    #[must_use]
    pub fn backend_udp6(&self, i: usize) -> SocketAddr {
        (self.backend_addr6(i), BACKEND_UDP_PORT).into()
    }

    /// All backends' HTTP addresses, b1 first.
    #[must_use]
    pub fn backend_http_addrs(&self) -> Vec<SocketAddr> {
        (1..=self.backends.len()).map(|i| self.backend_http(i)).collect()
    }

    /// The VIP's HTTP address, 198.18.0.100:80.
    #[must_use]
    pub fn vip_http(&self) -> SocketAddr {
        (VIP, VIP_HTTP_PORT).into()
    }

    /// The VIP's UDP address, 198.18.0.100:5353.
    #[must_use]
    pub fn vip_udp(&self) -> SocketAddr {
        (VIP, VIP_UDP_PORT).into()
    }

    /// The IPv6 VIP's HTTP address, [2001:db8::100]:80.
    #[must_use]
    pub fn vip6_http(&self) -> SocketAddr {
        (VIP6, VIP_HTTP_PORT).into()
    }

    /// The IPv6 VIP's UDP address, [2001:db8::100]:5353.
    #[must_use]
    pub fn vip6_udp(&self) -> SocketAddr {
        (VIP6, VIP_UDP_PORT).into()
    }

    /// The backend server binary in use.
    #[must_use]
    pub fn backend_bin(&self) -> &Path {
        &self.backend_bin
    }

    /// Runs `cmd` in `ns` and collects its output; see [`Namespace::exec`].
    ///
    /// # Errors
    ///
    /// When the process cannot be started.
    pub fn exec(&self, ns: &Namespace, cmd: &[&str]) -> anyhow::Result<Output> {
        ns.exec(cmd)
    }

    /// Starts `cmd` in `ns` in the background; see [`Namespace::spawn`].
    ///
    /// # Errors
    ///
    /// When the process cannot be started.
    pub fn spawn_in(&self, ns: &Namespace, cmd: &[&str]) -> anyhow::Result<ChildGuard> {
        ns.spawn(cmd)
    }

    /// Starts backend `i`'s server unless it runs, and waits until it listens.
    ///
    /// # Errors
    ///
    /// When `i` is out of range or the server does not come up within 5 s.
    pub fn start_backend(&self, i: usize) -> anyhow::Result<()> {
        let backend = self.try_backend(i)?;
        let mut process = lock(&backend.process);
        if let Some(child) = process.as_mut()
            && child.try_wait()?.is_none()
        {
            return Ok(());
        }
        let name = format!("b{i}");
        // Dual-stack: bindv6only=0 in backend namespaces (see set_up).
        let http = SocketAddr::from((Ipv6Addr::UNSPECIFIED, BACKEND_HTTP_PORT)).to_string();
        let udp = SocketAddr::from((Ipv6Addr::UNSPECIFIED, BACKEND_UDP_PORT)).to_string();
        let mut cmd = backend.ns.command(&self.backend_bin);
        cmd.args(["--name", &name, "--http", &http, "--udp", &udp]).stdout(Stdio::piped());
        let mut child = ChildGuard::spawn(cmd, format!("backend {name} ({})", self.backend_bin.display()))?;
        wait_listening(&mut child).with_context(|| format!("starting backend {name}"))?;
        *process = Some(child);
        Ok(())
    }

    /// Starts a second server in backend `i`'s namespace, named like the
    /// first (`b{i}`) but on `http_port` and `udp_port`, and waits until it
    /// listens. Two VIPs of one protocol may not share a backend (address,
    /// port and protocol: the agent refuses it), so a test that balances two
    /// VIPs over the same hosts gives the second VIP these ports. It runs
    /// until the returned guard drops; [`Self::stop_backend`] leaves it alone.
    ///
    /// # Errors
    ///
    /// When `i` is out of range or the server does not come up within 5 s.
    pub fn start_second_server(&self, i: usize, http_port: u16, udp_port: u16) -> anyhow::Result<ChildGuard> {
        self.start_second_server_with(i, http_port, udp_port, &[])
    }

    /// [`Self::start_second_server`] with more arguments for the server,
    /// e.g. `--https [::]:8443 --tls-cert CHAIN --tls-key KEY`.
    ///
    /// # Errors
    ///
    /// As for [`Self::start_second_server`].
    pub fn start_second_server_with(
        &self,
        i: usize,
        http_port: u16,
        udp_port: u16,
        extra: &[&str],
    ) -> anyhow::Result<ChildGuard> {
        let backend = self.try_backend(i)?;
        let name = format!("b{i}");
        let http = SocketAddr::from((Ipv6Addr::UNSPECIFIED, http_port)).to_string();
        let udp = SocketAddr::from((Ipv6Addr::UNSPECIFIED, udp_port)).to_string();
        let mut cmd = backend.ns.command(&self.backend_bin);
        cmd.args(["--name", &name, "--http", &http, "--udp", &udp]).args(extra).stdout(Stdio::piped());
        let mut child =
            ChildGuard::spawn(cmd, format!("second server {name} on {http} ({})", self.backend_bin.display()))?;
        wait_listening(&mut child).with_context(|| format!("starting a second server in backend {name}"))?;
        Ok(child)
    }

    /// Kills backend `i`'s server (SIGKILL, by PID) and waits for it, as if
    /// the backend died: its connections get resets, its ports refuse.
    /// Restart it with [`Self::start_backend`] (health is back to ok then).
    ///
    /// # Errors
    ///
    /// When `i` is out of range or waiting fails.
    pub fn stop_backend(&self, i: usize) -> anyhow::Result<()> {
        let backend = self.try_backend(i)?;
        let child = lock(&backend.process).take();
        if let Some(mut child) = child {
            child.kill()?;
        }
        Ok(())
    }

    /// Whether backend `i`'s server process is running.
    ///
    /// # Errors
    ///
    /// When `i` is out of range or `waitpid` fails.
    pub fn backend_running(&self, i: usize) -> anyhow::Result<bool> {
        let backend = self.try_backend(i)?;
        let mut process = lock(&backend.process);
        match process.as_mut() {
            Some(child) => Ok(child.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    /// Makes backend `i`'s `/health` answer 200 (`ok`) or 503 (not `ok`), via
    /// its admin URL, requested from the gateway namespace.
    ///
    /// # Errors
    ///
    /// When `i` is out of range or the request fails.
    pub fn set_backend_health(&self, i: usize, ok: bool) -> anyhow::Result<()> {
        self.try_backend(i)?;
        let path = if ok { "/admin/health/ok" } else { "/admin/health/fail" };
        let response = self.http_get_in(&self.gateway, self.backend_http(i), path)?;
        ensure!(response.status == 200, "{path} on backend b{i} answered {}", response.status);
        Ok(())
    }

    /// `GET path` from namespace `ns` to `addr` on a new connection.
    ///
    /// # Errors
    ///
    /// On connection or protocol errors (any status is returned).
    pub fn http_get_in(&self, ns: &Namespace, addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
        ns.enter(|| client::http_get(addr, path))?
    }

    /// `GET url` from the client namespace, e.g. `http://198.18.0.100/` or
    /// `http://[2001:db8::100]/`; the host must be an address (no DNS).
    /// Returns the body.
    ///
    /// # Errors
    ///
    /// On a malformed URL, connection or protocol errors, or a non-2xx status.
    pub fn http_get(&self, url: &str) -> anyhow::Result<String> {
        let (addr, path) = parse_url(url)?;
        let response = self.http_get_in(&self.client, addr, path)?;
        ensure!((200..300).contains(&response.status), "GET {url}: status {}", response.status);
        Ok(response.text())
    }

    /// `n` HTTP requests from the client namespace; see [`client::requests`].
    /// Returns one entry per request: the answering backend's name or the error.
    #[must_use]
    pub fn client_requests(
        &self,
        addr: SocketAddr,
        n: usize,
        new_connection_each: bool,
    ) -> Vec<anyhow::Result<String>> {
        match self.client.enter(|| client::requests(addr, n, new_connection_each)) {
            Ok(results) => results,
            Err(e) => (0..n).map(|_| Err(anyhow!("entering the client namespace: {e:#}"))).collect(),
        }
    }

    /// UDP datagrams from the client namespace, all from one socket bound to
    /// `from_port` (0: any); see [`client::udp_exchange`]. Returns one entry per
    /// payload: the answering backend's name or the error.
    #[must_use]
    pub fn client_udp(&self, addr: SocketAddr, payloads: &[&[u8]], from_port: u16) -> Vec<anyhow::Result<String>> {
        match self.client.enter(|| client::udp_exchange(addr, payloads, from_port)) {
            Ok(Ok(results)) => results,
            Ok(Err(e)) | Err(e) => payloads.iter().map(|_| Err(anyhow!("{e:#}"))).collect(),
        }
    }

    /// A few lines describing namespaces, interfaces and addresses.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "testbed {}", self.id);
        let _ = writeln!(
            s,
            "  client   {:<18} {} {CLIENT_ADDR}/{PREFIX_LEN} {CLIENT_ADDR6}/{PREFIX_LEN6}, default via {GATEWAY_CLIENT_ADDR} and {GATEWAY_CLIENT_ADDR6}",
            self.client.name(),
            self.client_if
        );
        let _ = writeln!(
            s,
            "  gateway  {:<18} {} {GATEWAY_CLIENT_ADDR}/{PREFIX_LEN} {GATEWAY_CLIENT_ADDR6}/{PREFIX_LEN6} (client side), \
             {} {GATEWAY_BACKEND_ADDR}/{PREFIX_LEN} {GATEWAY_BACKEND_ADDR6}/{PREFIX_LEN6} (backend side)",
            self.gateway.name(),
            self.gateway_client_if,
            self.gateway_backend_if
        );
        let ports: Vec<&str> = std::iter::once(self.switch_gateway_port.as_str())
            .chain(self.backends.iter().map(|b| b.switch_port.as_str()))
            .collect();
        let _ = writeln!(s, "  switch   {:<18} bridge {} ports {}", self.switch.name(), self.bridge, ports.join(" "));
        for (i, b) in self.backends.iter().enumerate() {
            let i = i + 1;
            let _ = writeln!(
                s,
                "  backend  {:<18} {} {}/{PREFIX_LEN} {}/{PREFIX_LEN6}, http :{BACKEND_HTTP_PORT}, udp :{BACKEND_UDP_PORT}, name b{i}",
                b.ns.name(),
                b.ifname,
                backend_addr_of(i),
                backend_addr6_of(i)
            );
        }
        let _ = write!(s, "  vip      {VIP} and {VIP6} tcp :{VIP_HTTP_PORT} udp :{VIP_UDP_PORT} (owned by nobody)");
        s
    }

    fn try_backend(&self, i: usize) -> anyhow::Result<&Backend> {
        i.checked_sub(1)
            .and_then(|k| self.backends.get(k))
            .with_context(|| format!("no backend {i}: backends are 1..={}", self.backends.len()))
    }

    fn backend(&self, i: usize) -> &Backend {
        match self.try_backend(i) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for b in &self.backends {
            if let Some(mut child) = lock(&b.process).take()
                && let Err(e) = child.kill()
            {
                eprintln!("warning: testbed {}: stopping backend: {e:#}", self.id);
            }
        }
        for ns in self.created.iter().rev() {
            netns::remove(ns, &format!("testbed {}", self.id));
        }
        self.created.clear();
        if let Some(mut reaper) = self.reaper.take() {
            reaper.dismiss();
        }
    }
}

fn backend_addr_of(i: usize) -> Ipv4Addr {
    // i <= MAX_BACKENDS, so 10 + i fits a byte.
    let last = u8::try_from(10 + i).unwrap_or(u8::MAX);
    Ipv4Addr::new(198, 18, 2, last)
}

fn backend_addr6_of(i: usize) -> Ipv6Addr {
    // 10 + i <= 109: its decimal digits, each taken as a hex digit.
    let n = u16::try_from(10 + i).unwrap_or(u16::MAX);
    let host = ((n / 100) << 8) | ((n / 10 % 10) << 4) | (n % 10);
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, host)
}

/// Adds a link's IPv4 and IPv6 address. `nodad`: usable at once, see the
/// module docs.
fn add_addresses(ns: &str, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> anyhow::Result<()> {
    ip(&["-n", ns, "addr", "add", &format!("{v4}/{PREFIX_LEN}"), "dev", dev])?;
    ip(&["-n", ns, "-6", "addr", "add", &format!("{v6}/{PREFIX_LEN6}"), "dev", dev, "nodad"])
}

/// Default routes of both families via the gateway's addresses.
fn add_default_routes(ns: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> anyhow::Result<()> {
    ip(&["-n", ns, "route", "add", "default", "via", &v4.to_string()])?;
    ip(&["-n", ns, "-6", "route", "add", "default", "via", &v6.to_string()])
}

/// Turns IPv6 on in a fresh namespace, explicitly: a namespace's IPv6
/// settings may come from the host's (`net.core.devconf_inherit_init_net`),
/// where it may be off. No duplicate address detection, see the module docs.
fn enable_ipv6(ns: &Namespace) -> anyhow::Result<()> {
    for conf in ["all", "default"] {
        ns.set_sysctl(&format!("net.ipv6.conf.{conf}.disable_ipv6"), "0")?;
        ns.set_sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0")?;
    }
    Ok(())
}

/// Locks `m`, ignoring poisoning (a panicking test must still clean up).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits until a freshly spawned backend prints `listening`.
fn wait_listening(child: &mut ChildGuard) -> anyhow::Result<()> {
    let stdout = child.child_mut().stdout.take().context("backend stdout not piped")?;
    let (tx, rx) = mpsc::channel();
    // The thread ends when the line arrives or the pipe closes (the child
    // died, or was killed after a timeout); the backend writes nothing more.
    thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
    });
    match rx.recv_timeout(BACKEND_START_TIMEOUT) {
        Ok(Ok(line)) if line.trim() == "listening" => Ok(()),
        Ok(Ok(line)) if line.is_empty() => match child.try_wait()? {
            Some(status) => bail!("exited before listening ({status}); see its stderr above"),
            None => bail!("closed its stdout before listening"),
        },
        Ok(Ok(line)) => bail!("unexpected first line {line:?}"),
        Ok(Err(e)) => Err(e).context("reading its stdout"),
        Err(_) => bail!("not listening after {BACKEND_START_TIMEOUT:?}"),
    }
}

/// Splits `http://a.b.c.d[:port]/path` or `http://[v6][:port]/path` into an
/// address and a path.
fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, &str)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(k) => (&rest[..k], &rest[k..]),
        None => (rest, "/"),
    };
    let addr = match authority.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let host = authority.strip_prefix('[').and_then(|h| h.strip_suffix(']')).map_or_else(
                || authority.parse::<Ipv4Addr>().map(IpAddr::V4),
                |h| h.parse::<Ipv6Addr>().map(IpAddr::V6),
            );
            let ip = host.with_context(|| {
                format!("{url}: host must be an IPv4 address or a bracketed IPv6 one (no DNS here)")
            })?;
            (ip, 80).into()
        }
    };
    Ok((addr, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_url_handles_ports_and_paths() {
        let (addr, path) = parse_url("http://198.18.0.100/").expect("valid url");
        assert_eq!((addr, path), (SocketAddr::from(([198, 18, 0, 100], 80)), "/"));
        let (addr, path) = parse_url("http://198.18.2.11:8080/big?bytes=10").expect("valid url");
        assert_eq!((addr, path), (SocketAddr::from(([198, 18, 2, 11], 8080)), "/big?bytes=10"));
        assert_eq!(parse_url("http://198.18.2.11:8080").expect("valid url").1, "/");
        let (addr, path) = parse_url("http://[2001:db8::100]/x").expect("valid url");
        assert_eq!((addr, path), (SocketAddr::from((VIP6, 80)), "/x"));
        let (addr, _) = parse_url("http://[2001:db8:2::11]:8080/").expect("valid url");
        assert_eq!(addr, SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x11), 8080)));
        assert!(parse_url("http://2001:db8::100/").is_err(), "IPv6 needs brackets");
        assert!(parse_url("https://198.18.0.100/").is_err());
        assert!(parse_url("http://example.com/").is_err());
    }

    #[test]
    fn backend_addresses_follow_the_plan() {
        assert_eq!(backend_addr_of(1), Ipv4Addr::new(198, 18, 2, 11));
        assert_eq!(backend_addr_of(MAX_BACKENDS), Ipv4Addr::new(198, 18, 2, 109));
        for (i, v6) in
            [(1, "2001:db8:2::11"), (9, "2001:db8:2::19"), (10, "2001:db8:2::20"), (MAX_BACKENDS, "2001:db8:2::109")]
        {
            assert_eq!(backend_addr6_of(i).to_string(), v6, "backend {i}");
            let v4_last = backend_addr_of(i).octets()[3].to_string();
            assert!(v6.ends_with(&format!("::{v4_last}")), "b{i}: {v6} reads like its IPv4 address");
        }
    }
}
