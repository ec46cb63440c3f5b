//! The balancers compared end to end, each started on a testbed's gateway:
//! lb (XDP), nftables DNAT, HAProxy (TCP mode), nginx's stream module, and
//! the direct path (no balancer: the client talks to backend b1, the ceiling).
//!
//! Their configs are templates in the repository's `bench/` directory,
//! filled in here from the testbed's addresses. Each [`Running`] undoes what
//! it set up when dropped (process stopped by PID, nft table deleted, VIP
//! address removed), before the testbed itself goes.

use std::{fmt::Write as _, fs, net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, bail, ensure};
use lb_tests::{
    ChildGuard, Testbed,
    agent::{self, Agent, HealthCheck},
    testbed::{BACKEND_HTTP_PORT, VIP, VIP_HTTP_PORT, VIP_UDP_PORT},
};

const NFTABLES_TEMPLATE: &str = include_str!("../../../bench/nftables.nft");
const HAPROXY_TEMPLATE: &str = include_str!("../../../bench/haproxy.cfg");
const NGINX_TEMPLATE: &str = include_str!("../../../bench/nginx.conf");
/// The table `bench/nftables.nft` creates.
const NFT_TABLE: &str = "lb_bench";
/// How long the agent may take to see every backend up.
const HEALTH_WAIT: Duration = Duration::from_secs(15);

/// One of the setups compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancer {
    Lb,
    Nftables,
    Haproxy,
    Nginx,
    Direct,
}

impl Balancer {
    /// Every setup, in the order the tables list them.
    pub const ALL: [Balancer; 5] =
        [Balancer::Lb, Balancer::Nftables, Balancer::Haproxy, Balancer::Nginx, Balancer::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Balancer::Lb => "lb (XDP)",
            Balancer::Nftables => "nftables DNAT",
            Balancer::Haproxy => "HAProxy (tcp)",
            Balancer::Nginx => "nginx stream",
            Balancer::Direct => "direct to b1",
        }
    }

    /// Whether its answers come from several backends.
    pub fn balances(self) -> bool {
        self != Balancer::Direct
    }

    /// Whether it is a process that terminates TCP (and owns the VIP).
    fn is_proxy(self) -> bool {
        matches!(self, Balancer::Haproxy | Balancer::Nginx)
    }
}

/// How to configure lb and the UDP side of nftables for a section.
#[derive(Debug, Clone)]
pub struct Params {
    /// The agent's whole config.
    pub lb_config: String,
    /// The VIP whose backends must all be up before measuring.
    pub lb_vip: String,
    /// Backend port the UDP VIP maps to in nftables.
    pub udp_backend_port: u16,
}

impl Params {
    /// The end-to-end tests' config: VIP `web` over every backend's HTTP
    /// server, HTTP health checks every 500 ms (a few packets a second).
    pub fn http(testbed: &Testbed) -> Self {
        Self {
            lb_config: agent::config_for(testbed, HealthCheck::default()),
            lb_vip: "web".to_owned(),
            udp_backend_port: lb_tests::testbed::BACKEND_UDP_PORT,
        }
    }
}

/// A balancer running on a testbed's gateway; stops and cleans up on drop.
pub struct Running<'t> {
    balancer: Balancer,
    testbed: &'t Testbed,
    agent: Option<Agent>,
    process: Option<ChildGuard>,
    nft_loaded: bool,
    vip_on_loopback: bool,
    dir: Option<PathBuf>,
    /// The exact commands that set it up, for the report.
    pub commands: Vec<String>,
}

