//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI '16, §3.4).
//!
//! Each VIP's ring maps `flow_hash % ring_size` to a backend id. Maglev fills
//! the ring so that equal backends get equal shares and removing or adding one
//! backend moves few slots, so few flows that are not already pinned in
//! conntrack change backend.
//!
//! Two choices differ from the paper's pseudo-code:
//! - **Weights are proportional.** In every round a backend places its next
//!   preferred empty slot only while `filled * max_weight < round * weight`
//!   (Envoy's scheme). Katran's v1 builder counts weights only in the first
//!   pass, so its shares are not proportional.
//! - **Hashes are ours.** The permutation comes from SipHash-2-4 with fixed
//!   keys, implemented here, so a ring is the same across agent restarts, Rust
//!   releases and machines. std's `DefaultHasher` promises none of that.

use std::{cmp::Reverse, collections::BinaryHeap};

use lb_common::backend::BACKEND_ID_NONE;

/// One backend as Maglev sees it.
///
/// `key` chooses the slots, so it must be stable and name the backend itself
/// (such as `"198.18.2.11:8080"`), not its position in the config. Otherwise
/// reordering the config or restarting the agent would move flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// What the ring's slots hold: the backend's id in `BACKENDS`.
    pub id: u32,
    /// Stable identity that seeds the backend's slot preferences.
    pub key: &'a str,
    /// Relative share of slots; 0 gets none.
    pub weight: u32,
}

/// SipHash key for the permutation's offset (`h1` in the paper).
const OFFSET_KEY: (u64, u64) = (0x6c62_2d6d_6167_6c65, 0x762d_6f66_6673_6574);
/// SipHash key for the permutation's skip (`h2` in the paper); differs from
/// [`OFFSET_KEY`] so offset and skip are independent.
const SKIP_KEY: (u64, u64) = (0x6c62_2d6d_6167_6c65, 0x762d_736b_6970_2121);

/// Marks an empty slot while building; real entries index the sorted backends.
const EMPTY: u32 = u32::MAX;

