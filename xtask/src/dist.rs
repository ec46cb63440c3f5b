//! `cargo xtask dist`: a Debian package of the agent, built with dpkg-deb.
//!
//! It holds `/usr/bin/lb`, the systemd unit (`deploy/lb.service` with
//! `/usr/bin` paths), `/etc/lb/lb.toml` (the commented example, a conffile),
//! the man pages and bash/zsh/fish completions (`lb generate-docs`), and
//! `deploy/` (Prometheus, Grafana, BIRD) with the README under
//! `/usr/share/doc/lb`. No maintainer scripts: installing enables nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    build::{self, Profile},
    setup,
    util::{self, output_ok, run_ok},
};

/// What goes into the package besides the binary, relative to the workspace.
struct Sources {
    root: PathBuf,
}

impl Sources {
    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }
}

/// The `dist` subcommand: builds `lb` (release unless `debug`), stages the
/// package tree under `target/dist/` and writes the `.deb` there; returns
/// its path.
pub fn run(debug: bool) -> anyhow::Result<PathBuf> {
    setup::ensure(false)?;
    let profile = if debug { Profile::Debug } else { Profile::Release };
    let bins = build::build(profile)?;
    let root = util::workspace_root();
    let out = root.join("target/dist");
    let deb = package(&bins.lb, &Sources { root }, &out, &architecture()?)?;
    println!("dist: {}", deb.display());
    Ok(deb)
}

/// Debian's name for this machine's architecture (`amd64`).
fn architecture() -> anyhow::Result<String> {
    Ok(output_ok(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned())
}

/// Stages the tree for `lb` (the binary at `lb`) under `out` and builds the
/// `.deb` from it.
fn package(lb: &Path, sources: &Sources, out: &Path, arch: &str) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("lb_{version}_{arch}");
    let tree = out.join(&name);
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing the old {}", tree.display()))?;
    }
    let put = |relative: &str, contents: &[u8], mode: u32| -> anyhow::Result<()> {
        let path = tree.join(relative);
        fs::create_dir_all(path.parent().context("a parent")?)?;
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))
    };
    let read = |relative: &str| fs::read(sources.path(relative)).with_context(|| format!("reading {relative}"));

    put("usr/bin/lb", &fs::read(lb).with_context(|| format!("reading {}", lb.display()))?, 0o755)?;
    let unit = String::from_utf8(read("deploy/lb.service")?).context("lb.service is not UTF-8")?;
    put("lib/systemd/system/lb.service", unit_for_package(&unit).as_bytes(), 0o644)?;
    put("etc/lb/lb.toml", &read("examples/lb.toml")?, 0o644)?;
    put("usr/share/doc/lb/README.md", &read("README.md")?, 0o644)?;
    for file in deploy_files(&sources.path("deploy"))? {
        let relative = file.strip_prefix(&sources.root).context("under the workspace")?;
        let relative = relative.to_str().context("a UTF-8 path")?;
        put(&format!("usr/share/doc/lb/{relative}"), &read(relative)?, 0o644)?;
    }
    docs(lb, &tree)?;
    put("DEBIAN/conffiles", b"/etc/lb/lb.toml\n", 0o644)?;
    put("DEBIAN/control", control(version, arch, installed_size_kib(&tree)?).as_bytes(), 0o644)?;

    let deb = out.join(format!("{name}.deb"));
    run_ok(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&tree).arg(&deb))?;
    Ok(deb)
}

/// `deploy/lb.service` runs `/usr/local/bin/lb` (a hand install); the
/// package puts it in `/usr/bin`.
fn unit_for_package(unit: &str) -> String {
    unit.replace("/usr/local/bin/lb", "/usr/bin/lb").replace("/usr/local/share/doc/lb", "/usr/share/doc/lb")
}

