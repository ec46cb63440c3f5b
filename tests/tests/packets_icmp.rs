//! Packet fixtures for ICMP errors and path MTU (IPv4), through
//! BPF_PROG_TEST_RUN: errors about balanced flows steered to the backend or
//! reverse-translated to the client, and packets too big for their next hop
//! answered with "fragmentation needed". Expected frames are built with
//! etherparse from scratch, so byte equality checks every checksum: outer,
//! quoted IP and quoted TCP/UDP; the quoted headers are also checked on
//! their own. The harness is in `v4/mod.rs`. Needs root.

mod v4;

use etherparse::{
    Icmpv4Type, Ipv4HeaderSlice, PacketBuilder, SlicedPacket, TcpHeaderSlice, TransportSlice, UdpHeaderSlice,
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
};
use lb_common::{PROTO_TCP, PROTO_UDP, flow::FlowState, stats::reason};
use v4::*;

/// A router on the clients' side, and its MAC.
const CLIENT_ROUTER: [u8; 4] = [198, 18, 1, 254];
const CLIENT_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];
/// A router on the backends' side.
const BACKEND_ROUTER: [u8; 4] = [198, 18, 2, 254];
const BACKEND_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0xfe];

static PAYLOAD: [u8; 1400] = [0x5a; 1400];

fn frag_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu })
}

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

/// An ICMP error frame quoting `quote`.
fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    kind: Icmpv4Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, ttl)
        .icmpv4(kind)
        .write(&mut out, quote)
        .expect("build icmp error");
    out
}

/// The IP header of an untagged frame and `extra` bytes after it: what an
/// ICMP error quotes (RFC 792 guarantees 8; routers often quote more).
fn quote(frame: &[u8], extra: usize) -> Vec<u8> {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[14..(14 + ihl + extra).min(frame.len())].to_vec()
}

/// Checks the quoted IP header's checksum from scratch, and the quoted
/// TCP/UDP checksum too when the whole segment is quoted.
fn assert_quote_checksums_valid(frame: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else { panic!("output is not ICMP") };
    let quoted = icmp.payload();
    let ip = Ipv4HeaderSlice::from_slice(quoted).expect("quoted IPv4 header");
    let header = ip.to_header();
    assert_eq!(header.header_checksum, header.calc_header_checksum(), "quoted IPv4 header checksum");
    let segment = &quoted[ip.slice().len()..];
    if usize::from(header.total_len) != quoted.len() {
        return;
    }
    match header.protocol.0 {
        PROTO_TCP => {
            let tcp = TcpHeaderSlice::from_slice(segment).expect("quoted tcp").to_header();
            let payload = &segment[tcp.header_len()..];
            assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&header, payload).expect("csum"), "quoted TCP checksum");
        }
        PROTO_UDP => {
            let udp = UdpHeaderSlice::from_slice(segment).expect("quoted udp").to_header();
            let expected = udp.calc_checksum_ipv4(&header, &segment[8..]).expect("csum");
            assert_eq!(udp.checksum, expected, "quoted UDP checksum");
        }
        other => panic!("quoted protocol {other}"),
    }
}

impl Lb {
    /// Runs `frame` in on `ingress`: redirected, bytes as `expected`, all
    /// checksums valid, counted once as `expected_reason`.
    #[track_caller]
    fn assert_redirected(&mut self, name: &str, frame: &[u8], ingress: u32, expected: &[u8], expected_reason: u32) {
        let (action, out, counted) = self.run_counted(frame, ingress);
        assert_eq!((action, counted), (XDP_REDIRECT, reason::NAMES[expected_reason as usize]), "{name}");
        assert_frame(&out, expected);
        assert_checksums_valid(&out);
        assert_quote_checksums_valid(&out);
    }

