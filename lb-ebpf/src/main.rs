//! The XDP load balancer.
//!
//! Pipeline for each frame: parse Ethernet (VLAN tags)/IPv4/TCP|UDP
//! (`parse`; later fragments follow their first, `frag`), find the
//! VIP (`lookup`), pin the flow to a backend through the connection table or
//! a Maglev pick (`lookup`, `maglev`), rewrite destination and checksums
//! (`rewrite`, `csum`), then redirect to the next hop the kernel's FIB names.
//! IPv6 without extension headers takes the same steps in `v6` (parsed in
//! `parse6`). Replies from backends take the mirror path in `reply`. ICMP
//! errors about balanced flows are translated in `icmp`. A VIP with no
//! backend up answers the client itself, as does a VIP address pinged, and a
//! packet too big for its next hop is answered with fragmentation needed
//! (`respond`). Anything else is passed to the kernel untouched. Every verdict is counted by reason (`stats`).
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod frag;
mod icmp;
mod icmp6;
mod lookup;
mod maglev;
mod maps;
mod nexthop;
mod parse;
mod parse6;
mod reply;
mod respond;
mod respond6;
mod rewrite;
mod stats;
mod v6;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
use lb_common::stats::reason;

use crate::{parse::Packet, rewrite::Side};

/// What the program returns and why: `action` is the XDP verdict and
/// `reason` the `VERDICTS` slot that counts it.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub reason: u32,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(reason: u32) -> Self {
        Self { action: xdp_action::XDP_PASS, reason }
    }

    #[inline(always)]
    pub const fn drop(reason: u32) -> Self {
        Self { action: xdp_action::XDP_DROP, reason }
    }

    /// Sent back out the device it came in on (a reply built in place).
    ///
    /// By `bpf_redirect` to that device, not XDP_TX: on veth (seen on
    /// 6.18), a frame sent with XDP_TX into a peer without an XDP program of
    /// its own waits in the peer's queue until other traffic wakes it, tens
    /// of milliseconds to seconds later (late RSTs, pings lost), while a
    /// redirect flushes the peer's queue at once. Native drivers with XDP
    /// support send redirected frames as well; these replies are
    /// rate-limited, so the longer path costs nothing that matters.
    #[inline(always)]
    pub fn send_back(ctx: &XdpContext, reason: u32) -> Self {
        // SAFETY: plain helper call; flags 0.
        let action = unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) } as u32;
        Self { action, reason }
    }
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let verdict = match try_lb_xdp(&ctx) {
        Ok(v) | Err(v) => v,
    };
    stats::count_verdict(verdict.reason);
    verdict.action
}

#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let l2 = parse::parse_l2(ctx)?;
    if l2.is_ipv6() {
        return v6::process(ctx, &l2);
    }
    let v4 = parse::parse_ipv4(ctx, &l2)?;
    if v4.is_later_fragment() {
        return Err(frag::follow(ctx, &v4));
    }
    // SAFETY: bounds checked in parse_ipv4.
    if unsafe { (*v4.ip).proto } == lb_common::PROTO_ICMP {
        if v4.is_fragment() {
            return Err(frag::verdict(&v4));
        }
        return Err(icmp::process(ctx, &v4));
    }
    let pkt = match parse::transport(ctx, &v4) {
        Ok(pkt) => pkt,
        // A first fragment too short for its ports cannot be placed.
        Err(_) if v4.is_fragment() => return Err(frag::verdict(&v4)),
        Err(v) => return Err(v),
    };
    if !lookup::may_be_ours_v4(&pkt) {
        return Err(if pkt.first_fragment { frag::verdict(&v4) } else { Verdict::pass(reason::PASS_NOT_VIP) });
    }
    if let Some(vip) = lookup::vip(&pkt) {
        return to_backend(ctx, &pkt, &vip);
    }
    if let Some(nat) = lookup::reply_nat(&pkt) {
        return reply::to_client(ctx, &pkt, &nat);
    }
    if pkt.first_fragment {
        return Err(frag::verdict(&v4));
    }
    Ok(Verdict::pass(reason::PASS_NOT_VIP))
}

/// Client → VIP: pin the flow, rewrite the destination to the backend, send it on.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &lb_common::vip::VipInfo,
) -> Result<Verdict, Verdict> {
    let l4 = parse::l4_checked(ctx, pkt)?;
    parse::check_ttl(pkt)?;
    let flow = lookup::flow_key(pkt, &l4);
    let now = conntrack::now_ns();
    let (backend_id, backend) = match lookup::backend_for_flow(&flow, vip, &l4, now) {
        Ok(picked) => picked,
        // No backend up: tell the client at once rather than let it time out.
        Err(v) if v.reason == reason::DROP_NO_BACKEND => return Err(respond::no_backend(ctx, pkt, &l4)),
        Err(v) => return Err(v),
    };
    stats::count_traffic(vip.vip_id, backend_id, ctx);
    let (addr, port) = (backend.addr_be[0], backend.port_be);
    if pkt.first_fragment {
        frag::remember(pkt, Side::Destination, addr, vip.vip_id, backend_id);
    }
    // SAFETY: bounds checked in parse_ipv4. A "fragmentation needed" for the
    // client comes from the address it sent to: the VIP.
    let vip_addr = unsafe { (*pkt.ip).daddr_be };
    Ok(rewrite::translate_and_forward(ctx, pkt, &l4, Side::Destination, addr, port, vip_addr, reason::REDIRECT_TO_BACKEND, now))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects the loop, so a reachable panic fails the load
    // rather than the data path.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
