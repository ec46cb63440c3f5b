//! The `lb` agent under test: its config for a [`Testbed`], the process in
//! the gateway namespace, and its admin API.
//!
//! The agent listens for `/status` and `/metrics` on the gateway namespace's
//! loopback, so every admin request is made from inside that namespace.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::testbed::{ChildGuard, Namespace, Testbed, client};

/// Where the agent serves `/status` and `/metrics`, inside the gateway namespace.
pub const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7451);

/// Health checking for the testbed's web VIP.
#[derive(Debug, Clone, Copy)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for HealthCheck {
    /// Fast enough for tests and the demo, slow enough for a loaded 2-core machine.
    fn default() -> Self {
        HealthCheck { interval: Duration::from_millis(500), timeout: Duration::from_millis(300), rise: 2, fall: 2 }
    }
}

impl HealthCheck {
    /// The bound on how long a dead backend may still get new flows:
    /// `fall × interval + timeout`.
    #[must_use]
    pub fn detection_bound(&self) -> Duration {
        self.interval * self.fall + self.timeout
    }

    /// How long a recovered backend waits for its `rise` successes.
    #[must_use]
    pub fn recovery_bound(&self) -> Duration {
        self.interval * self.rise + self.timeout
    }
}

/// The config the tests and the demo run: on the gateway's two interfaces, a
/// TCP VIP `web` over every backend's HTTP server with HTTP checks, and a UDP
/// VIP `echo` over their UDP echo servers, probed on their HTTP port.
#[must_use]
pub fn config_for(testbed: &Testbed, check: HealthCheck) -> String {
    let mut toml = agent_section(testbed);
    for vip in [Vip::Web, Vip::Echo] {
        push_vip(&mut toml, testbed, check, vip);
    }
    toml
}

/// Name of the IPv6 TCP VIP in [`config_dual_stack`].
pub const WEB6: &str = "web6";
/// Name of the IPv6 UDP VIP in [`config_dual_stack`].
pub const ECHO6: &str = "echo6";

/// [`config_for`] plus the same two services on the IPv6 VIP: [`WEB6`] on
/// [`Testbed::vip6_http`] over every backend's IPv6 HTTP address, and
/// [`ECHO6`] on [`Testbed::vip6_udp`] over their IPv6 UDP echo addresses.
/// Their health checks probe the backends' IPv6 addresses, so an IPv6
/// backend is up only if it answers over IPv6.
#[must_use]
pub fn config_dual_stack(testbed: &Testbed, check: HealthCheck) -> String {
    let mut toml = config_for(testbed, check);
    for vip in [Vip::Web6, Vip::Echo6] {
        push_vip(&mut toml, testbed, check, vip);
    }
    toml
}

/// `[agent]`: the gateway's two interfaces, the admin API on [`ADMIN`].
fn agent_section(testbed: &Testbed) -> String {
    format!(
        "[agent]\ninterfaces = [\"{}\", \"{}\"]\nadmin_listen = \"{ADMIN}\"\nxdp_mode = \"native\"\n\n",
        testbed.gateway_client_if(),
        testbed.gateway_backend_if()
    )
}

/// The services a generated config can hold.
#[derive(Debug, Clone, Copy)]
enum Vip {
    Web,
    Echo,
    Web6,
    Echo6,
}

impl Vip {
    fn name(self) -> &'static str {
        match self {
            Vip::Web => "web",
            Vip::Echo => "echo",
            Vip::Web6 => WEB6,
            Vip::Echo6 => ECHO6,
        }
    }

    fn listen(self, testbed: &Testbed) -> SocketAddr {
        match self {
            Vip::Web => testbed.vip_http(),
            Vip::Echo => testbed.vip_udp(),
            Vip::Web6 => testbed.vip6_http(),
            Vip::Echo6 => testbed.vip6_udp(),
        }
    }

    fn is_udp(self) -> bool {
        matches!(self, Vip::Echo | Vip::Echo6)
    }

    /// Backend `i`'s address for this service, of the VIP's family.
    fn backend(self, testbed: &Testbed, i: usize) -> SocketAddr {
        match self {
            Vip::Web => testbed.backend_http(i),
            Vip::Echo => testbed.backend_udp(i),
            Vip::Web6 => testbed.backend_http6(i),
            Vip::Echo6 => testbed.backend_udp6(i),
        }
    }
}

