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
//! (`answer`). Anything else is passed to the kernel untouched. Every verdict is counted by reason (`stats`).
#![no_std]
#![no_main]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys go by reference: by value, a call could copy its key (up to 40 bytes) onto the 512-byte BPF stack"
)]
#![allow(
    clippy::too_many_arguments,
    reason = "stages are BPF-to-BPF calls that take scalars; a struct would live in the caller's stack frame"
)]

mod answer;
mod answer6;
mod client_limits;
mod conntrack;
mod embryo;
mod fast;
mod forward;
mod frag;
mod guard;
mod icmp;
mod icmp6;
mod lookup;
mod maglev;
mod maps;
mod nexthop;
mod parse;
mod parse6;
mod reply;
mod rewrite;
mod stats;
mod v6;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
// `csum`: checksum arithmetic lives in lb-common, where it is tested on the host.
use lb_common::{FAMILY_V4, csum, stats::reason};
// The panic handler: a reachable panic fails the load, never the data path.
use lb_ebpf_panic as _;

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
    /// One scalar, for returning from a BPF-to-BPF call: a struct would be
    /// returned through memory.
    #[inline(always)]
    pub fn pack(self) -> u64 {
        (u64::from(self.action) << 32) | u64::from(self.reason)
    }

    #[inline(always)]
    pub fn unpack(packed: u64) -> Self {
        Self { action: (packed >> 32) as u32, reason: packed as u32 }
    }

    #[inline(always)]
    pub fn send_back(ctx: &XdpContext, reason: u32) -> Self {
        // SAFETY: plain helper call; flags 0.
        let action = unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) } as u32;
        Self { action, reason }
    }
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    // Untagged IPv4 and IPv6 try the fast path first (see `fast`).
    let ether_type = parse::ptr_at::<parse::EthHdr>(&ctx, 0).map(|eth| {
        // SAFETY: bounds checked by ptr_at.
        unsafe { (*eth).ether_type_be }
    });
    let fast = match ether_type {
        Some(fast::ETH_P_IPV4_BE) => fast::stage_v4(ctx.ctx),
        Some(fast::ETH_P_IPV6_BE) => fast::stage_v6(ctx.ctx),
        _ => fast::FALLBACK,
    };
    let packed = if fast == fast::FALLBACK { dispatch(&ctx) } else { fast };
    let mut verdict = Verdict::unpack(packed);
    if verdict.action == forward::ACTION_FORWARD {
        verdict = Verdict::unpack(forward::stage(ctx.ctx));
    }
    stats::count_verdict(verdict.reason);
    verdict.action
}

/// Which stage a frame goes to: IPv4 or IPv6, ICMP or the rest.
///
/// verifier: each stage is a BPF-to-BPF call of its own, taking only
/// scalars (the context pointer and the network header's offset; each
/// stage parses its header again, a few instructions), so each has its own
/// stack frame. Inlined together, their temporaries shared one frame, which
/// with `nexthop::lookup_call`'s outgrew the 512 bytes BPF allows
/// ("combined stack size of 3 calls is 544", kernel 6.18). A struct passed
/// by reference would have to live in the caller's frame, so none is.
#[inline(always)]
fn dispatch(ctx: &XdpContext) -> u64 {
    let l2 = match parse::parse_l2(ctx) {
        Ok(l2) => l2,
        Err(v) => return v.pack(),
    };
    // verifier: the mask keeps the offset visibly small (14, 18 or 22).
    let l3_off = l2.l3_off & 0x1f;
    let (proto_off, icmp) = if l2.is_ipv6() { (6, parse6::PROTO_ICMPV6) } else { (9, lb_common::PROTO_ICMP) };
    // A header too short for its protocol byte is the stages' to judge.
    let proto = parse::ptr_at::<u8>(ctx, l3_off + proto_off).map(|p| {
        // SAFETY: bounds checked by ptr_at.
        unsafe { *p }
    });
    match (l2.is_ipv6(), proto == Some(icmp)) {
        (true, true) => icmp6_stage(ctx.ctx, l3_off),
        (true, false) => v6_stage(ctx.ctx, l3_off),
        (false, true) => icmp_stage(ctx.ctx, l3_off),
        (false, false) => v4_stage(ctx.ctx, l3_off),
    }
}

/// The frame's Ethernet header and tags again, in a stage: `l3_off` is what
/// [`dispatch`] found.
#[inline(always)]
fn l2_again(ctx: &XdpContext, l3_off: usize) -> Result<parse::L2, Verdict> {
    let l2 = parse::parse_l2(ctx)?;
    // The same frame parses the same way; this only tells the verifier.
    Ok(parse::L2 { l3_off: l3_off & 0x1f, ..l2 })
}

/// IPv4 TCP, UDP and other protocols (a stage; see [`dispatch`]).
#[inline(never)]
fn v4_stage(raw: *mut aya_ebpf::bindings::xdp_md, l3_off: usize) -> u64 {
    let ctx = XdpContext::new(raw);
    let verdict = l2_again(&ctx, l3_off).and_then(|l2| try_v4(&ctx, &l2));
    match verdict {
        Ok(v) | Err(v) => v.pack(),
    }
}

