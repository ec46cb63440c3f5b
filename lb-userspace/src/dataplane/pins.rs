//! The pin directory: where the program's links and maps live in bpffs, so
//! the data path outlives the agent.
//!
//! ```text
//! /sys/fs/bpf/lb/            (agent.pin_dir)
//!   LAYOUT -> lb-layout-v3   the layout version (a symlink: bpffs has no regular files)
//!   link_eth0, link_eth1     one bpf_link per interface: XDP stays attached while it is pinned
//!   VIPS, BACKENDS, MAGLEV, CONNTRACK, ...   every map, by its name in lb_common::map_names
//! ```
//!
//! A starting agent takes an exclusive `flock` on the directory, so two
//! agents never share one, and `lb unload` or `lb status` can tell whether an
//! agent runs. Before adopting, it compares every pinned map with what its
//! own program declares (type, key and value sizes, capacity, flags) and the
//! layout version with [`LAYOUT_VERSION`]; any difference is refused with
//! the list of what differs (see [`Inspection`]).

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use lb_common::{
    layout::{LAYOUT_PIN, LAYOUT_TAG_PREFIX, LAYOUT_VERSION, LINK_PIN_PREFIX},
    map_names,
};

use super::{EBPF_OBJECT, LoadOptions};

/// The mount point a bpffs is mounted on when none is there.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `statfs` magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What can go wrong with the pin directory.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// Not on a bpffs, and not where the agent may mount one.
    #[error(
        "{path} is not on a bpffs; mount one (`mount -t bpf bpf {mount}`) or set agent.pin_dir below {BPFFS_MOUNT}"
    )]
    NotBpffs { path: PathBuf, mount: PathBuf },
    /// A file system operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another agent holds the directory.
    #[error("another lb agent is running on {path} (it holds the directory's lock); stop it first")]
    Busy { path: PathBuf },
    /// The program object could not be parsed (a broken build).
    #[error("parsing the embedded XDP program: {reason}")]
    Object { reason: String },
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io { op, path: path.to_owned(), source }
}

/// What the directory holds, compared with what this binary would pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// Nothing pinned: a fresh start.
    Empty,
    /// Every map is pinned as this binary's program declares it, with the
    /// same layout version: adopt it.
    Matches {
        /// Interfaces whose link is pinned.
        links: Vec<String>,
    },
    /// Pinned state this binary must not read: each line says what differs.
    Differs {
        differences: Vec<String>,
        /// Interfaces whose link is pinned: if none, nothing forwards on
        /// the old state and it may be cleared without loss.
        links: Vec<String>,
    },
}

/// A locked pin directory (see the module docs). The lock is released when
/// this is dropped, or when the process dies.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    _lock: File,
}

impl PinDir {
    /// Makes sure `path`'s parent is on a bpffs (mounting one on
    /// [`BPFFS_MOUNT`] when the path is below it and none is mounted),
    /// creates the directory (mode 0700) and locks it.
    ///
    /// # Errors
    ///
    /// [`PinError::NotBpffs`], [`PinError::Busy`] when another agent holds
    /// it, or [`PinError::Io`].
    pub fn open(path: &Path) -> Result<Self, PinError> {
        ensure_bpffs(path)?;
        if !path.is_dir() {
            fs::create_dir(path).map_err(io_error("creating", path))?;
            set_mode(path, 0o700)?;
        }
        let lock = File::open(path).map_err(io_error("opening", path))?;
        if !try_lock(&lock) {
            return Err(PinError::Busy { path: path.to_owned() });
        }
        Ok(PinDir { path: path.to_owned(), _lock: lock })
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where map `name` is pinned.
    #[must_use]
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Where the link to `interface` is pinned.
    #[must_use]
    pub fn link_path(&self, interface: &str) -> PathBuf {
        link_path(&self.path, interface)
    }

    /// Compares what is pinned with what this binary's program declares,
    /// with the map sizes of `opts`.
    ///
    /// # Errors
    ///
    /// [`PinError::Object`] if the embedded program cannot be parsed, or
    /// [`PinError::Io`] if the directory cannot be read.
    pub fn inspect(&self, opts: &LoadOptions) -> Result<Inspection, PinError> {
        inspect(&self.path, opts)
    }

    /// Records this binary's layout version (after the maps are pinned).
    ///
    /// # Errors
    ///
    /// [`PinError::Io`].
    pub fn write_layout(&self) -> Result<(), PinError> {
        let path = self.path.join(LAYOUT_PIN);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(layout_tag(), &path).map_err(io_error("writing the layout tag", &path))
    }

    /// Removes every pin in the directory (links first, so XDP is detached
    /// before its maps go), keeping the directory and its lock.
    ///
    /// # Errors
    ///
    /// [`PinError::Io`] naming the first pin that could not be removed.
    pub fn clear(&self) -> Result<Vec<String>, PinError> {
        clear(&self.path)
    }

    /// Removes every pin and the directory itself: nothing is left.
    ///
    /// # Errors
    ///
    /// As [`PinDir::clear`].
    pub fn remove(self) -> Result<Vec<String>, PinError> {
        let detached = clear(&self.path)?;
        fs::remove_dir(&self.path).map_err(io_error("removing", &self.path))?;
        Ok(detached)
    }
}

/// The text the layout symlink points to.
#[must_use]
pub fn layout_tag() -> String {
    format!("{LAYOUT_TAG_PREFIX}{LAYOUT_VERSION}")
}

/// Where the link to `interface` is pinned in `dir`.
#[must_use]
pub fn link_path_in(dir: &Path, interface: &str) -> PathBuf {
    link_path(dir, interface)
}

fn link_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{LINK_PIN_PREFIX}{interface}"))
}

