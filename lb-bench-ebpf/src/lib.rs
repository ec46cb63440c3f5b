//! What the benchmark programs in `main.rs` and `lb-bench` share: the layout
//! of the frame the wrapper restores before every iteration.
//!
//! The library target also lets `lb-bench` name this crate as a
//! build-dependency, so cargo rebuilds it when the programs change.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Longest frame the wrapper restores, in bytes: enough for the benchmark's
/// TCP and UDP frames over IPv6 with a small payload.
pub const FRAME_MAX: usize = 256;

/// Leave the frame as restored.
pub const VARY_NONE: u32 = 0;
/// A new IPv4 flow per iteration: the source port and the low bits of the
/// source address come from the iteration counter (see [`Frame::counter`]).
pub const VARY_V4_SOURCE: u32 = 1;
/// A new IPv6 flow per iteration: the last 32 bits of the source address are
/// the iteration counter.
pub const VARY_V6_SOURCE: u32 = 2;

/// `Frame::embryo`: leave lb_xdp's `EMBRYOS` alone.
pub const EMBRYO_NONE: u32 = 0;
/// `Frame::embryo`: after varying the source, write the varied 5-tuple's
/// SYN into lb_xdp's `EMBRYOS` (shared with the wrapper), as if its SYN had
/// just passed, so the frame (an ACK) is that flow's first ACK and enters
/// the connection table.
pub const EMBRYO_SEED: u32 = 1;
/// How far back the seeded SYN is dated, in ns (about a second): within
/// `EMBRYO_TIMEOUT_NS` whichever clock `lb_xdp` reads, and never in its
/// future (a SYN from the future would not match).
pub const EMBRYO_AGE_NS: u64 = 1 << 30;

/// First source port a varied IPv4 flow uses; ports below it are skipped.
pub const V4_FIRST_PORT: u32 = 1024;
/// Source ports per varied IPv4 source address.
pub const V4_PORTS: u32 = 65536 - V4_FIRST_PORT;

/// Offsets in an untagged Ethernet frame, where the wrapper writes.
pub const V4_SRC_ADDR_OFFSET: usize = 14 + 12;
/// IPv4 without options: the L4 source port follows the 20-byte header.
pub const V4_SRC_PORT_OFFSET: usize = 14 + 20;
/// The last 4 bytes of the IPv6 source address.
pub const V6_SRC_ADDR_LOW_OFFSET: usize = 14 + 8 + 12;
/// The IPv4 header, and the ports after it (no options).
pub const V4_IP_OFFSET: usize = 14;
/// The IPv6 header, and the ports after its 40 bytes.
pub const V6_IP_OFFSET: usize = 14;

/// Value of the wrapper's `FRAME` map (one entry): the frame as it must be
/// at the start of every iteration.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct Frame {
    /// Bytes of `bytes` in use, 1 to [`FRAME_MAX`].
    pub len: u32,
    /// `VARY_*`: how the frame changes per iteration.
    pub vary: u32,
    /// Iterations so far, across runs; the wrapper increments it. A plain
    /// array entry rather than a per-CPU one, so that runs landing on
    /// different CPUs still never repeat a flow (one test run at a time).
    pub counter: u32,
    /// `EMBRYO_*`: whether to seed lb_xdp's `EMBRYOS` for the varied flow.
    pub embryo: u32,
    pub bytes: [u8; FRAME_MAX],
}
const _: () = assert!(core::mem::size_of::<Frame>() == 16 + FRAME_MAX);

/// The varied IPv4 source for iteration `counter`: `(address, port)` in host
/// byte order, the address within 198.18.0.0/15.
#[must_use]
pub const fn v4_source(counter: u32) -> (u32, u16) {
    // 198.18.0.0 + counter / 64512 stays below 198.20.0.0 for every u32.
    let addr = 0xC612_0000 + counter / V4_PORTS;
    let port = V4_FIRST_PORT + counter % V4_PORTS;
    (addr, port as u16)
}
