//! The return path: a backend's reply to a balanced flow leaves the gateway
//! with the VIP as its source, so the client sees the address it dialled.
//! The VIP comes from the backend's service entry (`guard::reply`): no
//! per-flow reply state, so a reply never leaves with the backend's own
//! address, whatever the connection table holds. A reply counts as activity
//! of its flow (`conntrack::reply_seen`).

use aya_ebpf::programs::XdpContext;
use lb_common::{flow::ReplyNat, stats::reason};

use crate::{Verdict, conntrack, forward, frag, guard::Reply, lookup, parse, parse::Packet, rewrite::Side};

/// Sends a backend's packet on the way `route` says.
#[inline(always)]
pub fn route(ctx: &XdpContext, pkt: &Packet, route: Reply) -> Option<Result<Verdict, Verdict>> {
    match route {
        Reply::Translate(nat) => Some(to_client(ctx, pkt, &nat)),
        Reply::Direct => Some(Ok(Verdict::pass(reason::PASS_DIRECT_FLOW))),
        Reply::NoFlow => Some(Err(Verdict::drop(reason::DROP_REPLY_NO_FLOW))),
        Reply::NotOurs => None,
    }
}

#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet, nat: &ReplyNat) -> Result<Verdict, Verdict> {
    let l4 = parse::l4_checked(ctx, pkt)?;
    parse::check_ttl(pkt)?;
    let now = conntrack::now_ns();
    let tracked = conntrack::reply_seen(&lookup::flow_key(pkt, &l4), nat, &l4, now)?;
    let vip_addr = nat.vip_addr_be[0];
    let sent = if tracked { reason::REDIRECT_TO_CLIENT } else { reason::REDIRECT_TO_CLIENT_STATELESS };
    // Keyed by the addresses the later pieces arrive with: before the rewrite.
    if pkt.first_fragment {
        frag::remember(pkt, Side::Source, vip_addr, nat.vip_id, nat.backend_id);
    }
    let decision = forward::Decision {
        side: Side::Source,
        addr_be: nat.vip_addr_be,
        port_be: nat.vip_port_be,
        // A reply too big for the client's side is answered to the backend from the VIP.
        icmp_from_be: nat.vip_addr_be,
        redirect_reason: sent,
        vip_id: nat.vip_id,
        backend_id: nat.backend_id,
        now,
    };
    Ok(forward::plan_v4(ctx, pkt, &l4, &decision))
}
