//! Where a rewritten packet goes next: the kernel's FIB, asked at most once
//! a second per destination and CPU.
//!
//! `bpf_fib_lookup` is the right question (routes, neighbours, MTU, all as
//! the kernel sees them) but an expensive one: about 140 ns per IPv4 packet
//! on this kind of machine, half the cost of a balanced packet. So each CPU
//! keeps the answer for a destination (`NEXT_HOPS`, per-CPU LRU: egress
//! device, MACs and the route's MTU) and uses it for `NEXT_HOP_TTL_NS`; a
//! route or neighbour change reaches the fast path within that time. The
//! key is the destination and the interface the packet came in on: a route
//! chosen by source address (policy routing) is not told apart.
//!
//! Only complete answers are kept. "No neighbour yet" and failures are asked
//! again at the next packet, which the kernel handles meanwhile.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::limits::NEXT_HOP_TTL_NS;

use crate::maps::{NEXT_HOP_SCRATCH, NEXT_HOPS, NextHop, NextHopKey, NextHopScratch};

/// The slot of `HOPS_BY_CLIENT` a client's address takes.
#[inline(always)]
pub fn client_slot(dst_be: &[u32; 4]) -> u32 {
    // The address filter's hash, narrowed to the cache's size (a power of two).
    lb_common::addr_filter::slot(dst_be) & (lb_common::limits::CLIENT_HOP_SLOTS - 1)
}

/// This CPU's answer to its last lookup (see [`Answer`]).
#[inline(always)]
pub fn last_answer_ptr() -> Option<*const NextHop> {
    let scratch = NEXT_HOP_SCRATCH.get_ptr(0)?;
    // SAFETY: this CPU's slot, valid for the program's run.
    Some(unsafe { core::ptr::addr_of!((*scratch).hop) })
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What a lookup found; the answer itself is in the [`Answer`] that comes
/// with it.
///
/// verifier: without payloads. With `Ready(*const NextHop)` and
/// `TooBig(u16)`, the payload's register was undefined in the other
/// variants, LLVM copied it anyway, and the verifier refuses to read an
/// uninitialised register ("R2 !read_ok", kernel 6.18).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Send it: egress device and MACs are in the answer.
    Ready,
    /// Route found, neighbour not resolved yet.
    NoNeigh,
    /// Larger than the route's MTU, which the answer carries.
    TooBig,
    /// Not forwarded: the destination is the gateway itself (a local
    /// address), or a broadcast. Such a packet must never be rewritten.
    Local,
    /// No route, or another failure.
    Failed,
}

/// This CPU's scratch slot's answer to the lookup: valid until the next
/// lookup on this CPU, i.e. for this packet. Always a valid pointer (the
/// slot's), even when the lookup failed.
#[derive(Clone, Copy)]
pub struct Answer(*const NextHop);

impl Answer {
    /// The next hop (for `Hop::Ready`) or the route's MTU (for `Hop::TooBig`).
    #[inline(always)]
    pub fn get(&self) -> &NextHop {
        // SAFETY: a per-CPU map value, alive for the program's run.
        unsafe { &*self.0 }
    }
}

/// A packet to route: what the FIB needs of it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Query {
    /// IPv4 in word 0.
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    /// IPv4 TOS, or the IPv6 flow info word (network byte order).
    pub tos_or_flowinfo_be: u32,
    /// Length of the IP packet (header included).
    pub tot_len: u16,
    pub l4_protocol: u8,
    /// 1 for IPv6.
    pub ipv6: u8,
}

/// The next hop of `q`, from this CPU's cache while fresh, else from the
/// FIB; `None` only if the scratch slot is missing (never: an array).
#[inline(always)]
pub fn lookup(ctx: &XdpContext, q: Query, now: u64) -> Option<(Hop, Answer)> {
    let scratch = NEXT_HOP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    unsafe { (*scratch).query = q };
    let code = lookup_call(ctx, scratch, now);
    // SAFETY: as above; the callee filled `hop`.
    let answer = Answer(unsafe { core::ptr::addr_of!((*scratch).hop) });
    let hop = match code {
        READY => Hop::Ready,
        NO_NEIGH => Hop::NoNeigh,
        TOO_BIG => Hop::TooBig,
        LOCAL => Hop::Local,
        _ => Hop::Failed,
    };
    Some((hop, answer))
}

