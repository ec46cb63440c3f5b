//! The gateway host itself: the addresses its interfaces hold, which the
//! data path must know (`lb_common::guard`) so that no packet claiming to
//! come from them opens a balanced flow.

use std::{
    ffi::c_int,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// How often the agent reads the host's addresses again: an address added
/// while it runs is protected within this time.
pub const LOCAL_ADDRESS_REFRESH: Duration = Duration::from_secs(5);

/// Every IPv4 and IPv6 address on the host's interfaces (in the agent's
/// network namespace), loopback included.
///
/// # Errors
/// When `getifaddrs` fails (out of memory, or no netlink socket).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        // SAFETY: ifa_addr is null or points at a sockaddr of the family it names.
        if let Some(ip) = unsafe { sockaddr_ip(entry.ifa_addr) } {
            addrs.push(ip);
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: the head getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// The IP address in a `sockaddr`, if it is one.
///
/// # Safety
/// `addr` is null or points at a valid sockaddr of the family it names.
unsafe fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees a valid sockaddr.
    match c_int::from(unsafe { (*addr).sa_family }) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin = unsafe { &*addr.cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6 = unsafe { &*addr.cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// CLOCK_MONOTONIC in ns: the clock the data path stamps flows with
/// (`bpf_ktime_get_ns`).
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The running kernel's release, as `uname -r` prints it.
#[must_use]
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_local_addresses() {
        let addrs = local_addresses().expect("getifaddrs");
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addrs:?}");
    }
}