/// Appends `[[vip]]` with HTTP checks on `/health` and one `[[vip.backend]]`
/// per testbed backend. UDP services are probed on the backends' HTTP port,
/// since their own port speaks no TCP.
fn push_vip(toml: &mut String, testbed: &Testbed, check: HealthCheck, vip: Vip) {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let protocol = if vip.is_udp() { "udp" } else { "tcp" };
    let _ = writeln!(
        toml,
        "[[vip]]\nname = \"{}\"\nlisten = \"{}\"\nprotocol = \"{protocol}\"\n",
        vip.name(),
        vip.listen(testbed)
    );
    let _ = writeln!(
        toml,
        "[vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"{}\"\ntimeout = \"{}\"\nrise = {}\nfall = {}",
        ms(check.interval),
        ms(check.timeout),
        check.rise,
        check.fall
    );
    if vip.is_udp() {
        let _ = writeln!(toml, "port = {}", crate::testbed::BACKEND_HTTP_PORT);
    }
    toml.push('\n');
    for i in 1..=testbed.backend_count() {
        let _ = writeln!(toml, "[[vip.backend]]\naddress = \"{}\"\nweight = 1\n", vip.backend(testbed, i));
    }
}

/// A running `lb run` in a testbed's gateway namespace; SIGTERMed (by PID) on drop.
#[derive(Debug)]
pub struct Agent {
    // Dropped first: the process stops (and detaches) before its files go.
    process: ChildGuard,
    gateway: Namespace,
    dir: PathBuf,
}

impl Agent {
    /// How long the agent may take to attach and serve `/status`.
    pub const START_TIMEOUT: Duration = Duration::from_secs(15);

    /// Writes `config` to a file and starts `lb run` on it in the gateway
    /// namespace, then waits until `/status` answers.
    ///
    /// # Errors
    ///
    /// When `lb` is not found, does not start, exits, or does not serve in time;
    /// the error includes its log.
    pub fn start(testbed: &Testbed, config: &str) -> anyhow::Result<Self> {
        Self::start_with(testbed, config, |_| {})
    }

    /// Like [`Self::start`], but `configure` may adjust the `lb run` command
    /// before it is spawned (e.g. `cmd.process_group(0)`, so that Ctrl-C in a
    /// terminal reaches only the caller, which then stops the agent itself).
    ///
    /// # Errors
    ///
    /// As for [`Self::start`].
    ///
    /// The agent runs under `ip netns exec`, whose private mount namespace
    /// gives it a bpffs of its own, and with `--unload-on-exit`: the data path
    /// stops with it, as before pinning. [`Self::start_pinned`] runs one
    /// whose data path outlives it.
    pub fn start_with(testbed: &Testbed, config: &str, configure: impl FnOnce(&mut Command)) -> anyhow::Result<Self> {
        let lb = crate::lb_bin()?;
        let mut cmd = testbed.gateway().command(&lb);
        cmd.arg("run").arg("--unload-on-exit");
        Self::spawn(testbed, config, cmd, configure)
    }

    /// Starts `lb run` in the gateway's network namespace only (`nsenter
    /// --net`), so it shares the host's `/sys/fs/bpf` as on a real gateway,
    /// with `config` (which names a [`PinDir`]'s path as `agent.pin_dir`):
    /// its data path outlives it, and the next agent adopts it.
    ///
    /// # Errors
    ///
    /// As for [`Self::start`].
    pub fn start_pinned(testbed: &Testbed, config: &str) -> anyhow::Result<Self> {
        Self::start_pinned_with(testbed, config, |_| {})
    }

