//! Per-client limits (`[vip.limits]`, `lb_common::client_limits`) through
//! BPF_PROG_TEST_RUN: the real program on hand-built frames, with the maps
//! written as the agent writes them. Timing-free: a burst is sent within a
//! few milliseconds, far less than one refill interval.
//!
//! The harness is in `v4/mod.rs`. Needs root (run by `cargo xtask test`).

mod v4;

use lb::{
    config::model::{Cidr, LimitAction, LimitsConfig},
    dataplane::Dataplane as _,
};
use lb_common::{
    PROTO_TCP, PROTO_UDP,
    client_limits::{ClientKey, limit},
    stats::reason,
    vip::{VIP_F_LIMITED, VipInfo},
};
use v4::*;

/// Writes `limits` for VIP 1 (TCP) and 2 (UDP), then sets their flag, as
/// the agent's balancer does.
fn limit_vips(lb: &mut Lb, limits: &LimitsConfig) {
    for (vip_id, port, proto) in [(1, VIP_TCP_PORT, PROTO_TCP), (2, VIP_UDP_PORT, PROTO_UDP)] {
        lb.maps.set_vip_limits(vip_id, limits.to_map()).expect("limits");
        for cidr in &limits.allow {
            lb.maps.set_limit_allow(vip_id, *cidr, true).expect("allow");
        }
        let info = VipInfo { vip_id, ring_size: RING, ring_generation: 0, flags: VIP_F_LIMITED };
        lb.upsert_vip(vip_key(port, proto), info);
    }
}

fn limits(rate: Option<u32>, burst: u32, max_connections: Option<u32>, action: LimitAction) -> LimitsConfig {
    LimitsConfig { rate, burst, max_connections, prefix_len: 32, action, allow: Vec::new() }
}

fn syn_from(src: [u8; 4], sport: u16) -> Vec<u8> {
    Tcp { src, ..Tcp::client_to_vip(sport) }.build()
}

fn fin_of(sport: u16) -> Vec<u8> {
    let mut fin = Tcp { syn: false, ..Tcp::client_to_vip(sport) }.build();
    // ACK|FIN; the program never checks the L4 checksum, only updates it.
    fin[14 + 20 + 13] = 0x11;
    fin
}

fn limited(lb: &Lb, vip_id: u32) -> [u64; limit::COUNT as usize] {
    lb.maps.limited(vip_id).expect("limited")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_burst_is_admitted_and_the_rest_dropped_per_client() {
    with_lb(|lb| {
        limit_vips(lb, &limits(Some(1), 5, None, LimitAction::Drop));
        for port in 41000..41005u16 {
            assert_eq!(lb.run(&syn_from(CLIENT, port), lb.client_if).0, XDP_REDIRECT, "syn {port} within the burst");
        }
        for port in 41005..41020u16 {
            lb.assert_dropped("over the rate", &syn_from(CLIENT, port), lb.client_if, reason::DROP_LIMITED_RATE);
        }
        assert_eq!(limited(lb, 1), [15, 0]);
        // Another client has a bucket of its own.
        let other = [198, 18, 1, 77];
        assert_eq!(lb.run(&syn_from(other, 41000), lb.client_if).0, XDP_REDIRECT, "another client");
        // Packets of an admitted flow are never limited: its first ACK, its data.
        let (v, _) = lb.ack(41000);
        assert_eq!(v, XDP_REDIRECT);
        let key = ClientKey { addr_be: [u32::from_ne_bytes(CLIENT), 0, 0, 0], vip_id: 1 };
        // Counted even with no ceiling set, so a reload that sets one starts from the flows there are.
        assert_eq!(lb.maps.client(&key).map(|c| c.connections), Some(1));
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn over_a_limit_that_answers_a_syn_gets_a_rst_and_a_datagram_port_unreachable() {
    with_lb(|lb| {
        limit_vips(lb, &limits(Some(1), 1, None, LimitAction::Rst));
        assert_eq!(lb.run(&syn_from(CLIENT, 42000), lb.client_if).0, XDP_REDIRECT);
        let (v, out, why) = lb.run_counted(&syn_from(CLIENT, 42001), lb.client_if);
        assert_eq!((v, why), (XDP_REDIRECT, "tx_rst_limited"));
        assert_checksums_valid(&out);
        assert_eq!(out[14 + 20 + 13] & 0x04, 0x04, "a RST");
        let datagram = |sport| udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, sport, VIP_UDP_PORT, b"q");
        assert_eq!(lb.run(&datagram(42000), lb.client_if).0, XDP_REDIRECT);
        let (v, out, why) = lb.run_counted(&datagram(42001), lb.client_if);
        assert_eq!((v, why), (XDP_REDIRECT, "tx_icmp_unreachable_limited"));
        assert_checksums_valid(&out);
        assert_eq!((limited(lb, 1), limited(lb, 2)), ([1, 0], [1, 0]));
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn concurrent_flows_are_counted_at_the_first_ack_and_freed_at_the_first_fin() {
    with_lb(|lb| {
        limit_vips(lb, &limits(None, 1, Some(2), LimitAction::Drop));
        let key = ClientKey { addr_be: [u32::from_ne_bytes(CLIENT), 0, 0, 0], vip_id: 1 };
        for port in [43000, 43001] {
            assert_eq!(lb.run(&syn_from(CLIENT, port), lb.client_if).0, XDP_REDIRECT);
            assert_eq!(lb.ack(port).0, XDP_REDIRECT);
        }
        assert_eq!(lb.maps.client(&key).map(|c| c.connections), Some(2));
        lb.assert_dropped("a third flow", &syn_from(CLIENT, 43002), lb.client_if, reason::DROP_LIMITED_CONNECTIONS);
        // A FIN frees its flow's place, once (a retransmitted FIN does not).
        for _ in 0..3 {
            assert_eq!(lb.run(&fin_of(43000), lb.client_if).0, XDP_REDIRECT);
        }
        assert_eq!(lb.maps.client(&key).map(|c| c.connections), Some(1));
        assert_eq!(lb.run(&syn_from(CLIENT, 43002), lb.client_if).0, XDP_REDIRECT, "room again");
        assert_eq!(limited(lb, 1), [0, 1]);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn allow_listed_clients_and_prefix_scopes() {
    with_lb(|lb| {
        let mut l = limits(Some(1), 2, None, LimitAction::Drop);
        l.prefix_len = 24;
        l.allow = vec![Cidr { addr: [198, 18, 1, 128].into(), prefix_len: 25 }];
        limit_vips(lb, &l);
        // 198.18.1.2 and .3 share one /24 bucket of 2.
        assert_eq!(lb.run(&syn_from(CLIENT, 44000), lb.client_if).0, XDP_REDIRECT);
        assert_eq!(lb.run(&syn_from([198, 18, 1, 3], 44000), lb.client_if).0, XDP_REDIRECT);
        lb.assert_dropped(
            "the /24 is spent",
            &syn_from([198, 18, 1, 4], 44000),
            lb.client_if,
            reason::DROP_LIMITED_RATE,
        );
        // 198.18.1.200 is in the allow-listed /25: never limited.
        for port in 44000..44020u16 {
            assert_eq!(lb.run(&syn_from([198, 18, 1, 200], port), lb.client_if).0, XDP_REDIRECT, "allowed {port}");
        }
        assert_eq!(limited(lb, 1), [1, 0]);
    });
}
