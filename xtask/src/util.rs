//! Small helpers for running programs and finding paths.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// The workspace root: xtask's manifest directory is one level below it.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A one-line rendering of `cmd` for progress lines and errors.
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> =
        cmd.get_envs().filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy()))).collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = display(cmd);
    let status = cmd.status().with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Where `cargo xtask setup` sends the full output of apt, rustup and
/// cargo install: its progress lines say what runs and how long it took.
pub fn setup_log() -> PathBuf {
    workspace_root().join("target/xtask-setup.log")
}

/// Runs `cmd` with its output appended to [`setup_log`], then prints one
/// line: what ran and how long it took. On failure, the error quotes the
/// log's last lines.
pub fn run_logged(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let shown = display(cmd);
    let path = setup_log();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let open = || std::fs::OpenOptions::new().create(true).append(true).open(&path);
    let mut log = open().with_context(|| format!("opening {}", path.display()))?;
    {
        use std::io::Write as _;
        writeln!(log, "\n$ {shown}")?;
    }
    let started = std::time::Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    let took = human(started.elapsed());
    if !status.success() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{shown}` failed ({status}) after {took}; the end of {}:\n{}", path.display(), tail.join("\n"));
    }
    println!("setup: {what}: done in {took} (output in {})", path.display());
    Ok(())
}

/// Runs `cmd` capturing its output; fails (quoting stderr) unless it exits 0,
/// and returns stdout.
pub fn output_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = display(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("starting `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program args…` can be started and exits 0 (output discarded).
pub fn succeeds(program: impl AsRef<OsStr>, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first executable file called `name` in `PATH`, like `which`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The home directory, from `HOME`.
pub fn home() -> anyhow::Result<PathBuf> {
    env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).context("HOME is not set")
}

/// `12.3 s` or `2 min 05 s`, for phase timings.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failing_logged_command_quotes_the_end_of_its_log() {
        let err =
            super::run_logged("a test", std::process::Command::new("sh").args(["-c", "echo xtask-log-test; exit 3"]))
                .expect_err("exit 3 fails");
        assert!(format!("{err:#}").contains("xtask-log-test"), "{err:#}");
        super::run_logged("a test", &mut std::process::Command::new("true")).expect("true succeeds");
    }
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(12_345)), "12.3 s");
        assert_eq!(human(Duration::from_secs(125)), "2 min 05 s");
    }

    #[test]
    fn display_shows_env_program_and_args() {
        let mut cmd = Command::new("cargo");
        cmd.env("A", "1").args(["build", "-p", "x"]);
        assert_eq!(display(&cmd), "A=1 cargo build -p x");
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("xtask").join("Cargo.toml").is_file());
    }
}
