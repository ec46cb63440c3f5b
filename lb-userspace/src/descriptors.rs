//! File descriptors: the agent raises its limit at start, then splits what
//! it has so that nothing can take the descriptors health probes need.
//!
//! Every probe needs a socket. If admin clients could hold the rest (1,100
//! idle connections under systemd's default soft limit of 1,024 did), every
//! probe failed with EMFILE and every backend went down. So the limit is
//! divided once, at start: what the agent already holds plus
//! [`HEADROOM`], a cap on admin connections, and the rest for probes in
//! flight, which the checkers share (see `health::ProbePool`).

use std::io;

/// Descriptors kept beyond those open when the budget is made, for the few
/// the agent opens later: the config file on a reload, `/proc` reads, a
/// BPF object a map walk needs.
pub const HEADROOM: u64 = 64;

/// Most probes in flight at once, whatever the limit: 4,096 sockets in
/// connect at a time is more than 8,191 backends probed every second need
/// while they answer within a timeout of half a second.
pub const MAX_PROBES: usize = 4096;

/// The admin server gets at most this share (1/N) of what is left after the
/// reserve, so a low limit still leaves most descriptors to probes.
const ADMIN_SHARE: u64 = 4;

/// `RLIMIT_NOFILE` of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// What `open`, `socket` and `accept` are held to.
    pub soft: u64,
    /// How far an unprivileged process may raise `soft`.
    pub hard: u64,
}

impl NofileLimit {
    /// The current limit.
    ///
    /// # Errors
    /// When `getrlimit` fails (it does not, for a valid resource).
    pub fn current() -> io::Result<Self> {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid resource and a pointer to an rlimit we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NofileLimit { soft: limit.rlim_cur, hard: limit.rlim_max })
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the limit
/// before and after. systemd starts services with a soft limit of 1,024,
/// which thousands of backends, each probed with a socket of its own, would
/// exceed; the hard limit is what the operator allowed.
///
/// # Errors
/// When the limit cannot be read or set.
pub fn raise_nofile_limit() -> io::Result<(NofileLimit, NofileLimit)> {
    let before = NofileLimit::current()?;
    if before.soft < before.hard {
        let raised = libc::rlimit { rlim_cur: before.hard, rlim_max: before.hard };
        // SAFETY: a valid resource and a pointer to an initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, NofileLimit::current()?))
}

/// Descriptors this process has open now, from `/proc/self/fd`.
///
/// # Errors
/// When the directory cannot be read.
pub fn open_now() -> io::Result<u64> {
    let count = std::fs::read_dir("/proc/self/fd")?.count();
    // The directory handle counted itself.
    Ok(u64::try_from(count.saturating_sub(1)).unwrap_or(u64::MAX))
}

/// How the descriptor limit is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The soft limit the split is of.
    pub limit: u64,
    /// Held already plus [`HEADROOM`].
    pub reserved: u64,
    /// Admin connections served at once.
    pub admin_connections: usize,
    /// Probes in flight at once (each holds one socket).
    pub probes: usize,
}

impl Budget {
    /// Splits `limit` with `in_use` descriptors open: the reserve first, then
    /// at most `admin_max` (and at most a quarter of the rest) for the admin
    /// server, then up to [`MAX_PROBES`] for probes. Each gets at least one,
    /// so a tiny limit still probes (and may then see local errors, which
    /// never count against a backend).
    #[must_use]
    pub fn split(limit: u64, in_use: u64, admin_max: usize) -> Self {
        let reserved = in_use.saturating_add(HEADROOM);
        let available = limit.saturating_sub(reserved);
        let admin = (available / ADMIN_SHARE).min(as_u64(admin_max)).max(1);
        let probes = available.saturating_sub(admin).min(as_u64(MAX_PROBES)).max(1);
        Budget { limit, reserved, admin_connections: as_usize(admin), probes: as_usize(probes) }
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn as_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemds_default_leaves_most_to_probes() {
        let budget = Budget::split(1024, 40, 256);
        assert_eq!(budget.reserved, 104);
        assert_eq!(budget.admin_connections, 230, "a quarter of 920");
        assert_eq!(budget.probes, 690);
        assert!(budget.reserved + budget.admin_connections as u64 + budget.probes as u64 <= 1024);
    }

    #[test]
    fn a_high_limit_caps_both() {
        let budget = Budget::split(20_000, 40, 256);
        assert_eq!((budget.admin_connections, budget.probes), (256, MAX_PROBES));
        let unlimited = Budget::split(u64::MAX, 40, 256);
        assert_eq!((unlimited.admin_connections, unlimited.probes), (256, MAX_PROBES));
    }

    #[test]
    fn a_tiny_limit_still_probes() {
        let budget = Budget::split(50, 40, 256);
        assert_eq!((budget.admin_connections, budget.probes), (1, 1));
    }

    #[test]
    fn the_limit_is_raised_to_the_hard_limit() {
        let (before, after) = raise_nofile_limit().expect("rlimit");
        assert_eq!(after.soft, before.hard);
        assert_eq!(after.hard, before.hard);
        assert!(open_now().expect("/proc/self/fd") >= 3, "stdio at least");
    }
}