/// Every file under `dir`, sorted.
fn deploy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in fs::read_dir(&next).with_context(|| format!("listing {}", next.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Man pages (gzipped, as Debian installs them) and completions, from
/// `lb generate-docs`.
fn docs(lb: &Path, tree: &Path) -> anyhow::Result<()> {
    let generated = tree.join("../generated-docs");
    if generated.exists() {
        fs::remove_dir_all(&generated)?;
    }
    output_ok(Command::new(lb).arg("generate-docs").arg("--out").arg(&generated))?;
    let man = tree.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    for page in fs::read_dir(generated.join("man1"))? {
        let page = page?.path();
        let name = page.file_name().and_then(|n| n.to_str()).context("a man page name")?;
        fs::copy(&page, man.join(name))?;
        run_ok(Command::new("gzip").args(["-9n"]).arg(man.join(name)))?;
    }
    for (from, to) in [
        ("lb.bash", "usr/share/bash-completion/completions/lb"),
        ("_lb", "usr/share/zsh/vendor-completions/_lb"),
        ("lb.fish", "usr/share/fish/vendor_completions.d/lb.fish"),
    ] {
        let dest = tree.join(to);
        fs::create_dir_all(dest.parent().context("a parent")?)?;
        fs::copy(generated.join("completions").join(from), &dest).with_context(|| format!("copying {from}"))?;
    }
    fs::remove_dir_all(&generated)?;
    Ok(())
}

/// Kibibytes the installed files take, for `Installed-Size`.
fn installed_size_kib(tree: &Path) -> anyhow::Result<u64> {
    let bytes: u64 = deploy_files(tree)?.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    Ok(bytes.div_ceil(1024))
}

fn control(version: &str, arch: &str, size_kib: u64) -> String {
    format!(
        "Package: lb\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: lb developers <lb@example.invalid>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6\n\
         Section: net\n\
         Priority: optional\n\
         Description: XDP layer-4 load balancer\n \
         lb balances TCP and UDP services across healthy backends in the kernel,\n \
         with an XDP program, Maglev hashing and a connection table. The agent\n \
         health-checks the backends, serves a status page and Prometheus metrics,\n \
         and keeps forwarding across restarts. Enable it with\n \
         `systemctl enable --now lb` after editing /etc/lb/lb.toml.\n"
    )
}

/// Installs `deb` into the empty directory `root` with `dpkg --root`, as
/// the package test does; `force_not_root` lets a non-root user try.
pub fn install_into(deb: &Path, root: &Path) -> anyhow::Result<()> {
    let admin = root.join("var/lib/dpkg");
    for dir in ["updates", "info", "triggers"] {
        fs::create_dir_all(admin.join(dir))?;
    }
    fs::write(admin.join("status"), b"")?;
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display())).args(["--force-not-root", "--force-depends", "-i"]).arg(deb);
    let said = output_ok(&mut cmd)?;
    if !root.join("usr/bin/lb").exists() {
        bail!("dpkg installed no /usr/bin/lb:\n{said}");
    }
    Ok(())
}

/// Installs `deb` into a fresh root under `target/dist/` and runs what the
/// unit's `ExecStartPre` runs (`lb check` on the packaged config), from
/// inside that root; prints what it installed.
pub fn check(deb: &Path) -> anyhow::Result<()> {
    let root = deb.with_extension("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    install_into(deb, &root)?;
    let unit = fs::read_to_string(root.join("lib/systemd/system/lb.service")).context("the installed unit")?;
    let pre = unit.lines().find_map(|l| l.strip_prefix("ExecStartPre=")).context("the unit has an ExecStartPre")?;
    // The unit's absolute paths, inside the fresh root.
    let args: Vec<String> = pre
        .split_whitespace()
        .map(|a| a.strip_prefix('/').map_or_else(|| a.to_owned(), |inner| root.join(inner).display().to_string()))
        .collect();
    let said = output_ok(Command::new(&args[0]).args(&args[1..]))?;
    println!("dist: installed into {}; `{pre}` there: {}", root.display(), said.trim());
    for path in [
        "usr/share/man/man1/lb.1.gz",
        "usr/share/man/man1/lb-status.1.gz",
        "usr/share/bash-completion/completions/lb",
        "usr/share/zsh/vendor-completions/_lb",
        "usr/share/fish/vendor_completions.d/lb.fish",
        "usr/share/doc/lb/deploy/prometheus/alerts.yml",
        "usr/share/doc/lb/deploy/grafana/lb-dashboard.json",
    ] {
        if !root.join(path).exists() {
            bail!("the package installed no /{path}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_the_packaged_binary() {
        let unit = unit_for_package("ExecStart=/usr/local/bin/lb run --config /etc/lb/lb.toml\n");
        assert_eq!(unit, "ExecStart=/usr/bin/lb run --config /etc/lb/lb.toml\n");
    }

    #[test]
    fn the_control_file_continues_its_description_lines() {
        let control = control("0.1.0", "amd64", 10);
        assert!(control.lines().skip_while(|l| !l.starts_with("Description:")).skip(1).all(|l| l.starts_with(' ')));
        assert!(control.ends_with('\n'));
    }
}
