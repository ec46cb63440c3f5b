//! The address filter: the data path's first, cheapest question about a
//! TCP/UDP packet — could it be ours at all?
//!
//! Most traffic through a gateway is neither to a VIP nor from a backend,
//! and before the filter every such packet paid two hash-map lookups
//! (`VIPS`, then the reply direction's) to learn that. `ADDR_FILTER` is an array of
//! [`SLOTS`] bytes indexed by a hash of an address; the agent sets the slot
//! of every VIP address and every backend address it has installed. A
//! packet whose destination and source slots are both clear is passed at
//! once, for the price of two array reads; a set slot only means "look it
//! up", so collisions cost speed, never correctness. Slots are only ever
//! set while the agent runs (a removed VIP's or backend's slot stays set:
//! its last replies still find their translation).

/// Slots in `ADDR_FILTER`, one byte each (64 KiB). With a few thousand
/// addresses set, a random address falls in a set slot a few % of the time.
pub const SLOTS: u32 = 1 << 16;

/// The slot of an address, network byte order, IPv4 in word 0 (the other
/// words zero). Multiplicative hashing of the folded words: no loop for
/// the verifier, and well spread in the high bits it keeps.
#[inline(always)]
pub fn slot(addr_be: &[u32; 4]) -> u32 {
    let folded = addr_be[0] ^ addr_be[1].rotate_left(8) ^ addr_be[2].rotate_left(16) ^ addr_be[3].rotate_left(24);
    folded.wrapping_mul(0x9e37_79b1) >> 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_in_range_and_spread() {
        let mut seen = [0u16; SLOTS as usize];
        for i in 0..4096u32 {
            let addr = u32::from_ne_bytes([198, 18, (i >> 8) as u8, i as u8]);
            let s = slot(&[addr, 0, 0, 0]);
            assert!(s < SLOTS);
            seen[s as usize] += 1;
        }
        let collisions = seen.iter().filter(|&&n| n > 1).count();
        assert!(collisions < 200, "{collisions} slots hold more than one of 4096 addresses");
    }

    #[test]
    fn ipv6_words_all_count() {
        let a = [1, 2, 3, 4];
        for i in 0..4 {
            let mut b = a;
            b[i] ^= 0x10;
            assert_ne!(slot(&a), slot(&b), "word {i} ignored");
        }
    }
}