    /// Sends a client's SYN and first ACK to the TCP VIP (the ACK pins the
    /// flow); returns the backend's id.
    fn open_tcp(&mut self, sport: u16) -> u32 {
        let (v, _) = self.run(&Tcp::client_to_vip(sport).build(), self.client_if);
        assert_eq!(v, XDP_REDIRECT, "syn");
        assert_eq!(self.ack(sport).0, XDP_REDIRECT, "ack");
        self.expected_backend(sport)
    }

    /// Sends a client's datagram to the UDP VIP; returns the backend's id.
    fn open_udp(&mut self, sport: u16) -> u32 {
        let req = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, sport, VIP_UDP_PORT, b"query");
        assert_eq!(self.run(&req, self.client_if).0, XDP_REDIRECT, "udp");
        self.maps.flow(&flow(CLIENT, VIP, sport, VIP_UDP_PORT, PROTO_UDP)).expect("udp flow").backend_id
    }
}

/// A backend's TCP reply to the client as it leaves the gateway (from the
/// VIP, TTL 63) or as the backend sent it (from the backend).
fn tcp_reply(src: [u8; 4], sport: u16, dport: u16, payload: &'static [u8]) -> Tcp {
    Tcp { src_mac: GW_CLIENT_MAC, dst_mac: CLIENT_MAC, src, dst: CLIENT, ttl: 63, sport, dport, syn: false, payload }
}

