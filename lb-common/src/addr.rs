//! Addresses as the maps hold them, built from std's types: the agent's
//! half of the wire encoding (the program reads the same bytes off the
//! packet). Agent side only (`user` feature).
//!
//! An address is four `u32` words holding its bytes in wire order, in
//! memory order: each word is `from_ne_bytes` of four wire bytes, so no host
//! ever swaps them. IPv4 uses word 0 and leaves the others zero; `family`
//! keeps it apart from the IPv6 address `::a.b.c.d`. Ports are stored
//! `to_be`.

use core::net::IpAddr;

use crate::{FAMILY_V4, FAMILY_V6};

/// The words of `ip`, as every `*_be: [u32; 4]` field holds them.
#[must_use]
pub fn words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            [word(0), word(1), word(2), word(3)]
        }
    }
}

/// `FAMILY_V4` or `FAMILY_V6`.
#[must_use]
pub fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn words_hold_the_wire_bytes_in_memory_order() {
        let v4 = words(IpAddr::V4(Ipv4Addr::new(198, 18, 2, 11)));
        assert_eq!(v4, [u32::from_ne_bytes([198, 18, 2, 11]), 0, 0, 0]);
        let v6 = words(IpAddr::V6("2001:db8::5".parse::<Ipv6Addr>().expect("address")));
        assert_eq!(v6[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(v6[3].to_ne_bytes(), [0, 0, 0, 5]);
        assert_eq!(
            (family(IpAddr::V4(Ipv4Addr::LOCALHOST)), family(IpAddr::V6(Ipv6Addr::LOCALHOST))),
            (FAMILY_V4, FAMILY_V6)
        );
    }
}