impl Running<'_> {
    /// Where the client sends its requests.
    pub fn target(&self) -> SocketAddr {
        match self.balancer {
            Balancer::Direct => self.testbed.backend_http(1),
            _ => self.testbed.vip_http(),
        }
    }

    /// The agent, when this is lb.
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Processes first: nothing may still listen on the VIP when it goes.
        drop(self.process.take());
        drop(self.agent.take());
        let gateway = self.testbed.gateway();
        if self.nft_loaded
            && let Err(e) = gateway.exec_ok(&["nft", "delete", "table", "ip", NFT_TABLE])
        {
            eprintln!("warning: bench: removing the nftables baseline: {e:#}");
        }
        if self.vip_on_loopback
            && let Err(e) = gateway.exec_ok(&["ip", "addr", "del", &format!("{VIP}/32"), "dev", "lo"])
        {
            eprintln!("warning: bench: removing the VIP from the gateway's loopback: {e:#}");
        }
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Starts `balancer` on `testbed`'s gateway and waits until it serves
/// (for lb: until every backend is up).
pub fn start<'t>(balancer: Balancer, testbed: &'t Testbed, params: &Params) -> anyhow::Result<Running<'t>> {
    let mut running = Running {
        balancer,
        testbed,
        agent: None,
        process: None,
        nft_loaded: false,
        vip_on_loopback: false,
        dir: None,
        commands: Vec::new(),
    };
    if balancer != Balancer::Direct {
        let dir = std::env::temp_dir().join(format!("lb-bench-{}-{balancer:?}", testbed.id()).to_lowercase());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        running.dir = Some(dir);
    }
    if balancer.is_proxy() {
        // A proxy terminates TCP, so the gateway must own the VIP for this run.
        testbed.gateway().exec_ok(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        running.vip_on_loopback = true;
        running.commands.push(format!("ip addr add {VIP}/32 dev lo"));
    }
    match balancer {
        Balancer::Lb => start_lb(&mut running, params)?,
        Balancer::Nftables => start_nftables(&mut running, params)?,
        Balancer::Haproxy => start_haproxy(&mut running)?,
        Balancer::Nginx => start_nginx(&mut running)?,
        Balancer::Direct => {}
    }
    Ok(running)
}

fn start_lb(running: &mut Running<'_>, params: &Params) -> anyhow::Result<()> {
    let testbed = running.testbed;
    let mut agent = Agent::start(testbed, &params.lb_config).context("starting lb")?;
    let up = vec!["up"; testbed.backend_count()];
    agent.wait_health(&params.lb_vip, &up, HEALTH_WAIT)?;
    running.commands.push("lb run --config lb.toml".to_owned());
    running.agent = Some(agent);
    Ok(())
}

