//! Control logic: what the maps must hold, decided without touching the kernel.
//!
//! [`plan`] turns a config reload into actions; [`balancer::Balancer`] owns ids,
//! health and the shadow rings and applies those actions; [`maglev`] builds
//! rings and their diffs; everything reaches the kernel through the
//! [`crate::dataplane::Dataplane`] trait, so all of it is tested without root.

pub mod balancer;
pub mod maglev;
pub mod plan;
pub mod runtime;
