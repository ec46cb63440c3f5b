//! ICMPv6 packet fixtures through BPF_PROG_TEST_RUN: echo replies for VIP
//! addresses, the no-backend answers (RST, port unreachable), packet too big
//! for packets over the next hop's MTU, and ICMPv6 errors about balanced
//! flows steered to the backend or reverse-translated to the client.
//! Expected frames are built with etherparse from scratch, so byte equality
//! checks every checksum (ICMPv6's covers the outer addresses); quoted
//! TCP/UDP checksums are also checked on their own when the whole segment
//! is quoted. The harness is in `v6/mod.rs`. Needs root.

mod v6;

use etherparse::{
    Icmpv6Type, Ipv6HeaderSlice, PacketBuilder, SlicedPacket, TcpHeaderSlice, TransportSlice, UdpHeaderSlice,
    icmpv6::{DestUnreachableCode, TimeExceededCode},
};
use lb_common::{PROTO_TCP, PROTO_UDP, stats::reason};
use v6::*;

const CLIENT_ROUTER: [u8; 16] = addr(1, 0xfe);
const CLIENT_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];
const BACKEND_ROUTER: [u8; 16] = addr(2, 0xfe);
const BACKEND_ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0xfe];

static PAYLOAD: [u8; 1400] = [0x5a; 1400];

fn packet_too_big(mtu: u32) -> Icmpv6Type {
    Icmpv6Type::PacketTooBig { mtu }
}

fn port_unreachable() -> Icmpv6Type {
    Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
}

fn icmp6(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 16],
    dst: [u8; 16],
    hop_limit: u8,
    kind: Icmpv6Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src, dst, hop_limit)
        .icmpv6(kind)
        .write(&mut out, quote)
        .expect("build icmpv6");
    out
}

/// The IPv6 header of an untagged frame and `extra` bytes after it.
fn quote(frame: &[u8], extra: usize) -> Vec<u8> {
    frame[14..(14 + 40 + extra).min(frame.len())].to_vec()
}

/// Checks the quoted TCP/UDP checksum from scratch when the whole segment
/// is quoted.
fn assert_quote_checksum_valid(frame: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(TransportSlice::Icmpv6(icmp)) = sliced.transport else { panic!("output is not ICMPv6") };
    let quoted = icmp.payload();
    let ip = Ipv6HeaderSlice::from_slice(quoted).expect("quoted IPv6 header").to_header();
    let segment = &quoted[40..];
    if usize::from(ip.payload_length) != segment.len() {
        return;
    }
    match ip.next_header.0 {
        PROTO_TCP => {
            let tcp = TcpHeaderSlice::from_slice(segment).expect("quoted tcp").to_header();
            let payload = &segment[tcp.header_len()..];
            assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&ip, payload).expect("csum"), "quoted TCP checksum");
        }
        PROTO_UDP => {
            let udp = UdpHeaderSlice::from_slice(segment).expect("quoted udp").to_header();
            assert_eq!(udp.checksum, udp.calc_checksum_ipv6(&ip, &segment[8..]).expect("csum"), "quoted UDP checksum");
        }
        other => panic!("quoted next header {other}"),
    }
}

impl Lb {
    /// Runs `frame` in on `ingress`: its action, bytes as `expected`, all
    /// checksums valid, counted once as `expected_reason`.
    #[track_caller]
    fn assert_out(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress: u32,
        action: u32,
        expected: &[u8],
        expected_reason: u32,
    ) {
        let (got, out, counted) = self.run_counted(frame, ingress);
        assert_eq!((got, counted), (action, reason::NAMES[expected_reason as usize]), "{name}");
        assert_frame(&out, expected);
        assert_checksums_valid(&out);
        if matches!(SlicedPacket::from_ethernet(&out).map(|s| s.transport), Ok(Some(TransportSlice::Icmpv6(_))))
            && expected_reason != reason::TX_ICMP_ECHO_REPLY
        {
            assert_quote_checksum_valid(&out);
        }
    }

    fn open_tcp(&mut self, sport: u16) -> u32 {
        assert_eq!(self.run(&Tcp::client_to_vip(sport).build(), self.client_if).0, XDP_REDIRECT, "syn");
        assert_eq!(self.ack(sport).0, XDP_REDIRECT, "ack");
        self.expected_backend(sport)
    }