fn start_nftables(running: &mut Running<'_>, params: &Params) -> anyhow::Result<()> {
    let testbed = running.testbed;
    let map = |port: u16| {
        (1..=testbed.backend_count())
            .map(|i| format!("{} : {} . {port}", i - 1, testbed.backend_addr(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ruleset = fill(
        NFTABLES_TEMPLATE,
        &[
            ("VIP", VIP.to_string()),
            ("TCP_PORT", VIP_HTTP_PORT.to_string()),
            ("UDP_PORT", VIP_UDP_PORT.to_string()),
            ("N", testbed.backend_count().to_string()),
            ("TCP_BACKENDS", map(BACKEND_HTTP_PORT)),
            ("UDP_BACKENDS", map(params.udp_backend_port)),
        ],
    )?;
    let path = write_config(running, "nftables.nft", &ruleset)?;
    testbed.gateway().exec_ok(&["nft", "-f", &path])?;
    running.nft_loaded = true;
    running.commands.push("nft -f bench/nftables.nft".to_owned());
    Ok(())
}

fn start_haproxy(running: &mut Running<'_>) -> anyhow::Result<()> {
    let testbed = running.testbed;
    let mut servers = String::new();
    for i in 1..=testbed.backend_count() {
        let _ = writeln!(servers, "    server {} {}", testbed.backend_name(i), testbed.backend_http(i));
    }
    let config = fill(
        HAPROXY_TEMPLATE,
        &[
            ("VIP", VIP.to_string()),
            ("TCP_PORT", VIP_HTTP_PORT.to_string()),
            ("SERVERS", servers.trim_end().to_owned()),
        ],
    )?;
    let path = write_config(running, "haproxy.cfg", &config)?;
    let log = log_file(running, "haproxy.log")?;
    let mut cmd = testbed.gateway().command("haproxy");
    cmd.args(["-f", &path, "-db"]).stdout(Stdio::null()).stderr(log);
    running.process = Some(ChildGuard::spawn(cmd, "haproxy in the gateway namespace")?);
    running.commands.push("haproxy -f bench/haproxy.cfg -db".to_owned());
    Ok(())
}

fn start_nginx(running: &mut Running<'_>) -> anyhow::Result<()> {
    let testbed = running.testbed;
    let dir = running.dir.clone().context("nginx needs a directory")?;
    let mut servers = String::new();
    for i in 1..=testbed.backend_count() {
        let _ = writeln!(servers, "        server {};", testbed.backend_http(i));
    }
    let config = fill(
        NGINX_TEMPLATE,
        &[
            ("VIP", VIP.to_string()),
            ("TCP_PORT", VIP_HTTP_PORT.to_string()),
            ("SERVERS", servers.trim_end().to_owned()),
            ("DIR", dir.display().to_string()),
        ],
    )?;
    let path = write_config(running, "nginx.conf", &config)?;
    let log = log_file(running, "nginx.stderr")?;
    let mut cmd = testbed.gateway().command("nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-c", &path, "-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(log);
    // nginx's master stops its workers when it gets SIGTERM from the guard.
    running.process = Some(ChildGuard::spawn(cmd, "nginx in the gateway namespace")?);
    running.commands.push("nginx -p DIR -e DIR/error.log -c bench/nginx.conf -g 'daemon off;'".to_owned());
    Ok(())
}

/// Writes a filled-in config into the run's directory and returns its path.
fn write_config(running: &Running<'_>, name: &str, text: &str) -> anyhow::Result<String> {
    let path = running.dir.as_ref().context("no config directory")?.join(name);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.display().to_string())
}

fn log_file(running: &Running<'_>, name: &str) -> anyhow::Result<fs::File> {
    let path = running.dir.as_ref().context("no log directory")?.join(name);
    fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
}

/// What a proxy logged, for errors when it does not serve.
pub fn proxy_log(running: &Running<'_>) -> String {
    let Some(dir) = &running.dir else {
        return String::new();
    };
    ["haproxy.log", "nginx.stderr", "error.log"]
        .iter()
        .filter_map(|f| fs::read_to_string(dir.join(f)).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replaces each `{{KEY}}` in `template`; fails if one is left over.
fn fill(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = template.to_owned();
    for (key, value) in values {
        let placeholder = format!("{{{{{key}}}}}");
        ensure!(out.contains(&placeholder), "template has no {placeholder}");
        out = out.replace(&placeholder, value);
    }
    if let Some(at) = out.find("{{") {
        let rest: String = out[at..].chars().take(30).collect();
        bail!("template placeholder left unfilled: {rest}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_every_placeholder_and_refuses_leftovers() {
        assert_eq!(fill("a {{X}} b {{X}}", &[("X", "1".into())]).expect("filled"), "a 1 b 1");
        assert!(fill("a {{X}} {{Y}}", &[("X", "1".into())]).is_err());
        assert!(fill("a", &[("X", "1".into())]).is_err());
    }

    #[test]
    fn templates_name_only_known_placeholders() {
        let known = ["VIP", "TCP_PORT", "UDP_PORT", "N", "TCP_BACKENDS", "UDP_BACKENDS", "SERVERS", "DIR"];
        for template in [NFTABLES_TEMPLATE, HAPROXY_TEMPLATE, NGINX_TEMPLATE] {
            for piece in template.split("{{").skip(1) {
                let key = piece.split("}}").next().unwrap_or("");
                assert!(known.contains(&key), "unknown placeholder {key}");
            }
        }
    }
}
