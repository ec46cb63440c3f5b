//! Exists only to give the crate a library target, so that `lb-userspace` can
//! name it as a build-dependency and cargo rebuilds the agent when it changes.
#![no_std]
