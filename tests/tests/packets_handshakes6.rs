//! Packet fixtures for the handshake counters of passive health through
//! IPv6 (see `packets_handshakes.rs`): the forward stage counts for both
//! families. The harness is in `v6/mod.rs`. Needs root (run by `cargo xtask
//! test`).

mod v6;

use etherparse::{PacketBuilder, PacketBuilderStep, TcpHeader};
use lb_common::{handshake::Handshakes, stats::reason};

use v6::*;

fn from_backend(
    id: u32,
    dport: u16,
    seq: u32,
    flags: impl FnOnce(PacketBuilderStep<TcpHeader>) -> PacketBuilderStep<TcpHeader>,
) -> Vec<u8> {
    let (baddr, bport) = backend_addr(id);
    let b = PacketBuilder::ethernet2(backend_mac(baddr[15]), GW_BACKEND_MAC)
        .ipv6(baddr, CLIENT, 64)
        .tcp(bport, dport, seq, 64240);
    let mut out = Vec::new();
    flags(b).write(&mut out, &[]).expect("build tcp");
    out
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_syn_syn_ack_and_refusal_are_counted() {
    with_lb(|lb| {
        let (accepted, refused) = (40600, 40601);
        let (a, r) = (lb.expected_backend(accepted), lb.expected_backend(refused));
        lb.run(&Tcp::client_to_vip(accepted).build(), lb.client_if);
        lb.run(&Tcp::client_to_vip(refused).build(), lb.client_if);
        let backend_if = lb.backend_if;
        let syn_ack = from_backend(a, accepted, 7000, |b| b.syn().ack(1001));
        lb.assert_redirected(&syn_ack, backend_if, reason::REDIRECT_TO_CLIENT_STATELESS);
        let rst = from_backend(r, refused, 0, |b| b.rst().ack(1001));
        lb.assert_redirected(&rst, backend_if, reason::REDIRECT_TO_CLIENT_STATELESS);
        let other = from_backend(r, refused + 10, 5, |b| b.rst().ack(1));
        lb.assert_redirected(&other, backend_if, reason::REDIRECT_TO_CLIENT_STATELESS);
        let count = |id| lb.maps.handshakes(id).expect("handshakes");
        if a == r {
            assert_eq!(count(a), Handshakes { syns: 2, syn_acks: 1, resets: 1, unreachables: 0 });
        } else {
            assert_eq!(count(a), Handshakes { syns: 1, syn_acks: 1, ..Handshakes::default() });
            assert_eq!(count(r), Handshakes { syns: 1, resets: 1, ..Handshakes::default() });
        }
    });
}
