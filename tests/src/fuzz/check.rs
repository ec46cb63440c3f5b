//! The invariants every verdict keeps, judged independently of the
//! program: etherparse parses the frames, and every checksum is computed
//! from scratch.
//!
//! - The action is DROP, PASS, TX or REDIRECT: never ABORTED or another
//!   number.
//! - The verdict's reason agrees with the action: `drop_*` drops, `pass_*`
//!   passes, `redirect_*` and `tx_*` send.
//! - A passed frame leaves byte for byte unchanged, except under the
//!   reasons that hand the kernel a rewritten packet ([`REWRITING_PASSES`]:
//!   no neighbour yet, no route, too big), which must then be well formed.
//! - A malformed frame (etherparse refuses it) is passed unchanged or
//!   dropped, never sent on.
//! - A frame sent on (TX, REDIRECT, or a rewritten pass) parses, with
//!   consistent lengths, and its checksums are right if its input's were
//!   (checksums are updated, not verified: a bad one stays bad, also in
//!   the answers the gateway builds in place from a request, `tx_*`).
//!
//! The driver checks the rest against the maps (exactly one verdict
//! counter moved, and the connection table grew only by its rule).

use std::fmt;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// XDP actions (`enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
/// Drop the frame.
pub const XDP_DROP: u32 = 1;
/// Hand it to the kernel.
pub const XDP_PASS: u32 = 2;
/// Send it back out of the interface it came in on.
pub const XDP_TX: u32 = 3;
/// Send it out of another interface (or the same, by redirect).
pub const XDP_REDIRECT: u32 = 4;

/// Pass reasons under which the kernel gets the packet already rewritten
/// (README, "Data path rules").
pub const REWRITING_PASSES: [&str; 4] =
    ["pass_no_neigh", "pass_fib_failed", "pass_too_big", "pass_frag_needed_rate_limited"];

/// What an independent parser makes of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// Parses, and every checksum it can check is right.
    Valid,
    /// Parses, but this checksum is wrong.
    BadChecksum(String),
    /// Does not parse (lengths, header sizes): why.
    Malformed(String),
    /// Not IPv4 or IPv6 (ARP, three VLAN tags, ...).
    NotIp,
}

impl fmt::Display for Judged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Judged::Valid => write!(f, "valid"),
            Judged::BadChecksum(which) => write!(f, "bad {which} checksum"),
            Judged::Malformed(why) => write!(f, "malformed: {why}"),
            Judged::NotIp => write!(f, "not IP"),
        }
    }
}

/// Parses `frame` from its Ethernet header and checks its IPv4 header
/// checksum and its TCP, UDP, ICMP or ICMPv6 checksum (not for fragments:
/// their checksum covers the whole datagram).
#[must_use]
pub fn judge(frame: &[u8]) -> Judged {
    let sliced = match SlicedPacket::from_ethernet(frame) {
        Ok(s) => s,
        Err(e) => return Judged::Malformed(e.to_string()),
    };
    match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header().to_header();
            if header.header_checksum != header.calc_header_checksum() {
                return Judged::BadChecksum("IPv4 header".to_owned());
            }
            let l4 = match &sliced.transport {
                Some(TransportSlice::Tcp(tcp)) => tcp
                    .to_header()
                    .calc_checksum_ipv4(&header, tcp.payload())
                    .ok()
                    .map(|c| ("TCP", c == tcp.checksum())),
                Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => udp
                    .to_header()
                    .calc_checksum_ipv4(&header, udp.payload())
                    .ok()
                    .map(|c| ("UDP", c == udp.checksum())),
                Some(TransportSlice::Icmpv4(icmp)) => {
                    let c = etherparse::Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload()).checksum;
                    Some(("ICMP", c == icmp.checksum()))
                }
                _ => None,
            };
            verdict_of(l4)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header().to_header();
            let l4 = match &sliced.transport {
                Some(TransportSlice::Tcp(tcp)) => tcp
                    .to_header()
                    .calc_checksum_ipv6(&header, tcp.payload())
                    .ok()
                    .map(|c| ("TCP", c == tcp.checksum())),
                Some(TransportSlice::Udp(udp)) => udp
                    .to_header()
                    .calc_checksum_ipv6(&header, udp.payload())
                    .ok()
                    .map(|c| ("UDP", c == udp.checksum())),
                Some(TransportSlice::Icmpv6(icmp)) => icmp
                    .header()
                    .icmp_type
                    .calc_checksum(header.source, header.destination, icmp.payload())
                    .ok()
                    .map(|c| ("ICMPv6", c == icmp.checksum())),
                _ => None,
            };
            verdict_of(l4)
        }
        _ => Judged::NotIp,
    }
}

fn verdict_of(l4: Option<(&str, bool)>) -> Judged {
    match l4 {
        Some((which, false)) => Judged::BadChecksum(which.to_owned()),
        _ => Judged::Valid,
    }
}

