//! Loading the XDP program with maps sized from the config, and attaching it.

use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{limits::RINGS_PER_VIP, map_names};

use super::{DataplaneError, Maps};

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

/// The loaded program, and the interfaces it is attached to. Dropping it
/// detaches from every interface.
pub struct Program {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
}

impl Program {
    /// Loads the program through the verifier, with maps sized by `opts`.
    ///
    /// # Errors
    /// [`DataplaneError::Load`] or [`DataplaneError::Program`] when the kernel
    /// refuses it; the source error carries the verifier log.
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        raise_memlock_limit();
        let maglev_entries = opts.max_vips.saturating_mul(RINGS_PER_VIP).saturating_mul(opts.ring_size);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::MAGLEV, maglev_entries)
            .map_max_entries(map_names::CONNTRACK, opts.conntrack_capacity)
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load { source: Box::new(source) })?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(|source| DataplaneError::Program { name: PROGRAM_NAME, source: Box::new(source) })?;
        Ok(Self { ebpf, links: Vec::new() })
    }

    /// Attaches to `interface`.
    ///
    /// # Errors
    /// [`DataplaneError::Attach`], whose message names the next thing to try.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
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
        self.links.push((interface.to_owned(), link));
        Ok(())
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
