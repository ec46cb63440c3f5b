//! Mutations of a frame's bytes, each named in [`Case::what`], and making
//! its checksums right again afterwards.

use super::{Case, Rng};

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const TPIDS: [u16; 2] = [0x8100, 0x88a8];
/// The shortest frame a test run takes: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Applies one random mutation to `case`, and names it in `case.what`.
pub fn apply(rng: &mut Rng, case: &mut Case) {
    let f = &mut case.frame;
    let name = match rng.below(14) {
        0 | 1 => truncate(rng, f),
        2 => ip_length(rng, f),
        3 => ihl(rng, f),
        4 => ipv4_options(rng, f),
        5 => tcp_data_offset(rng, f),
        6 => vlan_tags(rng, f),
        7 => fragment(rng, f),
        8 => ipv6_extension(rng, f),
        9 => quote(rng, f),
        10 => flip(rng, f),
        11 => ttl(rng, f),
        12 => udp_length(rng, f),
        _ => protocol(rng, f),
    };
    case.what.push_str(" | ");
    case.what.push_str(&name);
}

/// Where the IP header starts (after the MACs and any VLAN tags) and its
/// EtherType.
#[must_use]
pub fn l3(frame: &[u8]) -> Option<(usize, u16)> {
    let mut at = 12;
    loop {
        let ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        if TPIDS.contains(&ethertype) {
            at += 4;
        } else {
            return Some((at + 2, ethertype));
        }
    }
}

/// The IPv4 header's offset and length in bytes, if the frame holds one.
fn ipv4(frame: &[u8]) -> Option<(usize, usize)> {
    let (at, ethertype) = l3(frame)?;
    (ethertype == ETH_IPV4 && frame.len() >= at + 20).then(|| (at, usize::from(frame[at] & 0x0f) * 4))
}

/// The IPv6 header's offset, if the frame holds one.
fn ipv6(frame: &[u8]) -> Option<usize> {
    let (at, ethertype) = l3(frame)?;
    (ethertype == ETH_IPV6 && frame.len() >= at + 40).then_some(at)
}

/// The transport header's offset and protocol, when it directly follows
/// the IP header.
fn l4(frame: &[u8]) -> Option<(usize, u8)> {
    if let Some((at, ihl)) = ipv4(frame) {
        return (ihl >= 20).then(|| (at + ihl, frame[at + 9]));
    }
    ipv6(frame).map(|at| (at + 40, frame[at + 6]))
}