// ---------------------------------------------------------------- errors to the VIP: steered to the backend

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn fragmentation_needed_for_a_reply_is_steered_to_the_flows_backend() {
    with_lb(|lb| {
        let sport = 40100;
        let id = lb.open_tcp(sport);
        let (baddr, bport) = backend_addr(id);
        let on_wire = tcp_reply(VIP, VIP_TCP_PORT, sport, &PAYLOAD[..1300]).build();
        let as_sent = tcp_reply(baddr, bport, sport, &PAYLOAD[..1300]).build();
        let to_backend = (GW_BACKEND_MAC, backend_mac(baddr[3]));
        for extra in [8, 20, 28] {
            let err = icmp_error(
                (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
                CLIENT_ROUTER,
                VIP,
                64,
                frag_needed(1280),
                &quote(&on_wire, extra),
            );
            let expected = icmp_error(to_backend, CLIENT_ROUTER, baddr, 63, frag_needed(1280), &quote(&as_sent, extra));
            lb.assert_redirected(
                &format!("quote of ip header + {extra}"),
                &err,
                lb.client_if,
                &expected,
                reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
            );
        }
        // A segment quoted whole: its TCP checksum is translated too, and
        // checked from scratch.
        let short_on_wire = tcp_reply(VIP, VIP_TCP_PORT, sport, b"HTTP/1.1 200 OK\r\n").build();
        let short_as_sent = tcp_reply(baddr, bport, sport, b"HTTP/1.1 200 OK\r\n").build();
        let err = icmp_error(
            (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
            CLIENT_ROUTER,
            VIP,
            64,
            frag_needed(1280),
            &quote(&short_on_wire, 1000),
        );
        let expected =
            icmp_error(to_backend, CLIENT_ROUTER, baddr, 63, frag_needed(1280), &quote(&short_as_sent, 1000));
        lb.assert_redirected(
            "whole segment quoted",
            &err,
            lb.client_if,
            &expected,
            reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
        );
        // Time exceeded and host unreachable take the same way.
        let kinds = [
            Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host),
        ];
        for kind in kinds {
            let err = icmp_error(
                (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
                CLIENT_ROUTER,
                VIP,
                64,
                kind.clone(),
                &quote(&on_wire, 8),
            );
            let expected = icmp_error(to_backend, CLIENT_ROUTER, baddr, 63, kind.clone(), &quote(&as_sent, 8));
            lb.assert_redirected(
                &format!("{kind:?}"),
                &err,
                lb.client_if,
                &expected,
                reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
            );
        }
        assert_eq!(
            lb.maps.backend_counters(id).expect("counters").packets_in,
            2 + 6,
            "errors count as the flow's traffic"
        );
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn an_error_about_a_udp_reply_translates_its_udp_checksum() {
    with_lb(|lb| {
        let sport = 50100;
        let id = lb.open_udp(sport);
        let (baddr, bport) = backend_addr(id);
        let on_wire = udp(GW_CLIENT_MAC, CLIENT_MAC, VIP, CLIENT, 63, VIP_UDP_PORT, sport, &PAYLOAD[..1300]);
        let as_sent = udp(GW_CLIENT_MAC, CLIENT_MAC, baddr, CLIENT, 63, bport, sport, &PAYLOAD[..1300]);
        let err = icmp_error(
            (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
            CLIENT_ROUTER,
            VIP,
            64,
            frag_needed(1280),
            &quote(&on_wire, 8),
        );
        let expected = icmp_error(
            (GW_BACKEND_MAC, backend_mac(baddr[3])),
            CLIENT_ROUTER,
            baddr,
            63,
            frag_needed(1280),
            &quote(&as_sent, 8),
        );
        lb.assert_redirected(
            "udp, 8 bytes quoted",
            &err,
            lb.client_if,
            &expected,
            reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
        );
        // Without a checksum (0): stays 0.
        let mut bare_on_wire = udp(GW_CLIENT_MAC, CLIENT_MAC, VIP, CLIENT, 63, VIP_UDP_PORT, sport, b"answer");
        bare_on_wire[40..42].copy_from_slice(&[0, 0]);
        let mut bare_as_sent = udp(GW_CLIENT_MAC, CLIENT_MAC, baddr, CLIENT, 63, bport, sport, b"answer");
        bare_as_sent[40..42].copy_from_slice(&[0, 0]);
        let err = icmp_error(
            (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
            CLIENT_ROUTER,
            VIP,
            64,
            frag_needed(1280),
            &quote(&bare_on_wire, 8),
        );
        let expected = icmp_error(
            (GW_BACKEND_MAC, backend_mac(baddr[3])),
            CLIENT_ROUTER,
            baddr,
            63,
            frag_needed(1280),
            &quote(&bare_as_sent, 8),
        );
        lb.assert_redirected(
            "udp without checksum",
            &err,
            lb.client_if,
            &expected,
            reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
        );
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn errors_to_a_vip_about_no_balanced_flow_are_dropped_and_others_pass() {
    with_lb(|lb| {
        let sport = 40110;
        let on_wire = tcp_reply(VIP, VIP_TCP_PORT, sport, &PAYLOAD[..100]).build();
        let err =
            |q: &[u8]| icmp_error((CLIENT_ROUTER_MAC, GW_CLIENT_MAC), CLIENT_ROUTER, VIP, 64, frag_needed(1280), q);
        lb.assert_dropped("no such flow", &err(&quote(&on_wire, 8)), lb.client_if, reason::DROP_ICMP_ERROR_NO_FLOW);
        lb.open_tcp(sport);
        // Shorter than RFC 792's IP header + 8 bytes: cannot name the flow.
        lb.assert_dropped("quote too short", &err(&quote(&on_wire, 4)), lb.client_if, reason::DROP_ICMP_ERROR_NO_FLOW);
        let mut bad_ihl = quote(&on_wire, 8);
        bad_ihl[0] = 0x44;
        lb.assert_dropped("quoted ihl < 5", &err(&bad_ihl), lb.client_if, reason::DROP_ICMP_ERROR_NO_FLOW);
        let mut later_fragment = quote(&on_wire, 8);
        later_fragment[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        lb.assert_dropped(
            "quoted non-first fragment",
            &err(&later_fragment),
            lb.client_if,
            reason::DROP_ICMP_ERROR_NO_FLOW,
        );
        // Addressed to the VIP but quoting a packet from elsewhere.
        let other = tcp_reply([198, 18, 0, 101], VIP_TCP_PORT, sport, b"x").build();
        lb.assert_dropped(
            "quote not from the VIP",
            &err(&quote(&other, 8)),
            lb.client_if,
            reason::DROP_ICMP_ERROR_NO_FLOW,
        );
        // Errors about other traffic through the gateway are not ours.
        let routed = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, [198, 18, 2, 50], 63, 1234, 53, b"q");
        let for_client = icmp_error(
            (BACKEND_ROUTER_MAC, GW_BACKEND_MAC),
            BACKEND_ROUTER,
            CLIENT,
            64,
            port_unreachable(),
            &quote(&routed, 8),
        );
        let (action, out, counted) = lb.run_counted(&for_client, lb.backend_if);
        assert_eq!((action, counted), (XDP_PASS, "pass_not_vip"));
        assert_frame(&out, &for_client);
        // The flow's state is not touched by errors.
        let key = flow(CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP);
        let before = lb.maps.flow(&key).expect("flow");
        let ok = icmp_error(
            (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
            CLIENT_ROUTER,
            VIP,
            64,
            frag_needed(1280),
            &quote(&on_wire, 8),
        );
        assert_eq!(lb.run(&ok, lb.client_if).0, XDP_REDIRECT);
        assert_eq!(lb.maps.flow(&key).expect("flow"), before, "flow entry changed");
        // TTL 1: left to the kernel (time exceeded), untouched.
        let ttl1 = icmp_error(
            (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
            CLIENT_ROUTER,
            VIP,
            1,
            frag_needed(1280),
            &quote(&on_wire, 8),
        );
        lb.assert_passed_untouched("ttl 1", &ttl1, reason::PASS_TTL_EXPIRED);
    });
}

// ---------------------------------------------------------------- errors to a client: reverse-translated

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn port_unreachable_from_a_backend_reaches_the_client_from_the_vip() {
    with_lb(|lb| {
        let sport = 50110;
        let id = lb.open_udp(sport);
        let (baddr, bport) = backend_addr(id);
        // What the backend received (TTL 63), and what the client had sent.
        let received = udp(GW_BACKEND_MAC, backend_mac(baddr[3]), CLIENT, baddr, 63, sport, bport, b"query");
        let sent = udp(GW_BACKEND_MAC, backend_mac(baddr[3]), CLIENT, VIP, 63, sport, VIP_UDP_PORT, b"query");
        let to_client = (GW_CLIENT_MAC, CLIENT_MAC);
        for extra in [8, 1000] {
            let err = icmp_error(
                (backend_mac(baddr[3]), GW_BACKEND_MAC),
                baddr,
                CLIENT,
                64,
                port_unreachable(),
                &quote(&received, extra),
            );
            let expected = icmp_error(to_client, VIP, CLIENT, 63, port_unreachable(), &quote(&sent, extra));
            lb.assert_redirected(
                &format!("quote of ip header + {extra}"),
                &err,
                lb.backend_if,
                &expected,
                reason::REDIRECT_ICMP_ERROR_TO_CLIENT,
            );
        }
        // Passive health counts each: the backend did not take the datagram.
        assert_eq!(lb.maps.handshakes(id).expect("handshakes").unreachables, 2);
        // From a router between gateway and backend: the outer source stays.
        let tcp_sport = 40120;
        let tid = lb.open_tcp(tcp_sport);
        let (taddr, tport) = backend_addr(tid);
        let received = Tcp { dst: taddr, dport: tport, ttl: 63, ..Tcp::client_to_vip(tcp_sport) }.build();
        let sent = Tcp { ttl: 63, ..Tcp::client_to_vip(tcp_sport) }.build();
        let exceeded = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
        let err = icmp_error(
            (BACKEND_ROUTER_MAC, GW_BACKEND_MAC),
            BACKEND_ROUTER,
            CLIENT,
            64,
            exceeded.clone(),
            &quote(&received, 1000),
        );
        let expected = icmp_error(to_client, BACKEND_ROUTER, CLIENT, 63, exceeded, &quote(&sent, 1000));
        lb.assert_redirected(
            "time exceeded from a router",
            &err,
            lb.backend_if,
            &expected,
            reason::REDIRECT_ICMP_ERROR_TO_CLIENT,
        );
        // About TCP, and not an unreachable: not counted.
        assert_eq!(lb.maps.handshakes(tid).expect("handshakes").unreachables, 0);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn an_error_about_a_flow_that_moved_on_is_dropped() {
    with_lb(|lb| {
        let sport = 50120;
        let id = lb.open_udp(sport);
        let (baddr, bport) = backend_addr(id);
        let key = flow(CLIENT, VIP, sport, VIP_UDP_PORT, PROTO_UDP);
        let moved = if id == 6 { 4 } else { id + 1 };
        let state = lb.maps.flow(&key).expect("flow");
        lb.maps.set_flow(&key, FlowState { backend_id: moved, ..state }).expect("move the flow");
        let received = udp(GW_BACKEND_MAC, backend_mac(baddr[3]), CLIENT, baddr, 63, sport, bport, b"query");
        let err = icmp_error(
            (backend_mac(baddr[3]), GW_BACKEND_MAC),
            baddr,
            CLIENT,
            64,
            port_unreachable(),
            &quote(&received, 8),
        );
        lb.assert_dropped("stale", &err, lb.backend_if, reason::DROP_STALE_REPLY);
    });
}

// ---------------------------------------------------------------- too big for the next hop

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_request_too_big_for_the_backends_path_gets_fragmentation_needed() {
    with_lb(|lb| {
        lb.set_ring(1, 1, [3]);
        let sport = 40130;
        // 20 + 20 + 1400 bytes, over backend 3's 1400-byte path, DF set.
        let big = Tcp { syn: false, payload: &PAYLOAD, ..Tcp::client_to_vip(sport) }.build();
        let answer =
            icmp_error((GW_CLIENT_MAC, CLIENT_MAC), VIP, CLIENT, 64, frag_needed(NARROW_BACKEND_MTU), &quote(&big, 8));
        lb.assert_answered("df set", &big, &answer, reason::TX_ICMP_FRAG_NEEDED);
        // One that fits goes through, on the same flow.
        let fits = Tcp { syn: false, payload: &PAYLOAD[..1360], ..Tcp::client_to_vip(sport) }.build();
        let (v, out) = lb.run(&fits, lb.client_if);
        assert_eq!((v, sent_to(&out)), (XDP_REDIRECT, 3));
        // Without DF: rewritten and left to the kernel to fragment.
        let (baddr, bport) = backend_addr(3);
        let no_df = with_ip_flags(&big, 0);
        let (action, out, counted) = lb.run_counted(&no_df, lb.client_if);
        assert_eq!((action, counted), (XDP_PASS, "pass_too_big"));
        let rewritten =
            Tcp { dst: baddr, dport: bport, syn: false, payload: &PAYLOAD, ..Tcp::client_to_vip(sport) }.build();
        assert_frame(&out, &with_ip_flags(&rewritten, 0));
        assert_checksums_valid(&out);
    });
}

/// Issue 15, item 5: pings must not starve path MTU discovery. Each kind of
/// answer has its own budget, and when "fragmentation needed" runs out of
/// its own, the packet goes to the kernel (rewritten), never silently dropped.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn pings_do_not_starve_fragmentation_needed() {
    with_lb(|lb| {
        // One CPU, so every run meets the same per-CPU buckets.
        // SAFETY: a zeroed cpu_set_t is valid; affects only this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0, "sched_setaffinity");
        }
        lb.set_ring(1, 1, [3]);
        for host in 0..150u16 {
            let src = [198, 18, 1, 100 + (host % 100) as u8];
            let request =
                PacketBuilder::ethernet2(CLIENT_MAC, GW_CLIENT_MAC).ipv4(src, VIP, 64).icmpv4_echo_request(host, 1);
            let mut frame = Vec::new();
            request.write(&mut frame, b"ping").expect("echo request");
            lb.run(&frame, lb.client_if);
        }
        assert!(lb.verdict_count(reason::DROP_ICMP_ECHO_RATE_LIMITED) > 0, "150 pings did not reach the echo limit");
        for sport in 40150..40153 {
            let big = Tcp { syn: false, payload: &PAYLOAD, ..Tcp::client_to_vip(sport) }.build();
            let answer = icmp_error(
                (GW_CLIENT_MAC, CLIENT_MAC),
                VIP,
                CLIENT,
                64,
                frag_needed(NARROW_BACKEND_MTU),
                &quote(&big, 8),
            );
            lb.assert_answered("too big after a ping flood", &big, &answer, reason::TX_ICMP_FRAG_NEEDED);
        }
        // Past its own budget, the kernel gets it rewritten and answers it
        // itself. Plain runs, without reading counters, so the budget runs out
        // faster than it refills.
        let mut passed = 0;
        for sport in 41000..46000u16 {
            let big = Tcp { syn: false, payload: &PAYLOAD, ..Tcp::client_to_vip(sport) }.build();
            let (action, out) = lb.run(&big, lb.client_if);
            if action == XDP_PASS {
                assert_eq!(sent_to(&out), 3, "passed rewritten, to its backend");
                passed += 1;
                break;
            }
            assert_eq!(action, XDP_REDIRECT, "answered with fragmentation needed");
        }
        assert_eq!(lb.verdict_count(reason::PASS_FRAG_NEEDED_RATE_LIMITED), 1);
        assert_eq!(passed, 1, "fragmentation needed was never limited");
        assert_eq!(lb.verdict_count(reason::DROP_NO_BACKEND_RATE_LIMITED), 0);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_reply_too_big_for_the_clients_path_gets_fragmentation_needed_from_the_vip() {
    with_lb(|lb| {
        let sport = 40140;
        let syn = Tcp { src_mac: NARROW_CLIENT_MAC, src: NARROW_CLIENT, ..Tcp::client_to_vip(sport) };
        assert_eq!(lb.run(&syn.build(), lb.client_if).0, XDP_REDIRECT);
        assert_eq!(lb.run(&Tcp { syn: false, ..syn }.build(), lb.client_if).0, XDP_REDIRECT);
        let id = lb.maps.flow(&flow(NARROW_CLIENT, VIP, sport, VIP_TCP_PORT, PROTO_TCP)).expect("flow").backend_id;
        let (baddr, bport) = backend_addr(id);
        let reply = |len: usize| Tcp {
            src_mac: backend_mac(baddr[3]),
            dst_mac: GW_BACKEND_MAC,
            src: baddr,
            dst: NARROW_CLIENT,
            ttl: 64,
            sport: bport,
            dport: sport,
            syn: false,
            payload: &PAYLOAD[..len],
        };
        let big = reply(1300).build();
        let answer = icmp_error(
            (GW_BACKEND_MAC, backend_mac(baddr[3])),
            VIP,
            baddr,
            64,
            frag_needed(NARROW_CLIENT_MTU),
            &quote(&big, 8),
        );
        let (action, out, counted) = lb.run_counted(&big, lb.backend_if);
        assert_eq!((action, counted), (XDP_REDIRECT, "tx_icmp_frag_needed"));
        assert_frame(&out, &answer);
        assert_checksums_valid(&out);
        let fits = reply(1240).build();
        let (v, out) = lb.run(&fits, lb.backend_if);
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(&out[26..30], &VIP, "translated");
    });
}

/// Sets the IPv4 flags and fragment field of an untagged frame, with the
/// header checksum recomputed.
fn with_ip_flags(frame: &[u8], field: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[20..22].copy_from_slice(&field.to_be_bytes());
    let (mut header, _) = etherparse::Ipv4Header::from_slice(&f[14..]).expect("ipv4");
    header.header_checksum = header.calc_header_checksum();
    f[24..26].copy_from_slice(&header.header_checksum.to_be_bytes());
    f
}

/// The last byte of the destination address of an untagged IPv4 frame, as
/// a backend id of the TCP VIP (.11 → 1).
fn sent_to(out: &[u8]) -> u32 {
    u32::from(out[33]) - 10
}
