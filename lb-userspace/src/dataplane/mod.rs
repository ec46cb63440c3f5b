//! The kernel side of the agent: loading and attaching the XDP program, and
//! typed access to its maps. Only this module talks to aya.

mod loader;
mod maps;

pub use loader::{EBPF_OBJECT, LoadOptions, Program};
pub use maps::{ConntrackStats, Maps, OCCUPANCY_MAX_AGE};

use std::path::PathBuf;

/// What can go wrong between the agent and the kernel.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The binary was built with `AYA_BUILD_SKIP`, so it holds no program.
    #[error("this lb binary was built without its XDP program (AYA_BUILD_SKIP); rebuild it with `cargo xtask build`")]
    NoObject,
    /// The object failed to load: most often the verifier's verdict.
    #[error("loading the XDP program failed")]
    Load {
        #[source]
        // Boxed: it is large, and every Result of this module would carry its size.
        source: Box<aya::EbpfError>,
    },
    /// The program section was missing or refused by the verifier.
    #[error("the kernel refused the XDP program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// Attaching to an interface failed.
    #[error("attaching to {interface} in {mode} mode failed{hint}")]
    Attach {
        interface: String,
        mode: &'static str,
        hint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// The object lacks a map the agent needs: agent and program disagree.
    #[error("the XDP program has no map {name}")]
    MissingMap { name: &'static str },
    /// A map operation failed.
    #[error("{op} on map {name} failed")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning to bpffs failed.
    #[error("pinning to {path} failed")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}