    /// Like [`Self::start_pinned`], but `configure` may adjust the command
    /// (e.g. set `NOTIFY_SOCKET`).
    ///
    /// # Errors
    ///
    /// As for [`Self::start`].
    pub fn start_pinned_with(
        testbed: &Testbed,
        config: &str,
        configure: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Self> {
        let lb = crate::lb_bin()?;
        let mut cmd = Command::new("nsenter");
        let netns = testbed.gateway().path();
        cmd.arg(format!("--net={}", netns.display())).arg("--").arg(&lb).arg("run").stdin(Stdio::null());
        Self::spawn(testbed, config, cmd, configure)
    }

    /// Writes the config, spawns `cmd --config FILE` with the log captured,
    /// and waits until `/status` answers.
    fn spawn(
        testbed: &Testbed,
        config: &str,
        mut cmd: Command,
        configure: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Self> {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lb-tests-{}-{n}", testbed.id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("lb.toml");
        fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
        // On the command line, not in the file: tests that rewrite the file
        // for a reload need not repeat them.
        cmd.arg("--control-socket").arg(dir.join("lb.sock"));
        if !config.contains("state_file") {
            cmd.arg("--state-file").arg(dir.join("state.json"));
        }
        let log = fs::File::create(dir.join("lb.log")).context("creating the agent's log")?;
        cmd.arg("--config").arg(&config_path).env("LB_LOG", "info").stdout(Stdio::null()).stderr(log);
        configure(&mut cmd);
        let process = ChildGuard::spawn(cmd, format!("lb run in {}", testbed.gateway().name()))?;
        let mut agent = Agent { process, gateway: testbed.gateway().clone(), dir };
        agent.wait_serving()?;
        Ok(agent)
    }

    fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Self::START_TIMEOUT;
        loop {
            if let Some(status) = self.process.try_wait()? {
                bail!("lb exited with {status} while starting; its log:\n{}", self.log());
            }
            if self.admin_get("/status").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("lb did not serve /status within {:?}; its log:\n{}", Self::START_TIMEOUT, self.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The file the agent runs on (removed when the agent is dropped).
    #[must_use]
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }

    /// The agent's control socket (in its own directory).
    #[must_use]
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("lb.sock")
    }

    /// Runs `lb ARGS --socket <this agent's control socket>` from the host
    /// and returns its output (`lb backend drain web ADDR`, `lb reload`, ...).
    ///
    /// # Errors
    ///
    /// When `lb` cannot be run.
    pub fn lb(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let lb = crate::lb_bin()?;
        Command::new(lb)
            .args(args)
            .arg("--socket")
            .arg(self.control_socket())
            .output()
            .with_context(|| format!("running lb {args:?}"))
    }

    /// Where the agent logs (removed when the agent is dropped).
    #[must_use]
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("lb.log")
    }

    /// What the agent has logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// The process id, e.g. to signal it.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// SIGKILLs the agent (by PID) and waits for it: a crash.
    ///
    /// # Errors
    ///
    /// When signalling or waiting fails.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.kill()
    }

    /// Sends SIGTERM and waits; returns whether it exited with status 0.
    ///
    /// # Errors
    ///
    /// When signalling or waiting fails.
    pub fn stop(&mut self) -> anyhow::Result<bool> {
        Ok(self.terminate()?.success())
    }