/// IPv4 ICMP (a stage; see [`dispatch`]).
#[inline(never)]
fn icmp_stage(raw: *mut aya_ebpf::bindings::xdp_md, l3_off: usize) -> u64 {
    let ctx = XdpContext::new(raw);
    let verdict = l2_again(&ctx, l3_off).and_then(|l2| {
        let v4 = parse::parse_ipv4(&ctx, &l2)?;
        if v4.is_later_fragment() {
            return Err(frag::follow(&ctx, &v4));
        }
        if v4.is_fragment() {
            return Err(frag::verdict(&v4));
        }
        Err(icmp::process(&ctx, &v4))
    });
    match verdict {
        Ok(v) | Err(v) => v.pack(),
    }
}

/// IPv6 TCP, UDP and other next headers (a stage; see [`dispatch`]).
#[inline(never)]
fn v6_stage(raw: *mut aya_ebpf::bindings::xdp_md, l3_off: usize) -> u64 {
    let ctx = XdpContext::new(raw);
    match l2_again(&ctx, l3_off).and_then(|l2| v6::process(&ctx, &l2)) {
        Ok(v) | Err(v) => v.pack(),
    }
}

/// ICMPv6 (a stage; see [`dispatch`]).
#[inline(never)]
fn icmp6_stage(raw: *mut aya_ebpf::bindings::xdp_md, l3_off: usize) -> u64 {
    let ctx = XdpContext::new(raw);
    match l2_again(&ctx, l3_off).and_then(|l2| v6::process_icmp(&ctx, &l2)) {
        Ok(v) | Err(v) => v.pack(),
    }
}

#[inline(always)]
fn try_v4(ctx: &XdpContext, l2: &parse::L2) -> Result<Verdict, Verdict> {
    let v4 = parse::parse_ipv4(ctx, l2)?;
    if v4.is_later_fragment() {
        return Err(frag::follow(ctx, &v4));
    }
    // SAFETY: bounds checked in parse_ipv4.
    if unsafe { (*v4.ip).proto } == lb_common::PROTO_ICMP {
        // Not what `dispatch` saw: not ours to judge.
        return Err(Verdict::pass(reason::PASS_MALFORMED_IP));
    }
    let pkt = match parse::transport(ctx, &v4) {
        Ok(pkt) => pkt,
        // A first fragment too short for its ports cannot be placed.
        Err(_) if v4.is_fragment() => return Err(frag::verdict(&v4)),
        // Another protocol, or too short for ports: no VIP serves it.
        Err(v) => {
            // SAFETY: bounds checked in parse_ipv4.
            let daddr = unsafe { (*v4.ip).daddr_be };
            let refused = lookup::refuses_unserved([daddr, 0, 0, 0], FAMILY_V4);
            return Err(if refused { Verdict::drop(reason::DROP_NO_SERVICE) } else { v });
        }
    };
    if !lookup::may_be_ours_v4(&pkt) {
        return Err(if pkt.first_fragment { frag::verdict(&v4) } else { Verdict::pass(reason::PASS_NOT_VIP) });
    }
    if let Some(vip) = lookup::vip(&pkt) {
        return to_backend(ctx, &pkt, &vip);
    }
    let key = lookup::packet_tuple(&pkt);
    if let Some(verdict) = reply::route(ctx, &pkt, guard::reply(&key)) {
        return verdict;
    }
    if pkt.first_fragment {
        return Err(frag::verdict(&v4));
    }
    // A direct flow's packet, one to a VIP address's unserved port, or another host's.
    Ok(forward::unmatched_v4(ctx, &pkt))
}

/// Client → VIP: pin the flow, rewrite the destination to the backend, send it on.
#[inline(always)]
fn to_backend(ctx: &XdpContext, pkt: &Packet, vip: &lb_common::vip::VipInfo) -> Result<Verdict, Verdict> {
    let l4 = parse::l4_checked(ctx, pkt)?;
    parse::check_ttl(pkt)?;
    let flow = lookup::flow_key(pkt, &l4);
    let now = conntrack::now_ns();
    let lookup::Pick { backend_id, backend, tracked } = match lookup::backend_for_flow(&flow, vip, &l4, now) {
        Ok(picked) => picked,
        // No backend up (or a client over a limit that answers): tell the
        // client at once rather than let it time out.
        Err(v) => {
            return Err(match forward::refusal_of(v.reason, vip.vip_id) {
                Some(kind) => forward::refuse_v4(ctx, pkt, &l4, kind),
                None => v,
            });
        }
    };
    if pkt.first_fragment {
        frag::remember(pkt, Side::Destination, backend.addr_be[0], vip.vip_id, backend_id);
    }
    let decision = forward::Decision {
        side: Side::Destination,
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        // A "fragmentation needed" for the client comes from the address it sent to: the VIP.
        icmp_from_be: flow.dst_be,
        redirect_reason: if tracked || l4.tcp_flags & parse::TCP_SYN != 0 {
            reason::REDIRECT_TO_BACKEND
        } else {
            reason::REDIRECT_UNTRACKED
        },
        vip_id: vip.vip_id,
        backend_id,
        now,
    };
    Ok(forward::plan_v4(ctx, pkt, &l4, &decision))
}

#[cfg(not(test))]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
