//! Per-client limits of a VIP, enforced on the packet that opens a flow;
//! the rules, their approximations and their reasons are in
//! `lb_common::client_limits`.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    client_limits::{AllowKey, ClientKey, ClientState, LIMIT_F_ALLOW_LIST, VipLimits, admit, limit, masked},
    flow::FlowKey,
    stats::reason,
};

use crate::{
    Verdict,
    maps::{CLIENTS, LIMIT_ALLOW, LIMITED, VIP_LIMITS},
};

/// Whether a new flow from `flow`'s client to VIP `vip_id` is within the
/// VIP's limits; if not, the drop that says which (the caller answers it
/// instead if the VIP's limits answer, [`answers`]). A flow admitted takes
/// one from the client's bucket.
#[inline(always)]
pub fn check(flow: &FlowKey, vip_id: u32, now: u64) -> Result<(), Verdict> {
    match check_call(flow, vip_id, now) {
        0 => Ok(()),
        why => Err(Verdict::drop(why)),
    }
}

/// [`check`] as a BPF-to-BPF call: 0, or the drop reason.
///
/// verifier: not inlined, so its keys take no slots in the main frame
/// (see `guard::new_flow_call`); only packets that open flows of limited
/// VIPs make the call.
#[inline(never)]
fn check_call(flow: &FlowKey, vip_id: u32, now: u64) -> u32 {
    let Some(limits) = VIP_LIMITS.get(vip_id) else { return 0 };
    if limits.flags & LIMIT_F_ALLOW_LIST != 0 && allowed(flow, vip_id) {
        return 0;
    }
    let key = ClientKey { addr_be: masked(&flow.src_be, limits.prefix_len), vip_id };
    let Some(state) = CLIENTS.get_ptr_mut(&key) else {
        // A client not seen (or evicted): within any limit (a burst and a
        // ceiling are at least 1).
        let first = ClientState { next_ns: admit(0, now, limits).unwrap_or(now), connections: 0, _pad: 0 };
        let _ = CLIENTS.insert(&key, &first, 0);
        return 0;
    };
    // SAFETY: a valid map value; a concurrent update from another CPU races
    // as the module's notes say.
    let current = unsafe { *state };
    if limits.max_connections != 0 && current.connections >= limits.max_connections {
        return refused(vip_id, limit::CONNECTIONS, reason::DROP_LIMITED_CONNECTIONS);
    }
    if limits.interval_ns != 0 {
        let Some(next) = admit(current.next_ns, now, limits) else {
            return refused(vip_id, limit::RATE, reason::DROP_LIMITED_RATE);
        };
        // SAFETY: as above.
        unsafe { (*state).next_ns = next };
    }
    0
}

/// Whether the VIP's limits answer a refused client (`LIMIT_F_RST`).
#[inline(always)]
pub fn answers(vip_id: u32) -> bool {
    VIP_LIMITS.get(vip_id).is_some_and(|l: &VipLimits| l.flags & lb_common::client_limits::LIMIT_F_RST != 0)
}

/// A flow of `flow`'s client entered the connection table.
#[inline(always)]
pub fn opened(flow: &FlowKey, vip_id: u32) {
    add(flow, vip_id, 1);
}

/// A counted flow of `flow`'s client saw its first FIN or RST.
#[inline(always)]
pub fn closed(flow: &FlowKey, vip_id: u32) {
    add(flow, vip_id, u32::MAX);
}

/// Adds `delta` (wrapping: `u32::MAX` is -1) to the client's count, never
/// below 0. A client evicted from `CLIENTS` meanwhile starts again at 0.
///
/// verifier: not inlined, for the main frame's sake (see [`check_call`]);
/// called once per flow at most twice.
#[inline(never)]
fn add(flow: &FlowKey, vip_id: u32, delta: u32) {
    let Some(limits) = VIP_LIMITS.get(vip_id) else { return };
    let key = ClientKey { addr_be: masked(&flow.src_be, limits.prefix_len), vip_id };
    if let Some(state) = CLIENTS.get_ptr_mut(&key) {
        // SAFETY: a valid map value.
        unsafe {
            let n = (*state).connections;
            if !(n == 0 && delta == u32::MAX) {
                (*state).connections = n.wrapping_add(delta);
            }
        }
    }
}

#[inline(always)]
fn allowed(flow: &FlowKey, vip_id: u32) -> bool {
    let key = Key::new(32 + 128, AllowKey { vip_id, addr_be: flow.src_be });
    LIMIT_ALLOW.get(&key).is_some()
}

/// Counts a refusal by VIP and limit; returns the drop reason `why`.
#[inline(always)]
fn refused(vip_id: u32, kind: u32, why: u32) -> u32 {
    if let Some(count) = LIMITED.get_ptr_mut(vip_id.wrapping_mul(limit::COUNT).wrapping_add(kind)) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { *count += 1 };
    }
    why
}
