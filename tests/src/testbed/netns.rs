//! Network namespace handles, commands run inside them, and child-process guards.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A named network namespace (`/run/netns/<name>`), as made by `ip netns add`.
///
/// This is only a handle: the [`Testbed`](super::Testbed) that created the
/// namespace deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    pub(crate) fn new(name: String) -> Self {
        Self { name }
    }

    /// The name given to `ip netns`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, `/run/netns/<name>`.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and returns
    /// its result. Sockets opened by `f` live in the namespace. The thread ends
    /// with `f`, so no other code runs in the namespace by accident.
    ///
    /// A panic in `f` is resumed on the caller's thread.
    ///
    /// # Errors
    ///
    /// When the namespace file cannot be opened or `setns` fails.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = self.path();
        let joined = thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<T> {
                let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: a valid namespace fd; CLONE_NEWNET changes only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error()).with_context(|| format!("setns into {}", path.display()));
                }
                drop(file);
                Ok(f())
            })
            .join()
        });
        match joined {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Sets a sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`,
    /// by writing `/proc/sys/...` from a thread inside it (net sysctls follow
    /// the writing thread's namespace). Keys must not contain device names
    /// with dots.
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub fn set_sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.enter(|| std::fs::write(&path, value))?
            .with_context(|| format!("setting {key}={value} in namespace {}", self.name))
    }

    /// Reads a sysctl of this namespace (trimmed).
    ///
    /// # Errors
    ///
    /// When the file cannot be read.
    pub fn sysctl(&self, key: &str) -> anyhow::Result<String> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = self
            .enter(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("reading {key} in namespace {}", self.name))?;
        Ok(value.trim().to_owned())
    }

    /// A [`Command`] that runs `program` in this namespace through
    /// `ip netns exec` (which `exec`s, so the child's PID is the program's).
    /// Add arguments and stdio as usual.
    #[must_use]
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program).stdin(Stdio::null());
        cmd
    }

    /// Runs `cmd` (program and arguments) in this namespace and collects its
    /// output; a non-zero exit is not an error here, see [`Self::exec_ok`].
    ///
    /// # Errors
    ///
    /// When `cmd` is empty or the process cannot be started.
    pub fn exec(&self, cmd: &[&str]) -> anyhow::Result<Output> {
        let (program, args) = cmd.split_first().context("empty command")?;
        self.command(program).args(args).output().with_context(|| format!("running {cmd:?} in namespace {}", self.name))
    }

    /// Like [`Self::exec`] but fails on a non-zero exit, quoting stderr, and
    /// returns stdout.
    ///
    /// # Errors
    ///
    /// When the command cannot be started or exits non-zero.
    pub fn exec_ok(&self, cmd: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(cmd)?;
        if !out.status.success() {
            bail!(
                "{cmd:?} in namespace {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `cmd` in this namespace in the background (stdin null, stdout and
    /// stderr inherited). The guard stops it when dropped.
    ///
    /// # Errors
    ///
    /// When `cmd` is empty or the process cannot be started.
    pub fn spawn(&self, cmd: &[&str]) -> anyhow::Result<ChildGuard> {
        let (program, args) = cmd.split_first().context("empty command")?;
        let mut command = self.command(program);
        command.args(args);
        ChildGuard::spawn(command, format!("{cmd:?} in namespace {}", self.name))
    }
}

/// A child process that is stopped (by its PID) and waited for on drop: first
/// SIGTERM, then SIGKILL after [`ChildGuard::DROP_GRACE`].
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    /// How long drop waits after SIGTERM before SIGKILL.
    pub const DROP_GRACE: Duration = Duration::from_secs(2);

    /// Spawns `cmd`; `what` names it in errors.
    ///
    /// # Errors
    ///
    /// When the process cannot be started.
    pub fn spawn(mut cmd: Command, what: impl Into<String>) -> anyhow::Result<Self> {
        let what = what.into();
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Self { child, what })
    }

    /// The child's PID.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The underlying child, e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has exited, without blocking.
    ///
    /// # Errors
    ///
    /// When `waitpid` fails.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("checking {}", self.what))
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILLs; returns the exit status.
    ///
    /// # Errors
    ///
    /// When signalling or waiting fails.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: plain kill(2); the child is not reaped yet, so the PID is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }

    /// SIGKILLs the child (by PID) and waits for it.
    ///
    /// # Errors
    ///
    /// When signalling or waiting fails.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // Fails only if it exited meanwhile; wait() tells.
        let _ = self.child.kill();
        self.child.wait().with_context(|| format!("waiting for {}", self.what))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(Self::DROP_GRACE) {
            eprintln!("warning: stopping {}: {e:#}", self.what);
        }
    }
}

/// Deletes namespace `ns`, first SIGKILLing (by PID) any process still in
/// it but this one, since it would keep the namespace alive unnamed.
/// Problems are printed as warnings naming `owner`: this runs in `Drop`.
pub(crate) fn remove(ns: &Namespace, owner: &str) {
    let me = std::process::id().to_string();
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns.name()]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter(|p| *p != me) {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                eprintln!("warning: {owner}: killing leftover pid {pid} in {}", ns.name());
                // SAFETY: plain kill(2) of a process inside a namespace the caller made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    if let Err(e) = ip(&["netns", "del", ns.name()]) {
        eprintln!("warning: {owner}: {e:#}");
    }
}

/// Runs `ip` with `args`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A watchdog that deletes this run's namespaces if the process dies without
/// running `Drop` (Ctrl-C, SIGKILL, abort).
///
/// It is a small `sh` in its own process group (so Ctrl-C spares it) that
/// reads namespace names on stdin. On `done` it exits quietly; on EOF (the
/// parent is gone and the kernel closed the pipe) it SIGKILLs the processes
/// in those namespaces and deletes them. It knows only namespaces this
/// process created.
pub(crate) struct Reaper {
    child: Child,
    stdin: Option<ChildStdin>,
}

const REAPER_SCRIPT: &str = r#"
set --
while IFS= read -r line; do
    case "$line" in
        "ns "*) set -- "$@" "${line#ns }" ;;
        done) exit 0 ;;
    esac
done
for ns in "$@"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
done
for ns in "$@"; do ip netns del "$ns" 2>/dev/null; done
exit 0
"#;

impl Reaper {
    pub(crate) fn spawn() -> anyhow::Result<Self> {
        let mut child = Command::new("sh")
            .args(["-c", REAPER_SCRIPT, "lb-testbed-reaper"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the cleanup watchdog (sh)")?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// Tells the watchdog about a namespace this process just created.
    pub(crate) fn watch(&mut self, ns: &Namespace) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("cleanup watchdog already finished")?;
        writeln!(stdin, "ns {}", ns.name()).context("writing to the cleanup watchdog")
    }

    /// Dismisses the watchdog after a normal cleanup.
    pub(crate) fn dismiss(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "done");
        }
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").field("pid", &self.child.id()).finish_non_exhaustive()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.dismiss();
    }
}