fn set_u16(frame: &mut [u8], at: usize, v: u16) {
    if let Some(b) = frame.get_mut(at..at + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

fn get_u16(frame: &[u8], at: usize) -> u16 {
    frame.get(at..at + 2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// Adds `delta` bytes to the IP length field (IPv4 total, IPv6 payload).
fn grow_ip_length(frame: &mut [u8], delta: usize) {
    if let Some((at, _)) = ipv4(frame) {
        let v = get_u16(frame, at + 2).wrapping_add(delta as u16);
        set_u16(frame, at + 2, v);
    } else if let Some(at) = ipv6(frame) {
        let v = get_u16(frame, at + 4).wrapping_add(delta as u16);
        set_u16(frame, at + 4, v);
    }
}

/// Cuts the frame at any offset from the end of the Ethernet header on
/// (BPF_PROG_TEST_RUN refuses XDP frames shorter than that, and no driver
/// delivers one).
fn truncate(rng: &mut Rng, f: &mut Vec<u8>) -> String {
    if f.len() <= MIN_FRAME {
        return "truncate (short)".to_owned();
    }
    let at = MIN_FRAME + rng.below(f.len() - MIN_FRAME);
    f.truncate(at);
    format!("truncate at {at}")
}

fn ip_length(rng: &mut Rng, f: &mut [u8]) -> String {
    let v = if rng.chance(50) {
        rng.next_u64() as u16
    } else {
        (f.len() as u16).wrapping_add(rng.below(9) as u16).wrapping_sub(4)
    };
    if let Some((at, _)) = ipv4(f) {
        set_u16(f, at + 2, v);
        format!("ipv4 total length {v}")
    } else if let Some(at) = ipv6(f) {
        set_u16(f, at + 4, v);
        format!("ipv6 payload length {v}")
    } else {
        "ip length (no ip)".to_owned()
    }
}

fn ihl(rng: &mut Rng, f: &mut [u8]) -> String {
    let Some((at, _)) = ipv4(f) else { return "ihl (no ipv4)".to_owned() };
    let v = rng.below(16) as u8;
    f[at] = 0x40 | v;
    format!("ihl {v}")
}

/// Inserts 4 to 40 bytes of options (NOPs, an end, a record route, or
/// noise) and fixes IHL and the total length.
fn ipv4_options(rng: &mut Rng, f: &mut Vec<u8>) -> String {
    let Some((at, ihl)) = ipv4(f) else { return "ipv4 options (no ipv4)".to_owned() };
    if ihl != 20 || f.len() < at + 20 {
        return "ipv4 options (has some)".to_owned();
    }
    let words = 1 + rng.below(10);
    let options: Vec<u8> = match rng.below(3) {
        0 => vec![1; words * 4],
        1 => {
            let mut o = vec![7, (words * 4 - 1).min(39) as u8, 4];
            o.resize(words * 4, 0);
            o
        }
        _ => (0..words * 4).map(|_| rng.byte()).collect(),
    };
    f.splice(at + 20..at + 20, options);
    f[at] = 0x40 | (5 + words) as u8;
    grow_ip_length(f, words * 4);
    format!("ipv4 options {} bytes", words * 4)
}

fn tcp_data_offset(rng: &mut Rng, f: &mut [u8]) -> String {
    match l4(f) {
        Some((at, 6)) if f.len() > at + 12 => {
            let v = rng.below(16) as u8;
            f[at + 12] = (v << 4) | (f[at + 12] & 0x0f);
            format!("tcp data offset {v}")
        }
        _ => "tcp data offset (no tcp)".to_owned(),
    }
}

/// One to three tags (802.1Q or 802.1ad) after the MACs.
fn vlan_tags(rng: &mut Rng, f: &mut Vec<u8>) -> String {
    if f.len() < 14 {
        return "vlan (short)".to_owned();
    }
    let n = 1 + rng.below(3);
    for _ in 0..n {
        let tpid = *rng.pick(&TPIDS);
        let vid = rng.below(4095) as u16 + 1;
        let mut tag = tpid.to_be_bytes().to_vec();
        tag.extend_from_slice(&vid.to_be_bytes());
        f.splice(12..12, tag);
    }
    format!("{n} vlan tags")
}

/// IPv4: MF and an offset (first, middle or last piece); IPv6: a
/// fragment header.
fn fragment(rng: &mut Rng, f: &mut Vec<u8>) -> String {
    if let Some((at, _)) = ipv4(f) {
        let offset = if rng.chance(40) { 0 } else { rng.below(0x2000) as u16 };
        let mf = if offset == 0 || rng.chance(50) { 0x2000 } else { 0 };
        set_u16(f, at + 6, mf | offset);
        return format!("ipv4 fragment offset {offset} mf {}", mf != 0);
    }
    insert_ipv6_extension(rng, f, 44)
}

fn ipv6_extension(rng: &mut Rng, f: &mut Vec<u8>) -> String {
    let kind = *rng.pick(&[0u8, 43, 44, 60]);
    insert_ipv6_extension(rng, f, kind)
}

/// Inserts an extension header of type `kind` right after the IPv6
/// header, chained in, lengths fixed.
fn insert_ipv6_extension(rng: &mut Rng, f: &mut Vec<u8>, kind: u8) -> String {
    let Some(at) = ipv6(f) else { return format!("ipv6 extension {kind} (no ipv6)") };
    let next = f[at + 6];
    let mut ext = vec![next, 0, 0, 0, 0, 0, 0, 0];
    if kind == 44 {
        let offset = if rng.chance(50) { 0 } else { rng.below(0x2000) as u16 };
        ext[2..4].copy_from_slice(&((offset << 3) | u16::from(rng.chance(50))).to_be_bytes());
        ext[4..8].copy_from_slice(&(rng.next_u64() as u32).to_be_bytes());
    } else if kind == 0 || kind == 60 {
        ext[2..8].copy_from_slice(&[1, 4, 0, 0, 0, 0]);
    }
    f.splice(at + 40..at + 40, ext);
    f[at + 6] = kind;
    grow_ip_length(f, 8);
    format!("ipv6 extension {kind}")
}

/// An ICMP error's quote, cut short or made to lie (bytes changed).
fn quote(rng: &mut Rng, f: &mut Vec<u8>) -> String {
    let Some((at, proto)) = l4(f) else { return "quote (no ip)".to_owned() };
    if !(proto == 1 || proto == 58) || f.len() < at + 8 || f[at] == 8 || f[at] == 128 || f[at] == 0 || f[at] == 129 {
        return "quote (no icmp error)".to_owned();
    }
    let quote_len = f.len() - (at + 8);
    if rng.chance(50) {
        let keep = rng.below(quote_len + 1);
        f.truncate(at + 8 + keep);
        let cut = quote_len - keep;
        grow_ip_length(f, 0usize.wrapping_sub(cut));
        format!("quote cut to {keep}")
    } else {
        let n = 1 + rng.below(4);
        for _ in 0..n {
            let i = at + 8 + rng.below(quote_len.max(1));
            if let Some(b) = f.get_mut(i) {
                *b ^= rng.byte() | 1;
            }
        }
        format!("quote lies ({n} bytes)")
    }
}

fn flip(rng: &mut Rng, f: &mut [u8]) -> String {
    if f.is_empty() {
        return "flip (empty)".to_owned();
    }
    let i = rng.below(f.len());
    f[i] ^= rng.byte() | 1;
    format!("flip byte {i}")
}

fn ttl(rng: &mut Rng, f: &mut [u8]) -> String {
    let v = *rng.pick(&[0u8, 1, 2, 255]);
    if let Some((at, _)) = ipv4(f) {
        f[at + 8] = v;
    } else if let Some(at) = ipv6(f) {
        f[at + 7] = v;
    }
    format!("ttl {v}")
}

fn udp_length(rng: &mut Rng, f: &mut [u8]) -> String {
    match l4(f) {
        Some((at, 17)) if f.len() >= at + 8 => {
            let v = if rng.chance(50) { rng.below(8) as u16 } else { rng.next_u64() as u16 };
            set_u16(f, at + 4, v);
            format!("udp length {v}")
        }
        _ => "udp length (no udp)".to_owned(),
    }
}

fn protocol(rng: &mut Rng, f: &mut [u8]) -> String {
    let v = *rng.pick(&[0u8, 1, 2, 6, 17, 47, 50, 58, 132, 255]);
    if let Some((at, _)) = ipv4(f) {
        f[at + 9] = v;
    } else if let Some(at) = ipv6(f) {
        f[at + 6] = v;
    }
    format!("protocol {v}")
}

/// Recomputes the IPv4 header checksum and the TCP, UDP, ICMP or ICMPv6
/// checksum, wherever the headers and lengths allow it; leaves the rest.
pub fn fix_checksums(f: &mut [u8]) {
    if let Some((at, ihl)) = ipv4(f) {
        if ihl < 20 || f.len() < at + ihl {
            return;
        }
        set_u16(f, at + 10, 0);
        let sum = checksum(&[&f[at..at + ihl]]);
        set_u16(f, at + 10, sum);
        let total = usize::from(get_u16(f, at + 2));
        let fragmented = get_u16(f, at + 6) & 0x3fff != 0;
        if fragmented || total < ihl || at + total > f.len() {
            return;
        }
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&f[at + 12..at + 20]);
        pseudo[9] = f[at + 9];
        pseudo[10..12].copy_from_slice(&((total - ihl) as u16).to_be_bytes());
        let proto = f[at + 9];
        fix_l4(&mut f[at + ihl..at + total], proto, &pseudo, proto != 1);
    } else if let Some(at) = ipv6(f) {
        let len = usize::from(get_u16(f, at + 4));
        if at + 40 + len > f.len() {
            return;
        }
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&f[at + 8..at + 40]);
        pseudo[32..36].copy_from_slice(&(len as u32).to_be_bytes());
        pseudo[39] = f[at + 6];
        let proto = f[at + 6];
        fix_l4(&mut f[at + 40..at + 40 + len], proto, &pseudo, true);
    }
}

fn fix_l4(l4: &mut [u8], proto: u8, pseudo: &[u8], with_pseudo: bool) {
    let at = match proto {
        6 if l4.len() >= 20 => 16,
        17 if l4.len() >= 8 => 6,
        1 | 58 if l4.len() >= 4 => 2,
        _ => return,
    };
    set_u16(l4, at, 0);
    let parts: [&[u8]; 2] = [if with_pseudo { pseudo } else { &[] }, l4];
    let mut sum = checksum(&parts);
    if proto == 17 && sum == 0 {
        sum = 0xffff;
    }
    set_u16(l4, at, sum);
}

/// The Internet checksum (RFC 1071) of the concatenated parts (each but
/// the last of even length).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
