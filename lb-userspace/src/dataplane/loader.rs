//! Loading the XDP program with maps sized from the config, and attaching it,
//! either for the life of the process or pinned (see [`super::pins`]).

use aya::programs::{
    Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
};
use aya::{Ebpf, EbpfLoader};
use lb_common::{limits::RINGS_PER_VIP, map_names};

use super::{DataplaneError, Maps, pins::PinDir};

/// The compiled `lb-ebpf` object, embedded at build time by `build.rs`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "lb_xdp";

/// Map sizes that come from the config rather than `lb_common::limits`.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Slots per Maglev ring (prime).
    pub ring_size: u32,
    /// VIPs the Maglev array has room for.
    pub max_vips: u32,
    /// Entries in each connection-table map.
    pub conntrack_capacity: u32,
}

impl LoadOptions {
    /// Entries of the `MAGLEV` array: two rings per VIP id.
    #[must_use]
    pub fn maglev_entries(&self) -> u32 {
        self.max_vips.saturating_mul(RINGS_PER_VIP).saturating_mul(self.ring_size)
    }
}

/// How [`Program::attach`] found the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link (pinned, if the program is).
    New,
    /// A pinned link of an earlier agent now runs this program: replaced
    /// atomically (`bpf_link_update`), packets never saw no program.
    Replaced,
}

/// The loaded program, and the interfaces it is attached to. Unpinned, dropping it
/// detaches from every interface; pinned, the links stay in bpffs.
pub struct Program {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
    /// Where its maps and links are pinned, if they are.
    pin_dir: Option<std::path::PathBuf>,
}

impl Program {
    /// Loads the program through the verifier, with maps sized by `opts`.
    ///
    /// # Errors
    /// [`DataplaneError::Load`] or [`DataplaneError::Program`] when the kernel
    /// refuses it; the source error carries the verifier log.
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        Self::load_in(opts, None)
    }

    /// Loads the program with every map pinned in `pins`: maps already
    /// pinned there are reused as they are (the caller checked them with
    /// [`PinDir::inspect`]), the others are created and pinned.
    ///
    /// # Errors
    ///
    /// As [`Program::load`].
    pub fn load_pinned(opts: &LoadOptions, pins: &PinDir) -> Result<Self, DataplaneError> {
        Self::load_in(opts, Some(pins))
    }

    fn load_in(opts: &LoadOptions, pins: Option<&PinDir>) -> Result<Self, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::MAGLEV, opts.maglev_entries())
            .map_max_entries(map_names::CONNTRACK, opts.conntrack_capacity);
        if let Some(pins) = pins {
            for &name in map_names::ALL {
                loader.map_pin_path(name, pins.map_path(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| DataplaneError::Load { source: Box::new(source) })?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(|source| DataplaneError::Program { name: PROGRAM_NAME, source: Box::new(source) })?;
        Ok(Self { ebpf, links: Vec::new(), pin_dir: pins.map(|p| p.path().to_owned()) })
    }

    /// Attaches to `interface`.
    ///
    /// # Errors
    /// [`DataplaneError::Attach`], whose message names the next thing to try.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<Attached, DataplaneError> {
        let Some(dir) = self.pin_dir.clone() else {
            let link_id = self.attach_new(interface, mode)?;
            self.links.push((interface.to_owned(), link_id));
            return Ok(Attached::New);
        };
        let path = super::pins::link_path_in(&dir, interface);
        if path.exists() {
            self.replace_pinned(interface, &path)?;
            return Ok(Attached::Replaced);
        }
        let link_id = self.attach_new(interface, mode)?;
        // Pinned, the link holds XDP on the interface after this process
        // ends; the handle is closed at once, so nothing but the pin does.
        let pin_error = |source| DataplaneError::Pin { path: path.clone(), source };
        let program = xdp_program(&mut self.ebpf)?;
        let link = program.take_link(link_id).map_err(|source| link_error(interface, source))?;
        let fd_link =
            FdLink::try_from(link).map_err(|_| DataplaneError::NotALink { interface: interface.to_owned() })?;
        drop(fd_link.pin(&path).map_err(pin_error)?);
        Ok(Attached::New)
    }

    /// Points the pinned link at `path` to this program, atomically.
    fn replace_pinned(&mut self, interface: &str, path: &std::path::Path) -> Result<(), DataplaneError> {
        let not_a_link = || DataplaneError::NotALink { interface: interface.to_owned() };
        let pinned = PinnedLink::from_pin(path).map_err(|_| not_a_link())?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|_| not_a_link())?;
        let program = xdp_program(&mut self.ebpf)?;
        let link_id = program.attach_to_link(link).map_err(|source| link_error(interface, source))?;
        // Close this process's handle; the pin keeps the link.
        drop(program.take_link(link_id).map_err(|source| link_error(interface, source))?);
        Ok(())
    }

    fn attach_new(&mut self, interface: &str, mode: XdpMode) -> Result<XdpLinkId, DataplaneError> {
        let mode_name = if mode == XdpMode::Skb { "generic" } else { "native" };
        let program = xdp_program(&mut self.ebpf)?;
        let link = program.attach(interface, mode).map_err(|source| DataplaneError::Attach {
            interface: interface.to_owned(),
            mode: mode_name,
            hint: if mode == XdpMode::Skb {
                "; check that the interface exists and has no other XDP program"
            } else {
                "; if the driver has no native XDP, try xdp_mode = \"generic\""
            },
            source: Box::new(source),
        })?;
        Ok(link)
    }

    /// Detaches from every interface, newest first; errors are logged, as
    /// there is nothing better to do on the way out.
    pub fn detach_all(&mut self) {
        let Ok(program) = xdp_program(&mut self.ebpf) else { return };
        while let Some((interface, link)) = self.links.pop() {
            match program.detach(link) {
                Ok(()) => tracing::info!(%interface, "detached"),
                Err(error) => tracing::warn!(%interface, %error, "detach failed"),
            }
        }
    }

    /// Typed handles on the program's maps.
    ///
    /// # Errors
    /// [`DataplaneError::MissingMap`] if the object lacks one.
    pub fn maps(&mut self) -> Result<Maps, DataplaneError> {
        Maps::take_from(&mut self.ebpf)
    }

    /// The program itself, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    ///
    /// # Errors
    /// [`DataplaneError::Program`] if the object has no such XDP program.
    pub fn xdp(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn link_error(interface: &str, source: aya::programs::ProgramError) -> DataplaneError {
    DataplaneError::Attach { interface: interface.to_owned(), mode: "pinned", hint: "", source: Box::new(source) }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    let program = ebpf.program_mut(PROGRAM_NAME).ok_or_else(|| DataplaneError::Program {
        name: PROGRAM_NAME,
        source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
    })?;
    program.try_into().map_err(|source| DataplaneError::Program { name: PROGRAM_NAME, source: Box::new(source) })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, whose default
/// (8 MiB or less) is smaller than one Maglev ring pair for a few VIPs.
/// Newer kernels account to the memory cgroup and ignore it.
fn raise_memlock_limit() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads a valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if rc != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}
