//! Maglev lookup: the agent builds the rings (lb-userspace `control/maglev.rs`);
//! the data path only indexes them.

use lb_common::{flow::FlowKey, sched::slot_hash, vip::VipInfo};

use crate::maps::MAGLEV;

/// The backend id in the slot the VIP's scheduler selects for `flow` (the
/// 5-tuple hash, or the client-address hash under `VIP_F_SOURCE_HASH`; see
/// `lb_common::sched`); 0 when the VIP has no backend up (or its ring is not
/// written yet).
#[inline(always)]
pub fn pick(vip: &VipInfo, flow: &FlowKey) -> u32 {
    if vip.ring_size == 0 {
        return 0;
    }
    let index = vip.ring_base().wrapping_add(slot_hash(vip, flow) % vip.ring_size);
    MAGLEV.get(index).copied().unwrap_or(0)
}
