//! Per-CPU counters: no atomics needed, the agent sums CPUs at scrape time.

use aya_ebpf::programs::XdpContext;

use lb_common::{
    handshake::{EVENT_RESET, EVENT_SYN, EVENT_SYN_ACK},
    stats::direction,
};

use crate::maps::{BACKEND_STATS, CONNTRACK_EVENTS, HANDSHAKES, VERDICTS};

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

/// Counts one packet of a balanced flow against its backend, in the
/// direction `dir` (`lb_common::stats::direction`).
#[inline(always)]
pub fn count_traffic(backend_id: u32, dir: u32, ctx: &XdpContext) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe {
            if dir == direction::OUT {
                (*c).packets_out += 1;
                (*c).bytes_out += bytes;
            } else {
                (*c).packets_in += 1;
                (*c).bytes_in += bytes;
            }
        }
    }
}

/// Counts a flow assigned a backend; `rescheduled` when it left a down one.
#[inline(always)]
pub fn count_new_flow(backend_id: u32, rescheduled: bool) {
    let extra = rescheduled as u64;
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
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
