//! TCP header arithmetic for the segments the gateway answers itself: its
//! flags, and the header of the RST that refuses a segment. Pure, so it is
//! tested on the host.

/// FIN: the sender has finished sending.
pub const TCP_FIN: u8 = 0x01;
/// SYN: opens a connection.
pub const TCP_SYN: u8 = 0x02;
/// RST: resets a connection.
pub const TCP_RST: u8 = 0x04;
/// ACK: the acknowledgment number is valid.
pub const TCP_ACK: u8 = 0x10;

/// A 16-bit word as stored, from its two bytes in wire order.
#[inline(always)]
pub fn word(b0: u8, b1: u8) -> u16 {
    u16::from_ne_bytes([b0, b1])
}

/// The TCP header of the RST that answers the segment whose header is `t`
/// (`flags` its flags, `l4_len` its length), checksum still 0: ports
/// swapped; if the segment has ACK, `seq` = its ack; otherwise RST+ACK with
/// `seq` 0 and `ack` = its seq + its length, SYN and FIN counting one
/// (RFC 793's reset generation). No options: data offset 5.
#[inline(always)]
pub fn rst_header(t: &[u16; 10], flags: u8, l4_len: usize) -> [u16; 10] {
    let doff_bytes = ((u16::from_be(t[6]) >> 12) as usize) * 4;
    let (seq_hi, seq_lo, ack_hi, ack_lo, rst_flags) = if flags & TCP_ACK != 0 {
        (t[4], t[5], 0, 0, TCP_RST)
    } else {
        let seq = (u32::from(u16::from_be(t[2])) << 16) | u32::from(u16::from_be(t[3]));
        let seg_len = l4_len.saturating_sub(doff_bytes) as u32
            + u32::from(flags & TCP_SYN != 0)
            + u32::from(flags & TCP_FIN != 0);
        let ack = seq.wrapping_add(seg_len);
        (0, 0, ((ack >> 16) as u16).to_be(), (ack as u16).to_be(), TCP_RST | TCP_ACK)
    };
    [t[1], t[0], seq_hi, seq_lo, ack_hi, ack_lo, word(0x50, rst_flags), 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use etherparse::TcpHeader;

    use super::*;

    fn words(bytes: &[u8]) -> [u16; 10] {
        let mut out = [0u16; 10];
        for (w, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *w = u16::from_ne_bytes([chunk[0], chunk[1]]);
        }
        out
    }

    fn bytes(words: &[u16; 10]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// RFC 793, "Reset Generation", checked on random segments through an
    /// independent parser: what the RST must say for the segment it answers.
    #[test]
    fn the_rst_answers_any_segment_as_rfc_793_says() {
        let mut state: u64 = 0x07c9_5eed;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..20_000 {
            let mut tcp = TcpHeader::new(next() as u16, next() as u16, next() as u32, next() as u16);
            tcp.acknowledgment_number = next() as u32;
            let f = next() as u8;
            (tcp.fin, tcp.syn, tcp.rst, tcp.psh, tcp.ack) =
                (f & 1 != 0, f & 2 != 0, f & 4 != 0, f & 8 != 0, f & 16 != 0);
            let flags = f & 0x1f;
            let payload = (next() % 1500) as usize;
            let header = words(&tcp.to_bytes());
            let rst = TcpHeader::from_slice(&bytes(&rst_header(&header, flags, 20 + payload)))
                .unwrap_or_else(|e| panic!("case {case}: the RST does not parse: {e}"))
                .0;

            assert_eq!((rst.source_port, rst.destination_port), (tcp.destination_port, tcp.source_port), "case {case}");
            assert!(rst.rst && !rst.syn && !rst.fin && !rst.psh, "case {case}: {rst:?}");
            assert_eq!(rst.header_len(), 20, "case {case}: no options");
            if tcp.ack {
                assert_eq!((rst.sequence_number, rst.ack), (tcp.acknowledgment_number, false), "case {case}");
            } else {
                let len = payload as u32 + u32::from(tcp.syn) + u32::from(tcp.fin);
                assert_eq!(rst.sequence_number, 0, "case {case}");
                assert!(rst.ack, "case {case}");
                assert_eq!(rst.acknowledgment_number, tcp.sequence_number.wrapping_add(len), "case {case}");
            }
        }
    }

    #[test]
    fn a_segment_shorter_than_its_header_counts_as_empty() {
        let syn = TcpHeader { syn: true, sequence_number: 1000, ..TcpHeader::new(40000, 80, 1000, 64240) };
        let rst = rst_header(&words(&syn.to_bytes()), TCP_SYN, 8);
        let rst = TcpHeader::from_slice(&bytes(&rst)).expect("parses").0;
        assert_eq!(rst.acknowledgment_number, 1001);
    }
}
