//! Per-CPU counters: no atomics needed, the agent sums CPUs at scrape time.

use aya_ebpf::programs::XdpContext;

use lb_common::handshake::{EVENT_RESET, EVENT_SYN, EVENT_SYN_ACK};

use crate::maps::{BACKEND_STATS, CONNTRACK_EVENTS, HANDSHAKES, VERDICTS, VIP_STATS};

#[inline(always)]
pub fn count_verdict(reason: u32) {
    if let Some(count) = VERDICTS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { *count += 1 };
    }
}

/// Counts a connection-table event (`lb_common::stats::conntrack_event`).
#[inline(always)]
pub fn count_conntrack_event(event: u32) {
    if let Some(count) = CONNTRACK_EVENTS.get_ptr_mut(event) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { *count += 1 };
    }
}

/// Counts one packet of a balanced flow, either direction.
#[inline(always)]
pub fn count_traffic(vip_id: u32, backend_id: u32, ctx: &XdpContext) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Some(c) = VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a flow assigned a backend; `rescheduled` when it left a down one.
#[inline(always)]
pub fn count_new_flow(vip_id: u32, backend_id: u32, rescheduled: bool) {
    let extra = rescheduled as u64;
    if let Some(c) = VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe {
            (*c).new_flows += 1;
            (*c).rescheduled_flows += extra;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*c).new_flows += 1;
            (*c).rescheduled_flows += extra;
        }
    }
}

/// Counts a handshake event (`lb_common::handshake::EVENT_*`) of a backend,
/// for passive health; `EVENT_NONE` counts nothing.
#[inline(always)]
pub fn count_handshake(backend_id: u32, event: u8) {
    if event == lb_common::handshake::EVENT_NONE {
        return;
    }
    if let Some(c) = HANDSHAKES.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe {
            match event {
                EVENT_SYN => (*c).syns += 1,
                EVENT_SYN_ACK => (*c).syn_acks += 1,
                EVENT_RESET => (*c).resets += 1,
                _ => {}
            }
        }
    }
}

/// Counts an ICMP unreachable quoting a UDP datagram to a backend.
#[inline(always)]
pub fn count_unreachable(backend_id: u32) {
    if let Some(c) = HANDSHAKES.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { (*c).unreachables += 1 };
    }
}
