//! The return path: a backend's reply to a balanced flow leaves the gateway
//! with the VIP as its source, so the client sees the address it dialled.
//! A reply counts as activity of its flow (`conntrack::reply_seen`).

use aya_ebpf::programs::XdpContext;
use lb_common::{flow::ReplyNat, stats::reason};

use crate::{Verdict, conntrack, frag, lookup, parse, parse::Packet, rewrite::{self, Side}, stats};

#[inline(always)]
pub fn to_client(ctx: &XdpContext, pkt: &Packet, nat: &ReplyNat) -> Result<Verdict, Verdict> {
    let l4 = parse::l4_checked(ctx, pkt)?;
    parse::check_ttl(pkt)?;
    let now = conntrack::now_ns();
    conntrack::reply_seen(&lookup::flow_key(pkt, &l4), nat, &l4, now)?;
    stats::count_traffic(nat.vip_id, nat.backend_id, ctx);
    let vip_addr = nat.vip_addr_be[0];
    if pkt.first_fragment {
        frag::remember(pkt, Side::Source, vip_addr, nat.vip_id, nat.backend_id);
    }
    // A reply too big for the client's side is answered to the backend from the VIP.
    Ok(rewrite::translate_and_forward(
        ctx,
        pkt,
        &l4,
        Side::Source,
        vip_addr,
        nat.vip_port_be,
        vip_addr,
        reason::REDIRECT_TO_CLIENT,
        now,
    ))
}
