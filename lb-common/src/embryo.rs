//! TCP flows are tracked from their first ACK, not their SYN, and only if
//! their SYN was seen: a flood of spoofed SYNs (or ACKs, or RSTs) then never
//! inserts into the connection table, so it can neither evict established
//! flows nor fill the table.
//!
//! - A SYN to a VIP (no state for its 5-tuple, or an expired or closed one)
//!   goes to the backend its Maglev slot names, which is consistent: a
//!   retransmitted SYN goes the same way. It writes only its slot of
//!   `EMBRYOS`, an array indexed by a hash of the 5-tuple, holding a second
//!   hash of it (a tag) and the time. A flood overwrites slots: that is
//!   the residual risk. A real client's first ACK then finds its slot taken
//!   by another 5-tuple, and its flow is forwarded untracked (by its Maglev
//!   slot, on every packet), which holds while the VIP's ring does not
//!   change; a change of ring (a backend added, or going down) moves such a
//!   flow, and its new backend resets it.
//! - The first packet after the SYN (an ACK) that finds its own tag in its
//!   slot, within `limits::EMBRYO_TIMEOUT_NS`, pins the flow in `CONNTRACK`
//!   and clears the slot.
//! - Any other TCP segment to a VIP without state (a spoofed ACK or RST, a
//!   flow whose entry was evicted or lost, another gateway's flow) is
//!   forwarded untracked (`redirect_untracked`).
//!
//! UDP has no handshake: a datagram still opens its flow at once.

use crate::flow::{FlowKey, flow_hash, seeded_flow_hash};

/// The slot of `EMBRYOS` a 5-tuple takes (`EMBRYO_SLOTS` is a power of two).
#[inline(always)]
pub fn slot(key: &FlowKey) -> u32 {
    flow_hash(key) & (crate::limits::EMBRYO_SLOTS - 1)
}

/// What a SYN of `key` writes in its slot at `now_ns`: a tag of the
/// 5-tuple (another hash of it, never 0) in the high half, the time in
/// units of 2^20 ns (about a millisecond) in the low half.
#[inline(always)]
pub fn entry(key: &FlowKey, now_ns: u64) -> u64 {
    (u64::from(tag(key)) << 32) | u64::from((now_ns >> 20) as u32)
}

/// Whether the slot's `entry` is a SYN of `key` seen within the timeout.
#[inline(always)]
pub fn matches(entry: u64, key: &FlowKey, now_ns: u64) -> bool {
    let seen = entry as u32;
    let age = ((now_ns >> 20) as u32).wrapping_sub(seen);
    (entry >> 32) as u32 == tag(key) && u64::from(age) <= crate::limits::EMBRYO_TIMEOUT_NS >> 20
}

/// A second hash of the 5-tuple, independent of the slot's bits: from
/// another seed. (It was `flow_hash` of the key with other `_pad` bytes,
/// which the hash does not read: the slot's own hash rotated, so two
/// 5-tuples in one slot shared their tag once in 2^15, and a mixed flood of
/// spoofed SYNs and ACKs from unrelated 5-tuples pinned flows at that rate.)
#[inline(always)]
fn tag(key: &FlowKey) -> u32 {
    seeded_flow_hash(key, TAG_SEED) | 1
}

/// The seed of [`tag`]'s hash (any constant other than `flow_hash`'s).
const TAG_SEED: u32 = 0x3c6e_f372;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src_be: [1, 0, 0, 0],
            dst_be: [2, 0, 0, 0],
            src_port_be: sport,
            dst_port_be: 80,
            proto: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn a_syn_is_found_by_its_own_ack_within_the_timeout_only() {
        let now = 1_000_000_000_000;
        let e = entry(&key(1), now);
        assert!(matches(e, &key(1), now + 1_000_000_000));
        assert!(!matches(e, &key(2), now), "another 5-tuple's");
        assert!(!matches(e, &key(1), now + crate::limits::EMBRYO_TIMEOUT_NS + 2_000_000), "too late");
        assert!(!matches(0, &key(1), now), "an empty slot");
    }

    /// Regression (issue 12): the tag was the slot's own hash, so 5-tuples
    /// sharing a slot shared their tag once in 2^15. Over about 8 million
    /// same-slot pairs that is some 240 collisions; independent 31-bit tags
    /// give one in about 270 runs.
    #[test]
    fn five_tuples_in_one_slot_have_different_tags() {
        let mut by_slot: std::collections::HashMap<u32, std::vec::Vec<u32>> = std::collections::HashMap::new();
        for i in 0..(1u32 << 20) {
            let mut k = key((i & 0xffff) as u16);
            k.src_be = [0x0000_13c6 | ((i >> 16) << 24), 0, 0, 0];
            by_slot.entry(slot(&k)).or_default().push(tag(&k));
        }
        let mut collisions = 0;
        for tags in by_slot.values_mut() {
            tags.sort_unstable();
            collisions += tags.windows(2).filter(|w| w[0] == w[1]).count();
        }
        assert_eq!(collisions, 0, "tags shared within a slot");
    }

    #[test]
    fn the_clock_wrapping_does_not_matter() {
        let now = (u64::from(u32::MAX) << 20) - 1_000_000;
        assert!(matches(entry(&key(1), now), &key(1), now + 5_000_000_000));
    }
}