/// Interfaces with a pinned link in `dir`.
///
/// # Errors
///
/// [`PinError::Io`] if the directory cannot be read.
pub fn pinned_links(dir: &Path) -> Result<Vec<String>, PinError> {
    let mut links: Vec<String> =
        entries(dir)?.into_iter().filter_map(|name| name.strip_prefix(LINK_PIN_PREFIX).map(str::to_owned)).collect();
    links.sort();
    Ok(links)
}

fn entries(dir: &Path) -> Result<Vec<String>, PinError> {
    let read = fs::read_dir(dir).map_err(io_error("reading", dir))?;
    Ok(read.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect())
}

/// See [`PinDir::inspect`].
fn inspect(dir: &Path, opts: &LoadOptions) -> Result<Inspection, PinError> {
    let names = entries(dir)?;
    if names.is_empty() {
        return Ok(Inspection::Empty);
    }
    let links = pinned_links(dir)?;
    let mut differences = Vec::new();
    match fs::read_link(dir.join(LAYOUT_PIN)) {
        Ok(tag) if tag.as_os_str() == layout_tag().as_str() => {}
        Ok(tag) => differences.push(format!(
            "layout version: pinned {}, this lb's {}",
            tag.to_string_lossy().trim_start_matches(LAYOUT_TAG_PREFIX),
            LAYOUT_VERSION
        )),
        Err(_) => differences.push(format!("no {LAYOUT_PIN} tag: not pinned by a compatible lb")),
    }
    for (name, wanted) in expected_maps(opts)? {
        let path = dir.join(name);
        if !path.exists() {
            differences.push(format!("{name}: not pinned"));
            continue;
        }
        match MapInfo::from_pin(&path) {
            Ok(info) => differences.extend(compare(name, &info, &wanted)),
            Err(error) => differences.push(format!("{name}: unreadable ({error})")),
        }
    }
    let known = |n: &String| n == LAYOUT_PIN || n.starts_with(LINK_PIN_PREFIX) || map_names::ALL.contains(&n.as_str());
    differences.extend(names.iter().filter(|n| !known(n)).map(|n| format!("{n}: pinned, but this lb has no such map")));
    Ok(if differences.is_empty() { Inspection::Matches { links } } else { Inspection::Differs { differences, links } })
}

