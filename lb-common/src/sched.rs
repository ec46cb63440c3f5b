//! Schedulers: which hash of a new flow picks its slot in the VIP's Maglev
//! ring. Shared so the agent and the tests can predict the kernel's choice.
//!
//! - `maglev` (the default): [`flow_hash`] of the 5-tuple, so a client's
//!   connections spread over the backends.
//! - `source-hash` ([`VIP_F_SOURCE_HASH`]): [`source_hash`] of the client
//!   address alone, so all flows of one client go to one backend (nginx's
//!   `ip_hash`) for as long as the VIP's set of backends stays the same.
//!
//! Either way the pick is pinned in the connection table, so a flow keeps its
//! backend while that backend is up, whatever the ring does later.

use crate::{
    flow::{FlowKey, flow_hash},
    vip::{VIP_F_SOURCE_HASH, VipInfo},
};

/// The hash whose `% ring_size` is the Maglev slot of a new flow of `vip`.
#[inline(always)]
pub fn slot_hash(vip: &VipInfo, flow: &FlowKey) -> u32 {
    if vip.flags & VIP_F_SOURCE_HASH != 0 { source_hash(flow) } else { flow_hash(flow) }
}

/// Hash of the flow's source (client) address and family only.
///
/// Unlike nginx's `ip_hash`, which keys IPv4 clients by their /24, this uses
/// the whole address: clients behind one /24 still spread. The mixing is
/// murmur3's, like [`flow_hash`] (no loops for the verifier to bound), with a
/// different seed so the two hashes of one flow are unrelated.
#[inline(always)]
pub fn source_hash(flow: &FlowKey) -> u32 {
    let mut h: u32 = 0x5bd1_e995 ^ u32::from(flow.family);
    h = mix(h, flow.src_be[0]);
    h = mix(h, flow.src_be[1]);
    h = mix(h, flow.src_be[2]);
    h = mix(h, flow.src_be[3]);
    fmix32(h)
}

/// One murmur3 round: folds `word` into `h`.
#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// murmur3's finaliser: spreads every input bit over the low bits the modulo keeps.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, PROTO_TCP};

    fn flow(src: [u8; 4], src_port: u16) -> FlowKey {
        FlowKey {
            src_be: [u32::from_ne_bytes(src), 0, 0, 0],
            dst_be: [u32::from_ne_bytes([198, 18, 0, 100]), 0, 0, 0],
            src_port_be: src_port.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    fn vip(flags: u32) -> VipInfo {
        VipInfo { vip_id: 1, ring_size: 65537, ring_generation: 0, flags }
    }

    #[test]
    fn source_hash_ignores_ports() {
        let a = flow([198, 18, 1, 2], 40000);
        let b = flow([198, 18, 1, 2], 40001);
        assert_eq!(source_hash(&a), source_hash(&b));
        assert_ne!(flow_hash(&a), flow_hash(&b));
    }

    #[test]
    fn source_hash_tells_clients_apart() {
        let a = flow([198, 18, 1, 2], 40000);
        let b = flow([198, 18, 1, 3], 40000);
        assert_ne!(source_hash(&a), source_hash(&b));
    }

    #[test]
    fn the_flag_chooses_the_hash() {
        let f = flow([198, 18, 1, 2], 40000);
        assert_eq!(slot_hash(&vip(0), &f), flow_hash(&f));
        assert_eq!(slot_hash(&vip(VIP_F_SOURCE_HASH), &f), source_hash(&f));
    }

    #[test]
    fn source_hash_spreads_clients_over_slots() {
        // 3000 clients over 3 slots: each should get about 1000.
        let mut counts = [0u32; 3];
        for i in 0..3000u32 {
            let [_, _, c, d] = i.to_be_bytes();
            let h = source_hash(&flow([198, 18, c, d], 1));
            counts[(h % 3) as usize] += 1;
        }
        assert!(counts.iter().all(|&n| (850..=1150).contains(&n)), "{counts:?}");
    }
}