/// Checks one run of the program: `input` became `output` with `action`,
/// counted as `reason`. Returns what is wrong.
///
/// # Errors
///
/// The first invariant (see the module docs) the run breaks.
pub fn check(input: &[u8], action: u32, output: &[u8], reason: &str) -> Result<(), String> {
    let expected_prefixes: &[&str] = match action {
        XDP_DROP => &["drop_"],
        XDP_PASS => &["pass_"],
        XDP_TX | XDP_REDIRECT => &["redirect_", "tx_"],
        XDP_ABORTED => return Err(format!("XDP_ABORTED (counted as {reason})")),
        other => return Err(format!("action {other} is no XDP action (counted as {reason})")),
    };
    if !expected_prefixes.iter().any(|p| reason.starts_with(p)) {
        return Err(format!("action {action} counted as {reason}"));
    }
    let rewritten = match action {
        XDP_DROP => return Ok(()),
        XDP_PASS if output == input => return Ok(()),
        XDP_PASS if !REWRITING_PASSES.contains(&reason) => {
            return Err(format!("passed as {reason} but changed"));
        }
        _ => output,
    };
    let before = judge(input);
    if let Judged::Malformed(why) = &before {
        return Err(format!("a malformed frame ({why}) was sent on as {reason}"));
    }
    if before == Judged::NotIp {
        return Err(format!("a frame that is not IP was sent on as {reason}"));
    }
    match judge(rewritten) {
        Judged::Valid => Ok(()),
        Judged::BadChecksum(which) if before == Judged::Valid => {
            Err(format!("a valid frame left as {reason} with a bad {which} checksum"))
        }
        Judged::BadChecksum(_) => Ok(()),
        after => Err(format!("the frame sent on as {reason} is {after}")),
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    fn segment(dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 1])
            .ipv4([198, 18, 1, 2], dst, 64)
            .tcp(40000, dport, 1, 100)
            .ack(1)
            .write(&mut out, b"data")
            .expect("build");
        out
    }

    #[test]
    fn a_correct_rewrite_passes() {
        let (input, output) = (segment([198, 18, 0, 100], 80), segment([198, 18, 2, 11], 8080));
        assert_eq!(check(&input, XDP_REDIRECT, &output, "redirect_to_backend"), Ok(()));
        assert_eq!(check(&input, XDP_PASS, &input, "pass_not_vip"), Ok(()));
        assert_eq!(check(&input, XDP_DROP, &[], "drop_no_service"), Ok(()));
    }

    /// The fuzzer can fail: a rewrite that forgot one checksum update, or
    /// the other invariants broken one by one.
    #[test]
    fn each_broken_invariant_is_caught() {
        let input = segment([198, 18, 0, 100], 80);
        let mut forgot_l4 = segment([198, 18, 2, 11], 8080);
        let (csum_at, port_at) = (14 + 20 + 16, 14 + 20 + 2);
        forgot_l4[csum_at..csum_at + 2].copy_from_slice(&input[csum_at..csum_at + 2]);
        forgot_l4[port_at..port_at + 2].copy_from_slice(&8080u16.to_be_bytes());
        let err = check(&input, XDP_REDIRECT, &forgot_l4, "redirect_to_backend").expect_err("a stale TCP checksum");
        assert!(err.contains("TCP checksum"), "{err}");
        let mut forgot_ip = segment([198, 18, 2, 11], 8080);
        forgot_ip[14 + 10..14 + 12].copy_from_slice(&input[14 + 10..14 + 12]);
        assert!(check(&input, XDP_REDIRECT, &forgot_ip, "redirect_to_backend").is_err(), "a stale IP checksum");
        assert!(check(&input, XDP_ABORTED, &input, "pass_not_vip").is_err(), "aborted");
        assert!(check(&input, XDP_DROP, &input, "pass_not_vip").is_err(), "a drop counted as a pass");
        let mut changed = input.clone();
        changed[20] ^= 1;
        assert!(check(&input, XDP_PASS, &changed, "pass_not_vip").is_err(), "a pass that changed the frame");
        let truncated = &input[..40];
        assert!(check(truncated, XDP_REDIRECT, truncated, "redirect_to_backend").is_err(), "a malformed frame sent on");
    }

    #[test]
    fn a_bad_checksum_may_stay_bad_but_never_appear() {
        let mut input = segment([198, 18, 0, 100], 80);
        let mut output = segment([198, 18, 2, 11], 8080);
        input[14 + 20 + 16] ^= 0xff;
        output[14 + 20 + 16] ^= 0xff;
        assert!(matches!(judge(&input), Judged::BadChecksum(_)));
        assert_eq!(check(&input, XDP_REDIRECT, &output, "redirect_to_backend"), Ok(()));
        let valid = segment([198, 18, 0, 100], 80);
        assert!(check(&valid, XDP_TX, &output, "tx_rst_no_backend").is_err(), "a bad checksum out of a good one");
    }
}