/// A map as this binary's program would create it.
struct WantedMap {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

/// Every named map of the embedded program, with the sizes the loader sets.
fn expected_maps(opts: &LoadOptions) -> Result<Vec<(&'static str, WantedMap)>, PinError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| PinError::Object { reason: e.to_string() })?;
    let mut maps = Vec::new();
    for &name in map_names::ALL {
        let Some(map) = object.maps.get(name) else {
            return Err(PinError::Object { reason: format!("it has no map {name}") });
        };
        let max_entries = match name {
            map_names::MAGLEV => opts.maglev_entries(),
            map_names::CONNTRACK => opts.conntrack_capacity,
            _ => map.max_entries(),
        };
        maps.push((
            name,
            WantedMap {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                flags: map.map_flags(),
            },
        ));
    }
    Ok(maps)
}

/// What differs between a pinned map and the wanted one, one line each.
fn compare(name: &str, info: &MapInfo, wanted: &WantedMap) -> Vec<String> {
    let map_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
    let mut out = Vec::new();
    let mut check = |what: &str, pinned: u32, want: u32, hint: &str| {
        if pinned != want {
            out.push(format!("{name}: {what} {pinned} pinned, {want} wanted{hint}"));
        }
    };
    check("map type", map_type, wanted.map_type, "");
    check("key size", info.key_size(), wanted.key_size, "");
    check("value size", info.value_size(), wanted.value_size, "");
    let hint = match name {
        map_names::MAGLEV => " (agent.ring_size or agent.max_vips changed)",
        map_names::CONNTRACK => " (agent.conntrack_capacity changed)",
        _ => "",
    };
    check("capacity", info.max_entries(), wanted.max_entries, hint);
    check("flags", info.map_flags(), wanted.flags, "");
    out
}

/// Unpins every link (detaching XDP), then every other pin; returns the
/// interfaces detached.
fn clear(dir: &Path) -> Result<Vec<String>, PinError> {
    let links = pinned_links(dir)?;
    for interface in &links {
        let path = link_path(dir, interface);
        fs::remove_file(&path).map_err(io_error("unpinning", &path))?;
    }
    for name in entries(dir)? {
        let path = dir.join(&name);
        fs::remove_file(&path).map_err(io_error("unpinning", &path))?;
    }
    Ok(links)
}

/// Whether an agent holds the lock of `dir` (it exists and is locked).
#[must_use]
pub fn agent_holds(dir: &Path) -> bool {
    File::open(dir).is_ok_and(|file| !try_lock(&file))
}

/// `lb unload`: removes every link (detaching XDP), every pin and the
/// directory. Returns the interfaces detached; `Ok(None)` when nothing was pinned.
///
/// # Errors
///
/// [`PinError::Busy`] while an agent runs on it (its own handles would keep
/// the data path alive), or [`PinError::Io`].
pub fn unload(dir: &Path) -> Result<Option<Vec<String>>, PinError> {
    if !dir.exists() {
        return Ok(None);
    }
    let lock = File::open(dir).map_err(io_error("opening", dir))?;
    if !try_lock(&lock) {
        return Err(PinError::Busy { path: dir.to_owned() });
    }
    let detached = clear(dir)?;
    fs::remove_dir(dir).map_err(io_error("removing", dir))?;
    Ok(Some(detached))
}

/// `flock(LOCK_EX | LOCK_NB)`: whether the lock was taken.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a valid descriptor.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), PinError> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_error("setting the mode of", path))
}

/// Whether `path` is on a bpffs.
fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs fills a zeroed struct from a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    let magic = stat.f_type;
    rc == 0 && magic == BPF_FS_MAGIC
}

/// Makes sure the pin directory's parent is on a bpffs, mounting one on
/// [`BPFFS_MOUNT`] if the directory is below it and nothing is mounted there
/// (what systemd does on most distributions, but not all, and not in containers).
fn ensure_bpffs(dir: &Path) -> Result<(), PinError> {
    let parent = dir.parent().unwrap_or(dir);
    if is_bpffs(parent) {
        return Ok(());
    }
    let mount = Path::new(BPFFS_MOUNT);
    if !dir.starts_with(mount) || is_bpffs(mount) {
        return Err(PinError::NotBpffs { path: parent.to_owned(), mount: mount.to_owned() });
    }
    let c_mount = CString::new(BPFFS_MOUNT).map_err(|e| PinError::Io {
        op: "mounting a bpffs on",
        path: mount.to_owned(),
        source: io::Error::other(e),
    })?;
    let fstype = c"bpf";
    let options = c"mode=0700";
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe { libc::mount(fstype.as_ptr(), c_mount.as_ptr(), fstype.as_ptr(), 0, options.as_ptr().cast()) };
    if rc != 0 {
        return Err(PinError::Io {
            op: "mounting a bpffs on",
            path: mount.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(mount = BPFFS_MOUNT, "mounted a bpffs");
    if is_bpffs(parent) { Ok(()) } else { Err(PinError::NotBpffs { path: parent.to_owned(), mount: mount.to_owned() }) }
}