/// Builds a VIP's ring of `ring_size` slots, each holding a backend id.
///
/// Slots are shared in proportion to the weights. Backends of weight 0 get no
/// slot, and if no backend has a positive weight every slot is
/// [`BACKEND_ID_NONE`], which the data path drops. The result depends only on
/// the set of backends, not on their order in `backends`: they are sorted by
/// key first.
///
/// `ring_size` should be prime (see [`is_prime`]): Maglev's balance assumes it.
/// Other sizes still give a full ring, because each skip is nudged to be
/// coprime with the size (a no-op for primes).
///
/// Cost: about `ring_size * ln(ring_size)` slot probes plus `ring_size` heap
/// operations; see the module tests for measured times.
pub fn build_ring(ring_size: u32, backends: &[MaglevBackend<'_>]) -> Vec<u32> {
    let size = u64::from(ring_size);
    let mut members: Vec<&MaglevBackend<'_>> = backends.iter().filter(|b| b.weight > 0).collect();
    if ring_size == 0 || members.is_empty() {
        return vec![BACKEND_ID_NONE; ring_size as usize];
    }
    // Ties in key are broken by weight and id, so any input order gives one ring.
    members.sort_by(|a, b| a.key.cmp(b.key).then(a.weight.cmp(&b.weight)).then(a.id.cmp(&b.id)));
    let max_weight = members.iter().map(|b| b.weight).max().unwrap_or(1);

    let mut cursors: Vec<Cursor> = members
        .iter()
        .map(|b| {
            let offset = siphash24(OFFSET_KEY, b.key.as_bytes()) % size;
            Cursor { next: offset, skip: skip_for(siphash24(SKIP_KEY, b.key.as_bytes()), size), filled: 0 }
        })
        .collect();

    // Round-robin by rounds, as a heap of (round of the next placement, index):
    // equal to looping over every backend each round, but a backend of small
    // weight costs nothing in the rounds it sits out.
    let mut turns: BinaryHeap<Reverse<(u64, usize)>> = (0..members.len()).map(|i| Reverse((1, i))).collect();
    let mut slots = vec![EMPTY; ring_size as usize];
    let mut placed: u64 = 0;
    while placed < size {
        let Some(Reverse((_, i))) = turns.pop() else {
            break;
        };
        let (Some(cursor), Some(member)) = (cursors.get_mut(i), members.get(i)) else {
            break;
        };
        // The preference list is a permutation of all slots and the ring is not
        // full yet, so an empty slot lies ahead.
        loop {
            // `next < size <= u32::MAX`, so it fits usize and u32.
            let slot = &mut slots[cursor.next as usize];
            cursor.next = (cursor.next + cursor.skip) % size;
            if *slot == EMPTY {
                *slot = i as u32;
                break;
            }
        }
        cursor.filled += 1;
        placed += 1;
        turns.push(Reverse((next_round(cursor.filled, member.weight, max_weight), i)));
    }

    slots.into_iter().map(|i| members.get(i as usize).map_or(BACKEND_ID_NONE, |b| b.id)).collect()
}

/// The changed slots between two versions of a ring, as `(slot, new id)`:
/// exactly what must be written to turn `old` into `new`.
///
/// A slot past the end of `old` counts as changed, so an empty `old` (contents
/// unknown) yields every slot of `new`. Slots past the end of `new` are not
/// reported.
pub fn ring_diff(old: &[u32], new: &[u32]) -> Vec<(u32, u32)> {
    (0u32..).zip(new).filter(|&(slot, id)| old.get(slot as usize) != Some(id)).map(|(slot, &id)| (slot, id)).collect()
}

/// Whether `n` is prime. Ring sizes must be, for Maglev's balance; config
/// validation and [`crate::control::balancer::Balancer`] check with this.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d: u64 = 5;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

/// A backend's walk through its preference list.
struct Cursor {
    /// Slot it tries next: `(offset + j * skip) % size` for its next `j`.
    next: u64,
    skip: u64,
    /// Slots it holds so far.
    filled: u64,
}

/// `skip = h2 % (size - 1) + 1`, then moved up to the next value coprime with
/// `size`, so the walk visits every slot; for a prime size it never moves.
fn skip_for(h2: u64, size: u64) -> u64 {
    if size <= 1 {
        return 1;
    }
    let mut skip = h2 % (size - 1) + 1;
    while gcd(skip, size) != 1 {
        skip = skip % (size - 1) + 1;
    }
    skip
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The round of a backend's next placement: the first round `r` with
/// `filled * max_weight < r * weight`, i.e. `floor(filled * max / weight) + 1`.
/// A backend of the largest weight places once per round; one of a third of
/// it, once every three rounds.
fn next_round(filled: u64, weight: u32, max_weight: u32) -> u64 {
    let quotient = u128::from(filled) * u128::from(max_weight) / u128::from(weight.max(1));
    u64::try_from(quotient).unwrap_or(u64::MAX - 1) + 1
}

/// SipHash-2-4 (Aumasson and Bernstein), 64-bit output.
///
/// Written out rather than taken from a crate or std so the ring can never
/// change under us; the test vectors below pin it to the reference.
fn siphash24(key: (u64, u64), data: &[u8]) -> u64 {
    let mut v = [
        key.0 ^ 0x736f_6d65_7073_6575,
        key.1 ^ 0x646f_7261_6e64_6f6d,
        key.0 ^ 0x6c79_6765_6e65_7261,
        key.1 ^ 0x7465_6462_7974_6573,
    ];
    let compress = |v: &mut [u64; 4], m: u64, rounds: usize| {
        v[3] ^= m;
        for _ in 0..rounds {
            sip_round(v);
        }
        v[0] ^= m;
    };
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        compress(&mut v, u64::from_le_bytes(word), 2);
    }
    // The last word carries the remaining bytes and the length's low byte.
    let mut last = [0u8; 8];
    let tail = chunks.remainder();
    last[..tail.len()].copy_from_slice(tail);
    last[7] = data.len() as u8;
    compress(&mut v, u64::from_le_bytes(last), 2);
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const M: u32 = lb_common::limits::DEFAULT_RING_SIZE;

    /// Keys in the style of real backends: `198.18.<i/250>.<i%250+1>:8080`.
    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("198.18.{}.{}:8080", 2 + i / 250, i % 250 + 1)).collect()
    }

    fn backends<'a>(keys: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter().zip(weights).zip(1u32..).map(|((key, &weight), id)| MaglevBackend { id, key, weight }).collect()
    }

    fn equal(keys: &[String]) -> Vec<MaglevBackend<'_>> {
        backends(keys, &vec![1; keys.len()])
    }

    fn shares(ring: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for &id in ring {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    fn assert_proportional(ring: &[u32], members: &[MaglevBackend<'_>], tolerance: f64) {
        let counts = shares(ring);
        let total_weight: u64 = members.iter().map(|b| u64::from(b.weight)).sum();
        for b in members {
            let got = counts.get(&b.id).copied().unwrap_or(0) as f64;
            let want = ring.len() as f64 * f64::from(b.weight) / total_weight as f64;
            let error = (got - want).abs() / want;
            assert!(
                error <= tolerance,
                "backend {} (weight {}): {got} slots, want {want:.1} (error {error:.4})",
                b.key,
                b.weight
            );
        }
    }

    fn changed_fraction(old: &[u32], new: &[u32]) -> f64 {
        ring_diff(old, new).len() as f64 / new.len() as f64
    }

    #[test]
    fn siphash_matches_reference_vectors() {
        // From the SipHash paper's appendix and the reference implementation's
        // vectors.h: key 00..0f, messages 00..(n-1).
        let key = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        let message: Vec<u8> = (0..64).collect();
        assert_eq!(siphash24(key, &message[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(key, &message[..15]), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn primes() {
        let primes: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(65537));
        assert!(is_prime(4099));
        assert!(!is_prime(65536));
        assert!(!is_prime(65535));
        assert!(!is_prime(25));
        assert!(!is_prime(49));
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(u32::MAX));
    }

    #[test]
    fn every_slot_filled() {
        for n in [1, 2, 3, 10, 100] {
            let keys = keys(n);
            let ring = build_ring(M, &equal(&keys));
            assert_eq!(ring.len(), M as usize);
            assert!(ring.iter().all(|&id| id != BACKEND_ID_NONE), "empty slot with {n} backends");
        }
    }

    #[test]
    fn no_weight_gives_empty_ring() {
        let keys = keys(3);
        assert_eq!(build_ring(M, &[]), vec![BACKEND_ID_NONE; M as usize]);
        assert_eq!(build_ring(M, &backends(&keys, &[0, 0, 0])), vec![BACKEND_ID_NONE; M as usize]);
    }

    #[test]
    fn odd_ring_sizes_terminate_and_fill() {
        let keys = keys(5);
        let members = equal(&keys);
        assert!(build_ring(0, &members).is_empty());
        assert_eq!(build_ring(1, &members).len(), 1);
        for size in [2, 4, 100, 1000, 65536] {
            let ring = build_ring(size, &members);
            assert!(ring.iter().all(|&id| id != BACKEND_ID_NONE), "empty slot with ring size {size}");
        }
    }

    #[test]
    fn equal_weights_share_equally() {
        // M/N is 21845.7, 6553.7 and 655.4 slots; the round-robin keeps every
        // backend within one slot of it, far inside 1%.
        for n in [3, 10, 100] {
            let keys = keys(n);
            let members = equal(&keys);
            assert_proportional(&build_ring(M, &members), &members, 0.01);
        }
    }

    #[test]
    fn weights_are_proportional() {
        for weights in [[1, 2, 3], [1, 1, 5], [10, 20, 30], [100, 1, 1]] {
            let keys = keys(3);
            let members = backends(&keys, &weights);
            assert_proportional(&build_ring(M, &members), &members, 0.01);
        }
    }

    #[test]
    fn weight_zero_gets_nothing() {
        let keys = keys(4);
        let members = backends(&keys, &[1, 0, 2, 1]);
        let ring = build_ring(M, &members);
        assert!(!ring.contains(&2));
        assert_proportional(&ring, &[members[0], members[2], members[3]], 0.01);
    }

    #[test]
    fn input_order_does_not_matter() {
        let keys = keys(10);
        let members = backends(&keys, &[1, 2, 3, 1, 1, 2, 5, 1, 1, 4]);
        let ring = build_ring(M, &members);
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(build_ring(M, &reversed), ring);
        let mut rotated = members.clone();
        rotated.rotate_left(4);
        assert_eq!(build_ring(M, &rotated), ring);
    }

    #[test]
    fn removing_a_backend_moves_about_its_share() {
        for n in [3, 10, 100] {
            let keys = keys(n);
            let members = equal(&keys);
            let before = build_ring(M, &members);
            for removed in [0, n / 2, n - 1] {
                let mut rest = members.clone();
                let gone = rest.remove(removed).id;
                let after = build_ring(M, &rest);
                let moved = changed_fraction(&before, &after);
                assert!(moved <= 1.0 / n as f64 + 0.03, "n={n}: removing one moved {moved:.4} of slots");
                // Of the slots the remaining backends held, few change hands.
                let kept: Vec<usize> = (0..before.len()).filter(|&s| before[s] != gone).collect();
                let disturbed = kept.iter().filter(|&&s| before[s] != after[s]).count() as f64 / kept.len() as f64;
                assert!(disturbed <= 0.03, "n={n}: {disturbed:.4} of the remaining backends' slots moved");
                assert!(!after.contains(&gone));
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_about_its_share() {
        for n in [3, 10, 100] {
            let keys = keys(n + 1);
            let members = equal(&keys);
            let before = build_ring(M, &members[..n]);
            let after = build_ring(M, &members);
            let moved = changed_fraction(&before, &after);
            assert!(moved <= 1.0 / (n + 1) as f64 + 0.03, "n={n}: adding one moved {moved:.4} of slots");
            let new_id = members[n].id;
            let disturbed = (0..after.len()).filter(|&s| after[s] != new_id && before[s] != after[s]).count() as f64
                / after.len() as f64;
            assert!(disturbed <= 0.03, "n={n}: {disturbed:.4} of slots moved between old backends");
        }
    }

    #[test]
    fn ring_is_pinned() {
        // Changing the hash, its keys or the fill order moves every flow when
        // the agent is upgraded. If this fails, that is what you did.
        let keys = keys(5);
        let members = backends(&keys, &[1, 1, 2, 1, 3]);
        let ring = build_ring(M, &members);
        let sample: Vec<u32> = [0usize, 1, 2, 3, 1000, 32768, 65536].iter().map(|&s| ring[s]).collect();
        assert_eq!(sample, PINNED_SAMPLE);
        assert_eq!(siphash24(OFFSET_KEY, b"198.18.2.11:8080"), PINNED_OFFSET_HASH);
    }
    /// Ring entries at slots 0, 1, 2, 3, 1000, 32768 and 65536, recorded when
    /// the builder was written.
    const PINNED_SAMPLE: [u32; 7] = [5, 2, 2, 5, 2, 4, 3];
    const PINNED_OFFSET_HASH: u64 = 0xbd96_6960_1b17_9dd5;

    #[test]
    fn diff_lists_changed_slots() {
        assert_eq!(ring_diff(&[1, 2, 3], &[1, 4, 3]), [(1, 4)]);
        assert_eq!(ring_diff(&[1, 2, 3], &[1, 2, 3]), []);
        assert_eq!(ring_diff(&[], &[5, 0]), [(0, 5), (1, 0)]);
        assert_eq!(ring_diff(&[1], &[1, 2]), [(1, 2)]);
    }

    /// Timing for the report: `cargo test --release -p lb-userspace --lib
    /// control::maglev::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check; run by hand in release"]
    fn timing() {
        for n in [3, 100, 1000, 4095] {
            let keys = keys(n);
            let members = equal(&keys);
            let weighted: Vec<MaglevBackend<'_>> =
                members.iter().zip(1u32..).map(|(b, i)| MaglevBackend { weight: 1 + i % 7, ..*b }).collect();
            for (label, input) in [("equal", &members), ("weights 1..7", &weighted)] {
                let mut times: Vec<_> = (0..5)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        let ring = build_ring(M, input);
                        let elapsed = start.elapsed();
                        assert_eq!(ring.len(), M as usize);
                        elapsed
                    })
                    .collect();
                times.sort();
                println!("M={M} N={n} {label}: median {:?} (min {:?}, max {:?})", times[2], times[0], times[4]);
            }
        }
    }
}