    /// Like [`Self::stop`], but returns the exit status itself (e.g. to show it).
    /// Once the agent has exited, further calls return the same status.
    ///
    /// # Errors
    ///
    /// When signalling or waiting fails.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.terminate(Duration::from_secs(5))
    }

    fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let response = self.gateway.enter(|| client::http_get(ADMIN, path))??;
        ensure!(response.status == 200, "GET {path}: status {}", response.status);
        Ok(response.text())
    }

    /// `GET /status`, parsed.
    ///
    /// # Errors
    ///
    /// When the request fails or the body is not JSON.
    pub fn status(&self) -> anyhow::Result<Value> {
        let body = self.admin_get("/status")?;
        serde_json::from_str(&body).with_context(|| format!("/status is not JSON: {body}"))
    }

    /// Packets the XDP program counted under verdict `reason` (a name from
    /// `lb_common::stats::reason::NAMES`), from `/status`.
    ///
    /// # Panics
    ///
    /// When `/status` fails or has no such verdict: this is for tests.
    #[must_use]
    pub fn verdict(&self, reason: &str) -> u64 {
        let status = self.status().expect("/status");
        status["verdicts"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["reason"] == reason))
            .and_then(|v| v["packets"].as_u64())
            .unwrap_or_else(|| panic!("no verdict {reason} in {status}"))
    }

    /// `GET /metrics`: Prometheus text.
    ///
    /// # Errors
    ///
    /// When the request fails.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.admin_get("/metrics")
    }

    /// Health (`up`, `down`, `unknown`) of each backend of VIP `vip`, in config order.
    ///
    /// # Errors
    ///
    /// When `/status` fails or has no such VIP.
    pub fn backend_health(&self, vip: &str) -> anyhow::Result<Vec<String>> {
        let status = self.status()?;
        health_of(&status, vip).with_context(|| format!("no vip {vip} in /status: {status}"))
    }

    /// Polls `/status` until VIP `vip`'s backends have exactly `want` health
    /// (e.g. `["up", "down", "up"]`), or fails after `timeout`.
    ///
    /// # Errors
    ///
    /// On timeout (with the last status and the agent's log) or if the agent exits.
    pub fn wait_health(&mut self, vip: &str, want: &[&str], timeout: Duration) -> anyhow::Result<Duration> {
        self.wait_health_while(vip, want, timeout, || Ok(()))
    }

    /// Like [`Self::wait_health`], but calls `keep_going` before every poll
    /// and gives up with its error, e.g. when the user pressed Ctrl-C.
    ///
    /// # Errors
    ///
    /// As for [`Self::wait_health`], and whatever `keep_going` returns.
    pub fn wait_health_while(
        &mut self,
        vip: &str,
        want: &[&str],
        timeout: Duration,
        mut keep_going: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            keep_going()?;
            if let Some(status) = self.process.try_wait()? {
                bail!("lb exited with {status}; its log:\n{}", self.log());
            }
            let last = match self.backend_health(vip) {
                Ok(health) if health == want => return Ok(start.elapsed()),
                Ok(health) => format!("{health:?}"),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() >= timeout {
                bail!(
                    "vip {vip}: backends did not become {want:?} within {timeout:?} (last: {last}); lb's log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.process.terminate(Duration::from_secs(5));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A pin directory of its own for one test (`/sys/fs/bpf/lb-test-<id>`),
/// removed with everything in it on drop: removing the link pins detaches
/// XDP, so nothing outlives the test.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// A fresh path for `testbed` (nothing is created: the agent does).
    ///
    /// # Errors
    ///
    /// When no bpffs is on `/sys/fs/bpf` and mounting one fails.
    pub fn new(testbed: &Testbed) -> anyhow::Result<Self> {
        ensure_host_bpffs()?;
        let path = PathBuf::from("/sys/fs/bpf").join(format!("lb-test-{}", testbed.id()));
        Ok(PinDir { path })
    }

    /// The directory, for `agent.pin_dir`.
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// `config` with `agent.pin_dir` set to this directory, and a state
    /// file beside it that every agent of the test shares (runtime changes
    /// outlive an agent too).
    #[must_use]
    pub fn config(&self, config: &str) -> String {
        let extra =
            format!("pin_dir = \"{}\"\nstate_file = \"{}\"\n", self.path.display(), self.state_file().display());
        config.replacen("[agent]\n", &format!("[agent]\n{extra}"), 1)
    }

    /// The state file [`Self::config`] names.
    #[must_use]
    pub fn state_file(&self) -> PathBuf {
        std::env::temp_dir()
            .join(format!("lb-tests-state-{}.json", self.path.file_name().and_then(|n| n.to_str()).unwrap_or("x")))
    }

    /// The names pinned in the directory (empty when it does not exist).
    #[must_use]
    pub fn entries(&self) -> Vec<String> {
        let Ok(read) = fs::read_dir(&self.path) else { return Vec::new() };
        let mut names: Vec<String> =
            read.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect();
        names.sort();
        names
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Links first: XDP is detached before its maps go.
        let mut names = self.entries();
        names.sort_by_key(|n| !n.starts_with("link_"));
        for name in names {
            let _ = fs::remove_file(self.path.join(name));
        }
        let _ = fs::remove_dir(&self.path);
        let _ = fs::remove_file(self.state_file());
    }
}

/// Mounts a bpffs on the host's `/sys/fs/bpf` unless one is there, once per
/// process: two agents of parallel tests mounting at once would stack two
/// mounts, and the lower one's pins would vanish from view.
fn ensure_host_bpffs() -> anyhow::Result<()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let is_bpffs = |l: &str| {
        let mut fields = l.split_whitespace().skip(1);
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    };
    if mounts.lines().any(is_bpffs) {
        return Ok(());
    }
    let out = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).output().context("running mount")?;
    ensure!(out.status.success(), "mount -t bpf bpf /sys/fs/bpf: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn health_of(status: &Value, vip: &str) -> Option<Vec<String>> {
    let vip = status["vips"].as_array()?.iter().find(|v| v["name"] == vip)?;
    vip["backends"].as_array()?.iter().map(|b| b["health"].as_str().map(str::to_owned)).collect()
}
