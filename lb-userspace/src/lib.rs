//! The lb agent library: everything `lb` does, testable without the binary.
//!
//! - [`config`]: the TOML file, parsed and validated.
//! - [`control`]: the control plane's decisions (Maglev rings, ids, health), kernel-free.
//! - [`dataplane`]: loading and attaching the XDP program, and its maps.
//! - [`health`]: HTTP and TCP probes with rise/fall thresholds.
//! - [`descriptors`]: the file descriptor limit, raised and split so probes
//!   always have sockets.
//! - [`api`] and [`metrics`]: `/status` and `/metrics`.
//! - [`announce`]: VIP routes for a routing daemon to announce (`[announce]`).
//! - [`agent`] and [`cli`]: `lb run` and the other subcommands.

pub mod agent;
pub mod announce;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod descriptors;
pub mod health;
pub mod host;
pub mod metrics;
pub mod notify;
pub mod process;
