//! Internet checksum arithmetic for the program: incremental updates
//! (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')) and sums built from scratch
//! (RFC 1071). Pure, so it is tested on the host against a reference.
//!
//! All values are 16-bit words exactly as stored in the packet; the ones'
//! complement sum is byte-order neutral, so no swapping is needed.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// The checksum after a 32-bit field (an IPv4 address) changed.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// The checksum after a 128-bit field (an IPv6 address) changed.
#[inline(always)]
pub fn replace128(check: u16, old: [u32; 4], new: [u32; 4]) -> u16 {
    let mut sum = check;
    sum = replace32(sum, old[0], new[0]);
    sum = replace32(sum, old[1], new[1]);
    sum = replace32(sum, old[2], new[2]);
    replace32(sum, old[3], new[3])
}

/// A UDP checksum of 0 means "none" (RFC 768), so a computed 0 is sent as 0xffff.
#[inline(always)]
pub fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// Adds 16-bit words, as stored in the packet, to a ones' complement sum
/// being built from scratch (at most a few hundred words, so no overflow).
#[inline(always)]
pub fn add_words(sum: u32, words: &[u16]) -> u32 {
    let mut sum = sum;
    for w in words {
        sum += u32::from(*w);
    }
    sum
}

/// Adds a 32-bit field (an IPv4 address, as stored) to a sum.
#[inline(always)]
pub fn add32(sum: u32, v: u32) -> u32 {
    sum + u32::from(v as u16) + (v >> 16)
}

/// Adds a 128-bit field (an IPv6 address, as stored) to a sum.
#[inline(always)]
pub fn add128(sum: u32, v: [u32; 4]) -> u32 {
    add32(add32(add32(add32(sum, v[0]), v[1]), v[2]), v[3])
}

