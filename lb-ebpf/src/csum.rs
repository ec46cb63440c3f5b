//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
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