    fn open_udp(&mut self, sport: u16) -> u32 {
        let req = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, sport, VIP_UDP_PORT, b"query");
        assert_eq!(self.run(&req, self.client_if).0, XDP_REDIRECT, "udp");
        self.maps.flow(&flow(CLIENT, VIP, sport, VIP_UDP_PORT, PROTO_UDP)).expect("udp flow").backend_id
    }
}

fn tcp_reply(src: [u8; 16], sport: u16, dport: u16, payload: &'static [u8]) -> Tcp {
    Tcp {
        src_mac: GW_CLIENT_MAC,
        dst_mac: CLIENT_MAC,
        src,
        dst: CLIENT,
        hop_limit: 63,
        sport,
        dport,
        syn: false,
        payload,
    }
}

// ---------------------------------------------------------------- the gateway's own answers

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_echo_to_a_vip_address_is_answered() {
    with_lb(|lb| {
        let mut reply = Vec::new();
        PacketBuilder::ethernet2(GW_CLIENT_MAC, CLIENT_MAC)
            .ipv6(VIP, CLIENT, 64)
            .icmpv6_echo_reply(7, 1)
            .write(&mut reply, b"ping")
            .expect("build reply");
        lb.assert_out("echo", &ping(VIP), lb.client_if, XDP_REDIRECT, &reply, reason::TX_ICMP_ECHO_REPLY);
        let mut short = ping(VIP)[..14 + 40 + 4].to_vec();
        short[18..20].copy_from_slice(&4u16.to_be_bytes());
        // Not routed on from a VIP address (issue 15, item 4).
        let client_if = lb.client_if;
        lb.assert_dropped("icmpv6 shorter than its header", &short, client_if, reason::DROP_NO_SERVICE);
        let mut echo_reply = ping(VIP);
        echo_reply[14 + 40] = 129;
        lb.assert_dropped("an echo reply to the VIP address", &echo_reply, client_if, reason::DROP_NO_SERVICE);
    });
}

