//! Packet fixtures through BPF_PROG_TEST_RUN for the handshake counters of
//! passive health (`HANDSHAKES`, `lb_common::handshake`): which segment
//! moves which counter, and that the rest move none. The harness is in
//! `v4/mod.rs`; IPv6 is in `packets_handshakes6.rs`. Needs root (run by
//! `cargo xtask test`).

mod v4;

use etherparse::PacketBuilder;
use lb_common::{handshake::Handshakes, stats::reason};
use v4::*;

/// A segment from backend `id`'s service to the client's port `dport`,
/// with sequence number `seq` and the flags `flags` sets on the builder.
fn from_backend(
    id: u32,
    dport: u16,
    seq: u32,
    flags: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
) -> Vec<u8> {
    let (baddr, bport) = backend_addr(id);
    let b = PacketBuilder::ethernet2(backend_mac(baddr[3]), GW_BACKEND_MAC)
        .ipv4(baddr, CLIENT, 64)
        .tcp(bport, dport, seq, 64240);
    let mut out = Vec::new();
    flags(b).write(&mut out, &[]).expect("build tcp");
    out
}

fn counted(lb: &Lb, id: u32) -> Handshakes {
    lb.maps.handshakes(id).expect("handshake counters")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_syn_and_its_syn_ack_count_and_established_packets_do_not() {
    with_lb(|lb| {
        let sport = 40500;
        let id = lb.expected_backend(sport);
        let (v, _) = lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(counted(lb, id), Handshakes { syns: 1, ..Handshakes::default() });
        // A retransmitted SYN counts again: each is an attempt.
        lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        let backend_if = lb.backend_if;
        let syn_ack = from_backend(id, sport, 7000, |b| b.syn().ack(1001));
        lb.assert_redirected_as(&syn_ack, backend_if, reason::REDIRECT_TO_CLIENT_STATELESS);
        assert_eq!(counted(lb, id), Handshakes { syns: 2, syn_acks: 1, ..Handshakes::default() });
        // The first ACK, data both ways: nothing more.
        lb.ack(sport);
        lb.run(&Tcp { syn: false, payload: b"GET /", ..Tcp::client_to_vip(sport) }.build(), lb.client_if);
        let data = from_backend(id, sport, 7001, |b| b.ack(1006).psh());
        lb.assert_redirected_as(&data, backend_if, reason::REDIRECT_TO_CLIENT);
        assert_eq!(counted(lb, id), Handshakes { syns: 2, syn_acks: 1, ..Handshakes::default() });
        // A RST closing the established connection carries its own sequence
        // number: not a refused handshake.
        let close = from_backend(id, sport, 7001, |b| b.rst().ack(1006));
        lb.assert_redirected_as(&close, backend_if, reason::REDIRECT_TO_CLIENT);
        assert_eq!(counted(lb, id).resets, 0);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn only_a_rst_answering_a_syn_counts_as_refused() {
    with_lb(|lb| {
        let sport = 40510;
        let id = lb.expected_backend(sport);
        lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        let backend_if = lb.backend_if;
        // What a host with nothing listening answers a SYN: RST+ACK, sequence 0.
        let refused = from_backend(id, sport, 0, |b| b.rst().ack(1001));
        lb.assert_redirected_as(&refused, backend_if, reason::REDIRECT_TO_CLIENT_STATELESS);
        assert_eq!(counted(lb, id), Handshakes { syns: 1, resets: 1, ..Handshakes::default() });
        // What it answers a stray ACK (a spoofed one, say): RST without ACK.
        let stray = from_backend(id, sport + 1, 0, etherparse::PacketBuilderStep::rst);
        lb.assert_redirected_as(&stray, backend_if, reason::REDIRECT_TO_CLIENT_STATELESS);
        // A RST+ACK with another sequence number: some connection's end.
        let other = from_backend(id, sport + 2, 99, |b| b.rst().ack(1));
        lb.assert_redirected_as(&other, backend_if, reason::REDIRECT_TO_CLIENT_STATELESS);
        assert_eq!(counted(lb, id), Handshakes { syns: 1, resets: 1, ..Handshakes::default() });
    });
}
