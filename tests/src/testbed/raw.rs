//! Hand-made IPv4 packets sent from inside a namespace: spoofed sources,
//! single packets of any protocol, floods of a bounded count. For the tests
//! of what the gateway does with traffic that no well-behaved client sends.
//!
//! Packets go out through a raw socket (`IPPROTO_RAW`, which implies
//! `IP_HDRINCL`): the kernel routes them by destination and sends them as
//! they are, whatever their source address.

use std::{io, mem::size_of, net::Ipv4Addr};

use anyhow::Context as _;
use etherparse::PacketBuilder;

use super::Namespace;

/// A TCP segment from `src` to `dst` with the given flags (`SYN`, `ACK`,
/// `RST` below), as a whole IPv4 datagram with valid checksums.
#[must_use]
pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, ttl: u8) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(src.0.octets(), dst.0.octets(), ttl).tcp(src.1, dst.1, 1000, 64240);
    let builder = if flags & SYN != 0 { builder.syn() } else { builder };
    let builder = if flags & ACK != 0 { builder.ack(1) } else { builder };
    let builder = if flags & RST != 0 { builder.rst() } else { builder };
    let mut out = Vec::new();
    // Writing into a Vec cannot fail; the builder checks its own sizes.
    builder.write(&mut out, &[]).expect("a TCP segment without payload fits");
    out
}

/// A UDP datagram from `src` to `dst`, as a whole IPv4 datagram.
#[must_use]
pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.0.octets(), dst.0.octets(), ttl)
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("a small UDP datagram fits");
    out
}

/// An IPv4 datagram of protocol `proto` carrying `payload`.
#[must_use]
pub fn ip(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = etherparse::Ipv4Header::new(
        u16::try_from(payload.len()).expect("a small payload"),
        ttl,
        etherparse::IpNumber(proto),
        src.octets(),
        dst.octets(),
    )
    .expect("a valid header");
    header.header_checksum = header.calc_header_checksum();
    let mut out = header.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;

/// Sends each of `datagrams` (whole IPv4 datagrams) once, from inside `ns`,
/// to the destination in its header. Returns how many the kernel took.
///
/// # Errors
///
/// When the namespace cannot be entered or the raw socket cannot be opened.
pub fn send(ns: &Namespace, datagrams: &[Vec<u8>]) -> anyhow::Result<usize> {
    ns.enter(|| send_here(datagrams)).with_context(|| format!("entering {}", ns.name()))?
}

fn send_here(datagrams: &[Vec<u8>]) -> anyhow::Result<usize> {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a raw IPv4 socket");
    }
    let mut sent = 0;
    for datagram in datagrams {
        if datagram.len() < 20 {
            continue;
        }
        let dst = [datagram[16], datagram[17], datagram[18], datagram[19]];
        // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes(dst);
        // A full queue (ENOBUFS) is waited out a little, at most 100 times.
        for _ in 0..100 {
            // SAFETY: the buffer and address are valid for the call.
            let n = unsafe {
                libc::sendto(
                    fd,
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    0,
                    std::ptr::addr_of!(addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                sent += 1;
                break;
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::ENOBUFS) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    // SAFETY: the fd opened above, closed once.
    unsafe { libc::close(fd) };
    Ok(sent)
}
