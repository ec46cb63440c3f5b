//! IPv6 packet fixtures through BPF_PROG_TEST_RUN: the extension-header-free
//! fast path (TCP and UDP to an IPv6 VIP, replies translated back), and the
//! rules for what it does not balance (extension headers, hop limit 1,
//! traffic to other addresses).
//!
//! Like `packets.rs`, each test runs in a private network namespace with a
//! veth pair, routes and permanent neighbour entries, so `bpf_fib_lookup`
//! (AF_INET6) answers as on a real gateway: client side 2001:db8:1::/64
//! (`lbp-c`), backend side 2001:db8:2::/64 (`lbp-b`), VIP 2001:db8::100.
//! Expected frames are built independently with etherparse.
//!
//! The harness is in `v6/mod.rs`. Needs root (run by `cargo xtask test`).

mod v6;

use lb_common::{PROTO_TCP, PROTO_UDP, stats::reason};
use v6::*;

// ---------------------------------------------------------------- cases

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_tcp_syn_to_vip_is_rewritten_to_its_maglev_backend() {
    with_lb(|lb| {
        let sport = 40000;
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let out = lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let expected = Tcp {
            src_mac: GW_BACKEND_MAC,
            dst_mac: backend_mac(baddr[15]),
            dst: baddr,
            dport: bport,
            hop_limit: 63,
            ..Tcp::client_to_vip(sport)
        };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        // A SYN is not tracked (issue 12): its first ACK is.
        let key = flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP);
        assert!(lb.maps.flow(&key).is_none(), "a SYN pinned its flow");
        let (_, ack_out) = lb.ack(sport);
        let state = lb.maps.flow(&key).expect("flow tracked from its first ACK");
        assert_eq!((state.backend_id, state.vip_id), (id, 1));
        let c = lb.maps.backend_counters(id).expect("counters");
        assert_eq!(
            (c.packets_in, c.bytes_in, c.packets_out, c.new_flows),
            (2, (out.len() + ack_out.len()) as u64, 0, 1)
        );
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_established_flow_keeps_its_backend_when_the_ring_changes() {
    with_lb(|lb| {
        let sport = 40001;
        let first = lb.expected_backend(sport);
        lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        lb.ack(sport);
        let others: Vec<u32> = (1..=3).filter(|&i| i != first).collect();
        lb.set_ring(1, 1, &others);
        let data = Tcp { syn: false, payload: b"GET / HTTP/1.1\r\n\r\n", ..Tcp::client_to_vip(sport) };
        let out = lb.assert_redirected(&data.build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let (baddr, bport) = backend_addr(first);
        let expected = Tcp {
            src_mac: GW_BACKEND_MAC,
            dst_mac: backend_mac(baddr[15]),
            dst: baddr,
            dport: bport,
            hop_limit: 63,
            ..data
        };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        // A new flow avoids the removed backend.
        for sport in 41000..41020 {
            let out =
                lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
            assert_ne!(&out[38..54], &baddr, "new flow went to the removed backend");
        }
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_reply_from_backend_leaves_with_the_vip_as_source() {
    with_lb(|lb| {
        let sport = 40002;
        lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        lb.ack(sport);
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let reply = Tcp {
            src_mac: backend_mac(baddr[15]),
            dst_mac: GW_BACKEND_MAC,
            src: baddr,
            dst: CLIENT,
            sport: bport,
            dport: sport,
            hop_limit: 64,
            syn: false,
            payload: b"HTTP/1.1 200 OK\r\n\r\n",
        };
        let out = lb.assert_redirected(&reply.build(), lb.backend_if, reason::REDIRECT_TO_CLIENT);
        let expected =
            Tcp { src_mac: GW_CLIENT_MAC, dst_mac: CLIENT_MAC, src: VIP, sport: VIP_TCP_PORT, hop_limit: 63, ..reply };
        assert_frame(&out, &expected.build());
        assert_checksums_valid(&out);
        let c = lb.maps.backend_counters(id).expect("counters");
        assert_eq!((c.packets_in, c.packets_out), (2, 1), "syn and ack in, the reply out");
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_udp_is_rewritten_both_ways() {
    with_lb(|lb| {
        let sport = 50000;
        let req = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, sport, VIP_UDP_PORT, b"query");
        let out = lb.assert_redirected(&req, lb.client_if, reason::REDIRECT_TO_BACKEND);
        let state = lb.maps.flow(&flow(CLIENT, VIP, sport, VIP_UDP_PORT, PROTO_UDP)).expect("udp flow tracked");
        assert!((4..=6).contains(&state.backend_id));
        let (baddr, bport) = backend_addr(state.backend_id);
        assert_frame(&out, &udp(GW_BACKEND_MAC, backend_mac(baddr[15]), CLIENT, baddr, 63, sport, bport, b"query"));
        assert_checksums_valid(&out);

        let reply = udp(backend_mac(baddr[15]), GW_BACKEND_MAC, baddr, CLIENT, 64, bport, sport, b"answer");
        let out = lb.assert_redirected(&reply, lb.backend_if, reason::REDIRECT_TO_CLIENT);
        assert_frame(&out, &udp(GW_CLIENT_MAC, CLIENT_MAC, VIP, CLIENT, 63, VIP_UDP_PORT, sport, b"answer"));
        assert_checksums_valid(&out);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_non_vip_traffic_passes_untouched() {
    with_lb(|lb| {
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            (
                "tcp to a backend address directly",
                Tcp { dst: addr(2, 0x11), dport: 8080, ..Tcp::client_to_vip(40003) }.build(),
                reason::PASS_DIRECT_FLOW,
            ),
            ("icmpv6 echo to a backend address", ping(addr(2, 0x11)), reason::PASS_NOT_VIP),
            (
                "hop-by-hop header to another address",
                with_hop_by_hop(&Tcp { dst: addr(2, 0x11), ..Tcp::client_to_vip(40005) }.build()),
                reason::PASS_NOT_VIP,
            ),
        ];
        for (name, frame, why) in &cases {
            lb.assert_passed_untouched(name, frame, *why);
        }
    });
}

/// Issue 15, items 1 and 4 for IPv6: unserved ports of a VIP address are
/// refused here; the gateway's and backends' addresses open no flows.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_unserved_vip_ports_are_refused_and_spoofed_sources_dropped() {
    with_lb(|lb| {
        let client_if = lb.client_if;
        let (action, _, counted) = lb.run_counted(&Tcp { dport: 443, ..Tcp::client_to_vip(40004) }.build(), client_if);
        assert_eq!((action, counted), (XDP_REDIRECT, reason::NAMES[reason::TX_RST_NO_SERVICE as usize]));
        let datagram = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, 5000, VIP_TCP_PORT, b"x");
        let (action, _, counted) = lb.run_counted(&datagram, client_if);
        assert_eq!((action, counted), (XDP_REDIRECT, reason::NAMES[reason::TX_ICMP_UNREACHABLE_NO_SERVICE as usize]));
        for src in [addr(2, 1), addr(1, 1), addr(2, 0x12)] {
            let spoofed = Tcp { src, ..Tcp::client_to_vip(45000) }.build();
            lb.assert_dropped("spoofed source", &spoofed, client_if, reason::DROP_SPOOFED_SOURCE);
        }
        assert!(lb.maps.flow(&flow(addr(2, 1), VIP, 45000, VIP_TCP_PORT, PROTO_TCP)).is_none(), "no flow pinned");
    });
}

/// Passed on, the gateway (which does not own the VIP) would route them back
/// the way they came (issue 15, item 4).
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_extension_headers_to_a_vip_are_dropped_with_their_counter() {
    with_lb(|lb| {
        let client_if = lb.client_if;
        let tcp = with_hop_by_hop(&Tcp::client_to_vip(40006).build());
        lb.assert_dropped("hop-by-hop, then TCP", &tcp, client_if, reason::DROP_IPV6_EXT_HEADER);
        let udp = with_hop_by_hop(&udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, 50001, VIP_UDP_PORT, b"q"));
        lb.assert_dropped("hop-by-hop, then UDP", &udp, client_if, reason::DROP_IPV6_EXT_HEADER);
        // A fragment header (44) is an extension header too.
        let mut frag = tcp.clone();
        frag[14 + 6] = 44;
        lb.assert_dropped("fragment header", &frag, client_if, reason::DROP_IPV6_EXT_HEADER);
        assert!(lb.maps.flow(&flow(CLIENT, VIP, 40006, VIP_TCP_PORT, PROTO_TCP)).is_none(), "no flow pinned");
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_hop_limit_and_malformed_headers_follow_their_rules() {
    with_lb(|lb| {
        for hop_limit in [0, 1] {
            let frame = Tcp { hop_limit, ..Tcp::client_to_vip(40007) }.build();
            lb.assert_passed_untouched("hop limit expiring", &frame, reason::PASS_TTL_EXPIRED);
        }
        let sport = 40008;
        let (baddr, bport) = backend_addr(lb.expected_backend(sport));
        lb.assert_redirected(&Tcp::client_to_vip(sport).build(), lb.client_if, reason::REDIRECT_TO_BACKEND);
        let reply = Tcp {
            src_mac: backend_mac(baddr[15]),
            dst_mac: GW_BACKEND_MAC,
            src: baddr,
            dst: CLIENT,
            sport: bport,
            dport: sport,
            hop_limit: 1,
            syn: false,
            payload: b"",
        };
        let frame = reply.build();
        let (action, out, counted) = lb.run_counted(&frame, lb.backend_if);
        assert_eq!((action, counted), (XDP_PASS, "pass_ttl_expired"), "reply with hop limit 1");
        assert_frame(&out, &frame);

        let syn = Tcp::client_to_vip(40009).build();
        let mut truncated = syn.clone();
        truncated.truncate(syn.len() - 1);
        lb.assert_passed_untouched("payload beyond the frame", &truncated, reason::PASS_TRUNCATED_IP);
        let mut version = syn.clone();
        version[14] = 0x40;
        lb.assert_passed_untouched("version 4 in an IPv6 ethertype", &version, reason::PASS_MALFORMED_IP);
        lb.assert_passed_untouched("header cut off", &syn[..14 + 39], reason::PASS_MALFORMED_IP);
    });
}

/// `frame` with one 802.1Q tag (VLAN `vid`) after the MACs.
fn with_vlan_tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&0x8100u16.to_be_bytes());
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_vlan_tagged_frames_are_balanced_with_their_tag_kept() {
    with_lb(|lb| {
        let sport = 40010;
        let (baddr, bport) = backend_addr(lb.expected_backend(sport));
        let syn = with_vlan_tag(&Tcp::client_to_vip(sport).build(), 42);
        let out = lb.assert_redirected(&syn, lb.client_if, reason::REDIRECT_TO_BACKEND);
        let expected = Tcp {
            src_mac: GW_BACKEND_MAC,
            dst_mac: backend_mac(baddr[15]),
            dst: baddr,
            dport: bport,
            hop_limit: 63,
            ..Tcp::client_to_vip(sport)
        };
        assert_frame(&out, &with_vlan_tag(&expected.build(), 42));
        let expired = with_vlan_tag(&Tcp { hop_limit: 1, ..Tcp::client_to_vip(sport) }.build(), 42);
        lb.assert_passed_untouched("tagged, hop limit 1", &expired, reason::PASS_TTL_EXPIRED);
    });
}

/// The IPv6 twin of `packets::established_packets_and_replies_take_the_fast_path`.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_established_packets_and_replies_take_the_fast_path() {
    with_lb(|lb| {
        use lb::dataplane::Dataplane as _;
        let sport = 40300;
        lb.run(&Tcp::client_to_vip(sport).build(), lb.client_if);
        let id = lb.expected_backend(sport);
        let (baddr, bport) = backend_addr(id);
        let data = Tcp { syn: false, payload: b"data", ..Tcp::client_to_vip(sport) };
        let reply = Tcp {
            src_mac: backend_mac(baddr[15]),
            dst_mac: GW_BACKEND_MAC,
            src: baddr,
            dst: CLIENT,
            sport: bport,
            dport: sport,
            hop_limit: 64,
            syn: false,
            payload: b"answer",
        };
        let (client_if, backend_if) = (lb.client_if, lb.backend_if);
        let to_backend = lb.assert_redirected(&data.build(), client_if, reason::REDIRECT_TO_BACKEND);
        let to_client = lb.assert_redirected(&reply.build(), backend_if, reason::REDIRECT_TO_CLIENT);
        lb.maps
            .upsert_vip(
                vip_key(VIP_TCP_PORT, PROTO_TCP),
                lb_common::vip::VipInfo { vip_id: 2, ring_size: RING, ring_generation: 0, flags: 0 },
            )
            .expect("vip");
        let service = lb_common::guard::ServiceKey {
            addr_be: words(baddr),
            port_be: bport.to_be(),
            proto: PROTO_TCP,
            family: lb_common::FAMILY_V6,
        };
        let nat = lb_common::flow::ReplyNat {
            vip_addr_be: words(VIP),
            vip_port_be: VIP_TCP_PORT.to_be(),
            flags: 0,
            vip_id: 2,
            backend_id: id,
        };
        lb.maps.set_backend_service(service, nat).expect("service");
        let before = lb.maps.backend_counters(id).expect("counters");
        assert_frame(&lb.assert_redirected(&data.build(), client_if, reason::REDIRECT_TO_BACKEND), &to_backend);
        let after = lb.maps.backend_counters(id).expect("counters");
        assert_eq!(
            (after.packets_in, after.packets_out),
            (before.packets_in + 1, before.packets_out),
            "the packet was not counted in its backend's inbound traffic"
        );
        assert_frame(&lb.assert_redirected(&reply.build(), backend_if, reason::REDIRECT_TO_CLIENT), &to_client);
        let last = lb.maps.backend_counters(id).expect("counters");
        assert_eq!(
            (last.packets_in, last.packets_out),
            (after.packets_in, after.packets_out + 1),
            "the reply was not counted in its backend's outbound traffic"
        );
    });
}
