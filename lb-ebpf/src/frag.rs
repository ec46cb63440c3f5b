//! The fragment rules (IPv4; see `lb_common::frag` for the table).
//!
//! Only the first fragment of a datagram carries the ports. A first
//! fragment that is balanced (to a VIP, or a backend's reply) takes the
//! normal path and is remembered in `FRAGS` ([`remember`]); later fragments
//! of that datagram follow it ([`follow`]): the same address rewritten, the
//! same next hop, never a different backend. Their ports and L4 checksum are
//! in the first piece, so only the IP header (address and checksum) changes.
//!
//! A fragment that cannot be placed (a later piece whose first was not
//! balanced here, or a first piece not for a VIP) is judged by address and
//! protocol, the same test for every piece, so all pieces of one datagram
//! get one verdict: to an address and protocol some VIP has (`VIP_ADDRS`),
//! dropped (`drop_fragment`); otherwise passed to the kernel
//! (`pass_fragment`). Pieces arriving before their first are dropped too:
//! the sender's retransmission (or the application's) repeats them in order.

use lb_common::{
    FAMILY_V4,
    frag::{FRAG_REWRITE_SOURCE, FRAG_TIMEOUT_NS, FragKey, FragState},
    stats::{direction, reason},
    vip_addr::{VipAddrKey, proto_bit},
};

use aya_ebpf::programs::XdpContext;

use crate::{
    Verdict, conntrack,
    maps::{FRAGS, VIP_ADDRS},
    parse::{Ipv4, Ipv4Hdr, Packet},
    rewrite::{self, Side},
    stats,
};

/// The datagram a fragment belongs to.
#[inline(always)]
fn key_of(ip: *const Ipv4Hdr) -> FragKey {
    // SAFETY: bounds checked in parse_ipv4.
    let (saddr, daddr, id_be, proto) = unsafe { ((*ip).saddr_be, (*ip).daddr_be, (*ip).id_be, (*ip).proto) };
    FragKey {
        src_be: [saddr, 0, 0, 0],
        dst_be: [daddr, 0, 0, 0],
        id_be: u32::from(id_be),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// Records a first fragment being balanced, before it is rewritten: its
/// later pieces get `side`'s address replaced by `addr_be`.
#[inline(always)]
pub fn remember(pkt: &Packet, side: Side, addr_be: u32, vip_id: u32, backend_id: u32) {
    let rewrite = if side == Side::Source { FRAG_REWRITE_SOURCE } else { 0 };
    let state = FragState {
        addr_be: [addr_be, 0, 0, 0],
        vip_id,
        backend_id,
        rewrite,
        _pad: 0,
        first_seen_ns: conntrack::now_ns(),
    };
    // A failed insert costs the later pieces, which the rule then drops.
    let _ = FRAGS.insert(key_of(pkt.ip), state, 0);
}

/// A later fragment (offset ≠ 0): follows its first piece if that was
/// balanced within `FRAG_TIMEOUT_NS`; otherwise the fragment rule decides.
#[inline(always)]
pub fn follow(ctx: &XdpContext, v4: &Ipv4) -> Verdict {
    // SAFETY: the value is copied out at once.
    let Some(state) = (unsafe { FRAGS.get(key_of(v4.ip)) }).copied() else { return verdict(v4) };
    if conntrack::now_ns().saturating_sub(state.first_seen_ns) > FRAG_TIMEOUT_NS {
        return verdict(v4);
    }
    // SAFETY: bounds checked in parse_ipv4.
    if unsafe { (*v4.ip).ttl } <= 1 {
        return Verdict::pass(reason::PASS_TTL_EXPIRED);
    }
    let side = if state.rewrite == FRAG_REWRITE_SOURCE { Side::Source } else { Side::Destination };
    let verdict =
        rewrite::set_address_and_forward(ctx, v4.eth, v4.ip, side, state.addr_be[0], reason::REDIRECT_FRAGMENT);
    if verdict.reason != reason::PASS_LOCAL_DESTINATION && verdict.reason != reason::DROP_LOCAL_NEXT_HOP {
        let dir = if side == Side::Source { direction::OUT } else { direction::IN };
        stats::count_traffic(state.backend_id, dir, ctx);
    }
    verdict
}

/// The verdict for a fragment that cannot be placed.
#[inline(always)]
pub fn verdict(v4: &Ipv4) -> Verdict {
    // SAFETY: v4.ip was bounds checked in parse_ipv4.
    let (daddr, proto) = unsafe { ((*v4.ip).daddr_be, (*v4.ip).proto) };
    let key = VipAddrKey { addr_be: [daddr, 0, 0, 0], family: FAMILY_V4, _pad: [0; 3] };
    // SAFETY: the value is copied out at once.
    let protos = unsafe { VIP_ADDRS.get(&key) }.map_or(0, |info| info.protos);
    if protos & proto_bit(proto) != 0 {
        Verdict::drop(reason::DROP_FRAGMENT)
    } else {
        Verdict::pass(reason::PASS_FRAGMENT)
    }
}
