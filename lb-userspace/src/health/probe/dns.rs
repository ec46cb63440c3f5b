//! `type = "dns"`: one query over UDP, for a UDP VIP serving DNS. Healthy
//! when the answer to our query (same id, same question) has rcode NOERROR
//! and, with `expect_answer`, at least one record of the type asked for.
//!
//! The socket is connected to the backend, so the kernel drops datagrams
//! from anyone else, and a port unreachable fails the probe at once
//! ("read response: Connection refused"). Datagrams that are not the answer
//! to this query (another id or question) are ignored until the timeout.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU16, Ordering},
};

use tokio::net::UdpSocket;

use super::{ProbeFailure, classify, excerpt};
use crate::config::model::{DnsCheck, DnsType};

/// The classic DNS message limit over UDP without EDNS; the query asks for
/// no more, and a longer datagram is cut to this and still read.
const MAX_MESSAGE: usize = 512;
/// Header: id, flags, and four counts, two bytes each.
const HEADER_LEN: usize = 12;
/// Flags of the query: recursion desired, so a resolver answers as it
/// would for a client; an authoritative server ignores it.
const FLAG_RD: u16 = 0x0100;
const FLAG_QR: u16 = 0x8000;
const CLASS_IN: u16 = 1;

/// Queries `address` and judges the answer.
///
/// # Errors
/// [`ProbeFailure::Rcode`], [`ProbeFailure::NoAnswer`], a malformed answer,
/// an I/O error, or [`ProbeFailure::Local`] when no socket could be made.
pub async fn probe(address: SocketAddr, check: &DnsCheck) -> Result<(), ProbeFailure> {
    let id = next_id();
    let query = query(id, &check.name, check.qtype);
    let unspecified: SocketAddr =
        if address.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(unspecified).await.map_err(|error| classify("socket", error))?;
    socket.connect(address).await.map_err(|error| classify("connect", error))?;
    socket.send(&query).await.map_err(ProbeFailure::Send)?;
    let mut buf = [0; MAX_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await.map_err(ProbeFailure::Receive)?;
        if let Some(verdict) = judge(&buf[..len], id, &query[HEADER_LEN..], check) {
            return verdict;
        }
    }
}

/// A query id: a counter started from the clock, so that concurrent probes
/// and restarts do not repeat each other's ids.
fn next_id() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    NEXT.fetch_add(1, Ordering::Relaxed) ^ (clock as u16)
}

/// The query message: header, then one question (`name`, `qtype`, IN).
/// `name` was checked by the config (labels of 1 to 63 bytes, 253 in all).
#[must_use]
pub fn query(id: u16, name: &str, qtype: DnsType) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    for word in [id, FLAG_RD, 1, 0, 0, 0] {
        message.extend_from_slice(&word.to_be_bytes());
    }
    for label in name.split('.').filter(|label| !label.is_empty()) {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&qtype.0.to_be_bytes());
    message.extend_from_slice(&CLASS_IN.to_be_bytes());
    message
}

/// The verdict on `message`, or `None` when it is not the answer to the
/// query `id` with the encoded `question` (then the probe waits on).
fn judge(message: &[u8], id: u16, question: &[u8], check: &DnsCheck) -> Option<Result<(), ProbeFailure>> {
    let malformed = |what: &str| Some(Err(ProbeFailure::Malformed(format!("{what}: {}", excerpt(message)))));
    let word = |at: usize| message.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (Some(got_id), Some(flags), Some(qdcount), Some(ancount)) = (word(0), word(2), word(4), word(6)) else {
        return None;
    };
    if got_id != id || flags & FLAG_QR == 0 {
        return None;
    }
    let echoed = message.get(HEADER_LEN..HEADER_LEN + question.len());
    if qdcount != 1 || !echoed.is_some_and(|echoed| echoed.eq_ignore_ascii_case(question)) {
        return malformed("an answer with our id that does not repeat our question");
    }
    let rcode = (flags & 0x000f) as u8;
    if rcode != 0 {
        return Some(Err(ProbeFailure::Rcode(rcode)));
    }
    if !check.expect_answer {
        return Some(Ok(()));
    }
    match count_answers(message, HEADER_LEN + question.len(), ancount, check.qtype) {
        Some(0) => Some(Err(ProbeFailure::NoAnswer(check.qtype, ancount))),
        Some(_) => Some(Ok(())),
        None => malformed("an answer section that does not parse"),
    }
}

/// How many of the `ancount` records from `at` are of type `qtype`; `None`
/// when the section runs past the message.
fn count_answers(message: &[u8], mut at: usize, ancount: u16, qtype: DnsType) -> Option<usize> {
    let mut found = 0;
    for _ in 0..ancount {
        at = skip_name(message, at)?;
        let fixed = message.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdlength = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        at += 10 + rdlength;
        if at > message.len() {
            return None;
        }
        if rtype == qtype.0 {
            found += 1;
        }
    }
    Some(found)
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    // A name has at most 127 labels; a longer walk is a malformed message.
    for _ in 0..128 {
        let len = *message.get(at)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => at += 1 + usize::from(len),
            // A compression pointer ends the name where it stands.
            0xc0 => return message.get(at + 1).map(|_| at + 2),
            _ => return None,
        }
    }
    None
}