/// Regression (found by `cargo xtask fuzz`, issue 12): the reply's checksum
/// was updated as if the request's code were 0, so a request with another
/// code got a reply its receiver dropped.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_echo_with_a_nonzero_code_gets_a_reply_with_a_right_checksum() {
    with_lb(|lb| {
        let mut request = ping(VIP);
        let (code_at, csum_at) = (14 + 40 + 1, 14 + 40 + 2);
        request[code_at] = 5;
        // RFC 1624: the checksum of a request whose code word grew by 5.
        let old = u16::from_be_bytes([request[csum_at], request[csum_at + 1]]);
        let mut sum = u32::from(!old) + u32::from(!0x8000u16) + 0x8005;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        request[csum_at..csum_at + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let mut reply = Vec::new();
        PacketBuilder::ethernet2(GW_CLIENT_MAC, CLIENT_MAC)
            .ipv6(VIP, CLIENT, 64)
            .icmpv6_echo_reply(7, 1)
            .write(&mut reply, b"ping")
            .expect("build reply");
        lb.assert_out("echo with code 5", &request, lb.client_if, XDP_REDIRECT, &reply, reason::TX_ICMP_ECHO_REPLY);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_with_no_backend_up_tcp_gets_a_rst_and_udp_port_unreachable() {
    with_lb(|lb| {
        lb.set_ring(1, 1, []);
        lb.set_ring(2, 1, []);
        let mut rst = Vec::new();
        PacketBuilder::ethernet2(GW_CLIENT_MAC, CLIENT_MAC)
            .ipv6(VIP, CLIENT, 64)
            .tcp(VIP_TCP_PORT, 40200, 0, 0)
            .rst()
            .ack(1001)
            .write(&mut rst, b"")
            .expect("build rst");
        lb.assert_out(
            "syn",
            &Tcp::client_to_vip(40200).build(),
            lb.client_if,
            XDP_REDIRECT,
            &rst,
            reason::TX_RST_NO_BACKEND,
        );
        let req = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, VIP, 64, 50200, VIP_UDP_PORT, b"a query of some length");
        let answer = icmp6((GW_CLIENT_MAC, CLIENT_MAC), VIP, CLIENT, 64, port_unreachable(), &quote(&req, 8));
        lb.assert_out("udp", &req, lb.client_if, XDP_REDIRECT, &answer, reason::TX_ICMP_UNREACHABLE_NO_BACKEND);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_packets_too_big_for_the_next_hop_get_packet_too_big() {
    with_lb(|lb| {
        lb.set_ring(1, 1, [3]);
        let big = Tcp { syn: false, payload: &PAYLOAD, ..Tcp::client_to_vip(40210) }.build();
        let answer = icmp6(
            (GW_CLIENT_MAC, CLIENT_MAC),
            VIP,
            CLIENT,
            64,
            packet_too_big(NARROW_BACKEND_MTU.into()),
            &quote(&big, 8),
        );
        lb.assert_out(
            "request over the backend's path",
            &big,
            lb.client_if,
            XDP_REDIRECT,
            &answer,
            reason::TX_ICMP_FRAG_NEEDED,
        );
        let fits = Tcp { syn: false, payload: &PAYLOAD[..1340], ..Tcp::client_to_vip(40210) }.build();
        assert_eq!(lb.run(&fits, lb.client_if).0, XDP_REDIRECT);

        let sport = 40211;
        let syn = Tcp { src_mac: NARROW_CLIENT_MAC, src: NARROW_CLIENT, ..Tcp::client_to_vip(sport) }.build();
        assert_eq!(lb.run(&syn, lb.client_if).0, XDP_REDIRECT);
        let (baddr, bport) = backend_addr(3);
        let reply = |len: usize| {
            Tcp {
                src_mac: backend_mac(baddr[15]),
                dst_mac: GW_BACKEND_MAC,
                src: baddr,
                dst: NARROW_CLIENT,
                hop_limit: 64,
                sport: bport,
                dport: sport,
                syn: false,
                payload: &PAYLOAD[..len],
            }
            .build()
        };
        let big = reply(1300);
        let answer = icmp6(
            (GW_BACKEND_MAC, backend_mac(baddr[15])),
            VIP,
            baddr,
            64,
            packet_too_big(NARROW_CLIENT_MTU.into()),
            &quote(&big, 8),
        );
        lb.assert_out(
            "reply over the client's path",
            &big,
            lb.backend_if,
            XDP_REDIRECT,
            &answer,
            reason::TX_ICMP_FRAG_NEEDED,
        );
        assert_eq!(lb.run(&reply(1220), lb.backend_if).0, XDP_REDIRECT);
    });
}

// ---------------------------------------------------------------- errors of balanced flows

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_packet_too_big_for_a_reply_is_steered_to_the_flows_backend() {
    with_lb(|lb| {
        let sport = 40220;
        let id = lb.open_tcp(sport);
        let (baddr, bport) = backend_addr(id);
        let to_backend = (GW_BACKEND_MAC, backend_mac(baddr[15]));
        let on_wire = tcp_reply(VIP, VIP_TCP_PORT, sport, &PAYLOAD[..1300]).build();
        let as_sent = tcp_reply(baddr, bport, sport, &PAYLOAD[..1300]).build();
        for extra in [8, 20, 1000] {
            let err = icmp6(
                (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
                CLIENT_ROUTER,
                VIP,
                64,
                packet_too_big(1280),
                &quote(&on_wire, extra),
            );
            let expected = icmp6(to_backend, CLIENT_ROUTER, baddr, 63, packet_too_big(1280), &quote(&as_sent, extra));
            lb.assert_out(
                &format!("quote + {extra}"),
                &err,
                lb.client_if,
                XDP_REDIRECT,
                &expected,
                reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
            );
        }
        let short_on_wire = tcp_reply(VIP, VIP_TCP_PORT, sport, b"HTTP/1.1 200 OK\r\n").build();
        let short_as_sent = tcp_reply(baddr, bport, sport, b"HTTP/1.1 200 OK\r\n").build();
        let err = icmp6(
            (CLIENT_ROUTER_MAC, GW_CLIENT_MAC),
            CLIENT_ROUTER,
            VIP,
            64,
            packet_too_big(1280),
            &quote(&short_on_wire, 1000),
        );
        let expected = icmp6(to_backend, CLIENT_ROUTER, baddr, 63, packet_too_big(1280), &quote(&short_as_sent, 1000));
        lb.assert_out(
            "whole segment quoted",
            &err,
            lb.client_if,
            XDP_REDIRECT,
            &expected,
            reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
        );
        let exceeded = Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded);
        let err = icmp6((CLIENT_ROUTER_MAC, GW_CLIENT_MAC), CLIENT_ROUTER, VIP, 64, exceeded, &quote(&on_wire, 8));
        let expected = icmp6(to_backend, CLIENT_ROUTER, baddr, 63, exceeded, &quote(&as_sent, 8));
        lb.assert_out(
            "time exceeded",
            &err,
            lb.client_if,
            XDP_REDIRECT,
            &expected,
            reason::REDIRECT_ICMP_ERROR_TO_BACKEND,
        );
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_port_unreachable_from_a_backend_reaches_the_client_from_the_vip() {
    with_lb(|lb| {
        let sport = 50220;
        let id = lb.open_udp(sport);
        let (baddr, bport) = backend_addr(id);
        let received = udp(GW_BACKEND_MAC, backend_mac(baddr[15]), CLIENT, baddr, 63, sport, bport, b"query");
        let sent = udp(GW_BACKEND_MAC, backend_mac(baddr[15]), CLIENT, VIP, 63, sport, VIP_UDP_PORT, b"query");
        for extra in [8, 1000] {
            let err = icmp6(
                (backend_mac(baddr[15]), GW_BACKEND_MAC),
                baddr,
                CLIENT,
                64,
                port_unreachable(),
                &quote(&received, extra),
            );
            let expected =
                icmp6((GW_CLIENT_MAC, CLIENT_MAC), VIP, CLIENT, 63, port_unreachable(), &quote(&sent, extra));
            lb.assert_out(
                &format!("quote + {extra}"),
                &err,
                lb.backend_if,
                XDP_REDIRECT,
                &expected,
                reason::REDIRECT_ICMP_ERROR_TO_CLIENT,
            );
        }
        // Passive health counts each: the backend did not take the datagram.
        assert_eq!(lb.maps.handshakes(id).expect("handshakes").unreachables, 2);
        // From a router on the backends' side: its own address stays.
        let tcp_sport = 40230;
        let tid = lb.open_tcp(tcp_sport);
        let (taddr, tport) = backend_addr(tid);
        let received = Tcp { dst: taddr, dport: tport, hop_limit: 63, ..Tcp::client_to_vip(tcp_sport) }.build();
        let sent = Tcp { hop_limit: 63, ..Tcp::client_to_vip(tcp_sport) }.build();
        let err = icmp6(
            (BACKEND_ROUTER_MAC, GW_BACKEND_MAC),
            BACKEND_ROUTER,
            CLIENT,
            64,
            packet_too_big(1280),
            &quote(&received, 8),
        );
        let expected =
            icmp6((GW_CLIENT_MAC, CLIENT_MAC), BACKEND_ROUTER, CLIENT, 63, packet_too_big(1280), &quote(&sent, 8));
        lb.assert_out(
            "from a router",
            &err,
            lb.backend_if,
            XDP_REDIRECT,
            &expected,
            reason::REDIRECT_ICMP_ERROR_TO_CLIENT,
        );
        // Packet too big about TCP: not counted.
        assert_eq!(lb.maps.handshakes(tid).expect("handshakes").unreachables, 0);
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_errors_naming_no_balanced_flow_are_dropped_at_a_vip_and_pass_elsewhere() {
    with_lb(|lb| {
        let on_wire = tcp_reply(VIP, VIP_TCP_PORT, 40240, b"x").build();
        let err = |q: &[u8]| icmp6((CLIENT_ROUTER_MAC, GW_CLIENT_MAC), CLIENT_ROUTER, VIP, 64, packet_too_big(1280), q);
        let (action, _, counted) = lb.run_counted(&err(&quote(&on_wire, 8)), lb.client_if);
        assert_eq!((action, counted), (XDP_DROP, "drop_icmp_error_no_flow"), "unknown flow");
        lb.open_tcp(40240);
        let (action, _, counted) = lb.run_counted(&err(&quote(&on_wire, 4)), lb.client_if);
        assert_eq!((action, counted), (XDP_DROP, "drop_icmp_error_no_flow"), "quote too short");
        let routed = udp(CLIENT_MAC, GW_CLIENT_MAC, CLIENT, addr(2, 0x50), 63, 1234, 53, b"q");
        let other = icmp6(
            (BACKEND_ROUTER_MAC, GW_BACKEND_MAC),
            BACKEND_ROUTER,
            CLIENT,
            64,
            port_unreachable(),
            &quote(&routed, 8),
        );
        let (action, out, counted) = lb.run_counted(&other, lb.backend_if);
        assert_eq!((action, counted), (XDP_PASS, "pass_not_vip"), "other traffic");
        assert_frame(&out, &other);
    });
}