const READY: u32 = 0;
const NO_NEIGH: u32 = 1;
const TOO_BIG: u32 = 2;
const FAILED: u32 = 3;
const LOCAL: u32 = 4;

/// [`lookup`] as a BPF-to-BPF call, on this CPU's scratch slot: reads its
/// `query`, writes its `hop` (for `TOO_BIG`, only the MTU), returns which.
///
/// verifier: not inlined, and talking through a map value rather than the
/// stack. Inlined into each of its callers (both families, both
/// directions, ICMP, fragments) its FIB parameters and answers took stack
/// slots of their own and the program's one frame outgrew the 512 bytes
/// BPF allows ("Looks like the BPF stack limit is exceeded", bpf-linker
/// with LLVM 22); as a call its frame is counted once. It returns a plain
/// integer: a returned enum travels through a pointer to the caller's
/// stack, which the verifier refuses ("cannot return stack pointer to the
/// caller").
#[inline(never)]
fn lookup_call(ctx: &XdpContext, scratch: *mut NextHopScratch, now: u64) -> u32 {
    // SAFETY: this CPU's slot, valid for the call; the fields are disjoint.
    let (q, out, key, fib) =
        unsafe { (&(*scratch).query, &mut (*scratch).hop, &mut (*scratch).key, &mut (*scratch).fib) };
    *key = NextHopKey { dst_be: q.dst_be, ifindex: ctx.ingress_ifindex() as u32, ipv6: u32::from(q.ipv6) };
    if let Some(cached) = NEXT_HOPS.get_ptr_mut(&*key) {
        // SAFETY: a valid per-CPU map value.
        let cached = unsafe { &*cached };
        if now.saturating_sub(cached.refreshed_ns) < NEXT_HOP_TTL_NS {
            *out = *cached;
            return sized(q, out);
        }
    }
    // Asked with a total length of 0 the FIB never answers "too big", and
    // reports the route's MTU on success (`mtu_result`, Linux 5.14+): the
    // answer then holds for packets of any size, and is cached.
    let code = ask_fib(ctx, q, 0, fib, out, now);
    if code != READY {
        return code;
    }
    if out.mtu != 0 {
        let _ = NEXT_HOPS.insert(&*key, &*out, 0);
        return sized(q, out);
    }
    // A kernel that reports no MTU: asked with the packet's own length (the
    // kernel checks it), and not cached.
    ask_fib(ctx, q, q.tot_len, fib, out, now)
}

/// `out` for a packet of `q`'s length: too big when over the route's MTU.
#[inline(always)]
fn sized(q: &Query, out: &NextHop) -> u32 {
    if u32::from(q.tot_len) > u32::from(out.mtu) { TOO_BIG } else { READY }
}

/// Asks the FIB about `q` as a packet of `tot_len` bytes, through `fib`;
/// the answer goes into `out` (for `TOO_BIG`, only its MTU).
#[inline(always)]
fn ask_fib(ctx: &XdpContext, q: &Query, tot_len: u16, fib: &mut FibParams, out: &mut NextHop, now: u64) -> u32 {
    // SAFETY: FibParams is plain old data; all-zero is a valid start.
    *fib = unsafe { core::mem::zeroed() };
    let ipv6 = q.ipv6 != 0;
    fib.family = if ipv6 { AF_INET6 } else { AF_INET };
    fib.l4_protocol = q.l4_protocol;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_1.tot_len = tot_len;
    if ipv6 {
        fib.__bindgen_anon_2.flowinfo = q.tos_or_flowinfo_be;
        fib.__bindgen_anon_3.ipv6_src = q.src_be;
        fib.__bindgen_anon_4.ipv6_dst = q.dst_be;
    } else {
        fib.__bindgen_anon_2.tos = q.tos_or_flowinfo_be as u8;
        fib.__bindgen_anon_3.ipv4_src = q.src_be[0];
        fib.__bindgen_anon_4.ipv4_dst = q.dst_be[0];
    }
    // SAFETY: fib is a valid, writable bpf_fib_lookup for the helper.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibParams>() as i32, 0) };
    // SAFETY: the helper writes the MTU over tot_len (a union).
    out.mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        out.ifindex = fib.ifindex;
        out.smac = fib.smac;
        out.dmac = fib.dmac;
        out.refreshed_ns = now;
        READY
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        NO_NEIGH
    } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        TOO_BIG
    } else if rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 {
        LOCAL
    } else {
        FAILED
    }
}
