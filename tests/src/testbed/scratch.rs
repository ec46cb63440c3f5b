//! A lone network namespace, for tools that build their own links in it
//! (the kernel benchmarks run `lb-bench` inside one).

use std::sync::atomic::Ordering;

use super::{
    NETNS_ADD, NEXT_ID, Namespace, lock,
    netns::{self, Reaper, ip},
};

/// A network namespace holding only `lo` (up), named `lbs<pid>x<n>-<role>`
/// so that several in parallel never collide. Dropping it kills whatever
/// still runs inside (by PID) and deletes it; a watchdog does the same if
/// this process dies without unwinding (Ctrl-C, SIGKILL).
#[derive(Debug)]
pub struct ScratchNamespace {
    ns: Namespace,
    reaper: Option<Reaper>,
}

impl ScratchNamespace {
    /// Creates the namespace; `role` ends its name (e.g. `packet`).
    ///
    /// # Errors
    ///
    /// When not root, or `ip` fails; a namespace made half-way is deleted.
    pub fn create(role: &str) -> anyhow::Result<Self> {
        crate::require_root()?;
        let name = format!("lbs{}x{}-{role}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let mut reaper = Reaper::spawn()?;
        {
            let _serial = lock(&NETNS_ADD);
            ip(&["netns", "add", &name])?;
        }
        // From here on, dropping `scratch` deletes the namespace.
        let mut scratch = Self { ns: Namespace::new(name), reaper: None };
        reaper.watch(&scratch.ns)?;
        scratch.reaper = Some(reaper);
        ip(&["-n", scratch.ns.name(), "link", "set", "lo", "up"])?;
        Ok(scratch)
    }

    /// The namespace, to run commands in it.
    #[must_use]
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }
}

impl Drop for ScratchNamespace {
    fn drop(&mut self) {
        netns::remove(&self.ns, "scratch namespace");
        if let Some(mut reaper) = self.reaper.take() {
            reaper.dismiss();
        }
    }
}
