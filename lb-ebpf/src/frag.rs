//! The fragment rule.
//!
//! Only the first fragment of a datagram carries the ports, so fragments
//! cannot be pinned to the backend their datagram's flow has, and the VIP is
//! owned by no host that could reassemble them. A fragment addressed to a
//! VIP is therefore dropped (`drop_fragment`), the whole datagram with it:
//! never pieces of one datagram on different backends, never a piece half
//! translated. A fragment carries no port, so "addressed to a VIP" means to
//! an address and protocol some VIP has (`VIP_ADDRS`), the same test for
//! every piece, so all pieces of one datagram get one verdict. Other
//! fragments (to other hosts, or a backend's fragmented reply) are passed to
//! the kernel untouched (`pass_fragment`).

use lb_common::{
    FAMILY_V4,
    stats::reason,
    vip_addr::{VipAddrKey, proto_bit},
};

use crate::{Verdict, maps::VIP_ADDRS, parse::Ipv4};

/// The verdict for an IPv4 fragment.
#[inline(always)]
pub fn verdict(v4: &Ipv4) -> Verdict {
    // SAFETY: v4.ip was bounds checked in parse_ipv4.
    let (daddr, proto) = unsafe { ((*v4.ip).daddr_be, (*v4.ip).proto) };
    let key = VipAddrKey { addr_be: [daddr, 0, 0, 0], family: FAMILY_V4, _pad: [0; 3] };
    // SAFETY: the value is copied out at once.
    let protos = unsafe { VIP_ADDRS.get(key) }.map_or(0, |info| info.protos);
    if protos & proto_bit(proto) != 0 {
        Verdict::drop(reason::DROP_FRAGMENT)
    } else {
        Verdict::pass(reason::PASS_FRAGMENT)
    }
}
