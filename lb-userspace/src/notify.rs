//! systemd's readiness protocol (`sd_notify`), written out: one datagram
//! per state change to the Unix socket named by `$NOTIFY_SOCKET`, which
//! systemd sets for `Type=notify` units. Outside systemd it does nothing.
//!
//! The agent sends `READY=1` once the data path is attached and every
//! checked backend's health is known (adopted, or decided by a first
//! probe), `RELOADING=1` and `READY=1` around a reload, and `STOPPING=1` on
//! its way out, each with a `STATUS=` line for `systemctl status`.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=VALUE` lines) to systemd, if it
/// listens. Errors are logged at debug level: readiness is best effort.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = address(&path).and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
    });
    if let Err(error) = result {
        tracing::debug!(%error, "sd_notify failed");
    }
}

/// The socket's address: a path, or `@name` in the abstract namespace.
fn address(path: &std::ffi::OsStr) -> std::io::Result<SocketAddr> {
    use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(path),
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// `RELOADING=1`, stamped with `CLOCK_MONOTONIC` as `Type=notify-reload` wants.
pub fn reloading() {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec.saturating_mul(1_000_000).saturating_add(ts.tv_nsec / 1000);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config"));
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={status}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("lb-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).expect("bind");
        // SAFETY: this test is the only one that touches NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        ready("attached");
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 128];
        let n = listener.recv(&mut buf).expect("a datagram");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=attached");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