/// The checksum to store for a sum built from scratch.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    /// RFC 1071 from its text, over wire bytes (big-endian words, an odd
    /// byte padded with zero): the checksum's two bytes as they go on the
    /// wire. Independent of the functions above.
    fn reference(bytes: &[u8]) -> [u8; 2] {
        let mut sum: u64 = 0;
        for chunk in bytes.chunks(2) {
            sum += u64::from(u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        (!(sum as u16)).to_be_bytes()
    }

    /// Whether `sum` plus `check` is all ones: the receiver accepts it.
    fn verifies(bytes: &[u8], check: [u8; 2]) -> bool {
        let mut with = bytes.to_vec();
        with.extend_from_slice(&check);
        reference(&with) == [0, 0]
    }

    /// Ones' complement has two zeros: 0x0000 and 0xffff are the same checksum.
    fn same(a: [u8; 2], b: [u8; 2]) -> bool {
        a == b || (a == [0, 0] && b == [0xff, 0xff]) || (a == [0xff, 0xff] && b == [0, 0])
    }

    fn stored(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    fn stored32(bytes: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    }

    /// A fixed pseudo-random sequence (xorshift), so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }

        /// Mostly random bytes, sometimes runs of 0x00 or 0xff, where ones'
        /// complement arithmetic has its edge cases.
        fn field(&mut self, len: usize) -> Vec<u8> {
            match self.next() % 4 {
                0 => std::vec![0; len],
                1 => std::vec![0xff; len],
                _ => self.bytes(len),
            }
        }
    }

    const CASES: usize = 20_000;

    #[test]
    fn a_sum_from_scratch_is_the_reference_checksum() {
        let mut rng = Rng(0x005e_edc5);
        for _ in 0..CASES {
            let len = 2 * (rng.next() % 40) as usize;
            let bytes = rng.field(len);
            let words: Vec<u16> = (0..len).step_by(2).map(|at| stored(&bytes, at)).collect();
            assert_eq!(finish(add_words(0, &words)).to_ne_bytes(), reference(&bytes), "{bytes:02x?}");
            // Addresses added whole, as pseudo-headers do, sum like their words.
            if len >= 16 {
                let words16 = [stored32(&bytes, 0), stored32(&bytes, 4), stored32(&bytes, 8), stored32(&bytes, 12)];
                let head = add128(0, words16);
                let rest = add_words(head, &words[8..]);
                assert_eq!(finish(rest).to_ne_bytes(), reference(&bytes));
                assert_eq!(finish(add_words(add32(0, words16[0]), &words[2..])).to_ne_bytes(), reference(&bytes));
            }
        }
    }

    #[test]
    fn updates_agree_with_recomputing_from_scratch() {
        let mut rng = Rng(0x00c0_ffee);
        for case in 0..CASES {
            // A packet of 8..88 words with a field of 2, 4 or 16 bytes at an
            // even offset, changed to another value.
            let len = 2 * (8 + rng.next() % 80) as usize;
            let mut bytes = rng.field(len);
            let width = [2, 4, 16][case % 3];
            let at = 2 * (rng.next() as usize % ((len - width) / 2 + 1));
            let check = reference(&bytes);
            let new = rng.field(width);
            let updated = match width {
                2 => replace16(u16::from_ne_bytes(check), stored(&bytes, at), u16::from_ne_bytes([new[0], new[1]])),
                4 => replace32(u16::from_ne_bytes(check), stored32(&bytes, at), stored32(&new, 0)),
                _ => {
                    let old = [
                        stored32(&bytes, at),
                        stored32(&bytes, at + 4),
                        stored32(&bytes, at + 8),
                        stored32(&bytes, at + 12),
                    ];
                    let to = [stored32(&new, 0), stored32(&new, 4), stored32(&new, 8), stored32(&new, 12)];
                    replace128(u16::from_ne_bytes(check), old, to)
                }
            }
            .to_ne_bytes();
            bytes[at..at + width].copy_from_slice(&new);
            // All-zero data sums to +0, which no checksum in the other zero's
            // form verifies; no real header is all zero (version, protocol).
            let all_zero = bytes.iter().all(|&b| b == 0);
            assert!(
                all_zero || verifies(&bytes, updated),
                "case {case}: {updated:02x?} does not verify over {bytes:02x?}"
            );
            assert!(same(updated, reference(&bytes)), "case {case}: {updated:02x?} vs {:02x?}", reference(&bytes));
        }
    }

    #[test]
    fn a_udp_checksum_is_never_sent_as_zero() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
        assert_eq!(udp_nonzero(0xffff), 0xffff);
    }

    #[test]
    fn updates_match_etherparse_for_a_rewritten_packet() {
        use etherparse::{Ipv4Header, TcpHeader};
        let mut rng = Rng(0x00ba_110c);
        for _ in 0..2_000 {
            let len = (rng.next() % 64) as usize;
            let payload = rng.bytes(len);
            let (src, dst) = (rng.next() as u32, rng.next() as u32);
            let (sport, dport) = (rng.next() as u16, rng.next() as u16);
            let mut ip = Ipv4Header::new(
                20 + payload.len() as u16,
                64,
                etherparse::IpNumber::TCP,
                src.to_be_bytes(),
                dst.to_be_bytes(),
            )
            .expect("ipv4 header");
            ip.header_checksum = ip.calc_header_checksum();
            let mut tcp = TcpHeader::new(sport, dport, rng.next() as u32, rng.next() as u16);
            tcp.checksum = tcp.calc_checksum_ipv4(&ip, &payload).expect("tcp checksum");

            // The NAT rewrite: destination address and port, as the program does it.
            let (new_dst, new_dport) = (rng.next() as u32, rng.next() as u16);
            let old_dst = u32::from_ne_bytes(ip.destination);
            let new_dst_stored = u32::from_ne_bytes(new_dst.to_be_bytes());
            let ip_check = replace32(ip.header_checksum.to_be(), old_dst, new_dst_stored);
            let tcp_check =
                replace16(replace32(tcp.checksum.to_be(), old_dst, new_dst_stored), dport.to_be(), new_dport.to_be());

            ip.destination = new_dst.to_be_bytes();
            tcp.destination_port = new_dport;
            assert_eq!(u16::from_be(ip_check), ip.calc_header_checksum(), "IPv4 header checksum");
            assert_eq!(
                u16::from_be(tcp_check),
                tcp.calc_checksum_ipv4(&ip, &payload).expect("tcp checksum"),
                "TCP checksum"
            );
        }
    }
}
