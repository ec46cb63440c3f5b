//! Maglev lookup: the agent builds the rings (lb-userspace `lb/maglev.rs`);
//! the data path only indexes them.

use lb_common::vip::VipInfo;

use crate::maps::MAGLEV;

/// The backend id in the slot the flow hash selects; 0 when the VIP has no
/// backend up (or its ring is not written yet).
#[inline(always)]
pub fn pick(vip: &VipInfo, hash: u32) -> u32 {
    if vip.ring_size == 0 {
        return 0;
    }
    let index = vip.ring_base().wrapping_add(hash % vip.ring_size);
    MAGLEV.get(index).copied().unwrap_or(0)
}