/// An rcode's name (RFC 1035 4.1.1, RFC 2136).
#[must_use]
pub fn rcode_name(rcode: u8) -> String {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        other => return format!("{other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{config::model::HealthCheckKind, health::probe::run};

    const A: DnsType = DnsType(1);
    const AAAA: DnsType = DnsType(28);

    fn check(expect_answer: bool) -> DnsCheck {
        DnsCheck { name: "health.lb.test".to_owned(), qtype: A, expect_answer }
    }

    /// The answer to `query` with `rcode` and, per entry of `answers`, one
    /// record of that type (owner written as a pointer to the question).
    fn answer(query: &[u8], rcode: u16, answers: &[DnsType]) -> Vec<u8> {
        let mut message = query.to_vec();
        message[2..4].copy_from_slice(&(FLAG_QR | FLAG_RD | 0x0080 | rcode).to_be_bytes());
        message[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for rtype in answers {
            message.extend_from_slice(&[0xc0, 12]);
            message.extend_from_slice(&rtype.0.to_be_bytes());
            message.extend_from_slice(&CLASS_IN.to_be_bytes());
            message.extend_from_slice(&60_u32.to_be_bytes());
            let rdata: &[u8] = if *rtype == AAAA {
                &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
            } else {
                &[198, 18, 0, 1]
            };
            message.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            message.extend_from_slice(rdata);
        }
        message
    }

    fn verdict(message: &[u8], check: &DnsCheck) -> Option<Result<(), ProbeFailure>> {
        let query = query(7, &check.name, check.qtype);
        judge(message, 7, &query[HEADER_LEN..], check)
    }

    #[test]
    fn the_query_encodes_the_name_as_labels() {
        let message = query(0x1234, "health.lb.test", A);
        assert_eq!(&message[..HEADER_LEN], &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&message[HEADER_LEN..], b"\x06health\x02lb\x04test\x00\x00\x01\x00\x01");
        assert_eq!(&query(1, "", DnsType(2))[HEADER_LEN..], b"\x00\x00\x02\x00\x01", "the root");
    }

    #[test]
    fn answers_are_judged() {
        let q = query(7, "health.lb.test", A);
        assert!(matches!(verdict(&answer(&q, 0, &[A]), &check(true)), Some(Ok(()))));
        assert!(matches!(verdict(&answer(&q, 0, &[DnsType(5), A]), &check(true)), Some(Ok(()))), "CNAME then A");
        let no_data = verdict(&answer(&q, 0, &[]), &check(true)).expect("judged").expect_err("no A");
        assert_eq!(no_data.to_string(), "DNS answer has no A record (0 records in it)");
        assert!(matches!(verdict(&answer(&q, 0, &[]), &check(false)), Some(Ok(()))), "NOERROR is enough");
        let wrong = verdict(&answer(&q, 0, &[AAAA]), &check(true)).expect("judged").expect_err("AAAA only");
        assert_eq!(wrong.to_string(), "DNS answer has no A record (1 records in it)");
        let nx = verdict(&answer(&q, 3, &[]), &check(false)).expect("judged").expect_err("NXDOMAIN");
        assert_eq!(nx.to_string(), "DNS rcode NXDOMAIN, expected NOERROR");
    }

    #[test]
    fn other_messages_are_ignored_or_malformed() {
        let q = query(7, "health.lb.test", A);
        let mut other_id = answer(&q, 0, &[A]);
        other_id[1] = 8;
        assert!(verdict(&other_id, &check(true)).is_none(), "another query's answer");
        assert!(verdict(&q, &check(true)).is_none(), "our own query echoed (QR unset)");
        assert!(verdict(&[0, 7], &check(true)).is_none(), "a runt");
        let other_question = answer(&query(7, "other.lb.test", A), 0, &[A]);
        assert!(matches!(verdict(&other_question, &check(true)), Some(Err(ProbeFailure::Malformed(_)))));
        let mut cut = answer(&q, 0, &[A]);
        cut.truncate(cut.len() - 2);
        assert!(matches!(verdict(&cut, &check(true)), Some(Err(ProbeFailure::Malformed(_)))));
    }

    #[test]
    fn a_pointer_loop_does_not_hang() {
        let mut message = vec![0; HEADER_LEN];
        message.extend_from_slice(&[1, b'a'].repeat(200));
        assert_eq!(skip_name(&message, HEADER_LEN), None);
    }

    /// A responder on loopback answering each query with `rcode` and one A record.
    async fn responder(rcode: u16) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let address = socket.local_addr().expect("local_addr");
        tokio::spawn(async move {
            let mut buf = [0; MAX_MESSAGE];
            while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
                // First a stray datagram the probe must skip, then the answer.
                let _ = socket.send_to(b"junk", peer).await;
                let _ = socket.send_to(&answer(&buf[..len], rcode, &[A]), peer).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn a_responder_on_loopback_is_healthy_then_not() {
        let kind = HealthCheckKind::Dns(check(true));
        let healthy = run(responder(0).await, &kind, Duration::from_secs(2)).await;
        assert!(healthy.is_ok(), "{healthy:?}");
        let failing = run(responder(2).await, &kind, Duration::from_secs(2)).await.expect_err("SERVFAIL");
        assert_eq!(failing.to_string(), "DNS rcode SERVFAIL, expected NOERROR");
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_at_once() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let address = socket.local_addr().expect("local_addr");
        drop(socket);
        let error = run(address, &HealthCheckKind::Dns(check(true)), Duration::from_secs(2)).await.expect_err("closed");
        assert!(error.to_string().starts_with("read response: Connection refused"), "{error}");
    }
}
