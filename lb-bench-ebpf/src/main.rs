//! XDP programs for measuring `lb_xdp` through BPF_PROG_TEST_RUN; never
//! loaded by the agent, and kept out of `lb-ebpf` so the production object
//! stays as it is.
//!
//! With `repeat`, the kernel runs a program over and over on the same
//! buffer without restoring it, so once `lb_xdp` has rewritten a frame every
//! later iteration would measure another path (a rewritten frame is no
//! longer for the VIP). [`lb_xdp_bench_restore`] copies the original frame
//! back at the start of each iteration, optionally makes it a new flow, and
//! tail-calls the program under test. For a flow's first ACK it also writes
//! that flow's SYN into `lb_xdp`'s `EMBRYOS` (the wrapper's `EMBRYOS` is
//! that map: `lb-bench` pins `lb_xdp`'s and loads the wrapper onto the
//! pin), so every iteration is a first ACK that really enters the table.
//! Its own cost is measured by pointing
//! the tail call at [`lb_xdp_bench_verdict`], which only returns a verdict,
//! and subtracted; the same program run directly is the floor.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};
use lb_bench_ebpf::{
    EMBRYO_AGE_NS, EMBRYO_SEED, FRAME_MAX, Frame, V4_IP_OFFSET, V4_SRC_ADDR_OFFSET, V4_SRC_PORT_OFFSET, V6_IP_OFFSET,
    V6_SRC_ADDR_LOW_OFFSET, VARY_V4_SOURCE, VARY_V6_SOURCE, v4_source,
};
use lb_common::{FAMILY_V4, FAMILY_V6, embryo, flow::FlowKey, limits::EMBRYO_SLOTS};
// The panic handler: a reachable panic fails the load.
use lb_ebpf_panic as _;

/// 0 → the frame every iteration starts from, and the iteration counter.
/// Written by `lb-bench` before each run; the counter by the wrapper.
#[map]
static FRAME: Array<Frame> = Array::with_max_entries(1, 0);

/// 0 → the program under test: `lb_xdp`, or `lb_xdp_bench_verdict` to
/// measure the wrapper itself. Written by `lb-bench`.
#[map]
static TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `lb_xdp`'s `EMBRYOS` (loaded onto its pin by `lb-bench`; see
/// `lb_common::embryo`). Written by the wrapper for first-ACK cases only.
#[map]
static EMBRYOS: Array<u64> = Array::with_max_entries(EMBRYO_SLOTS, 0);

/// Restores the frame, then tail-calls `TARGET[0]`. Returns XDP_ABORTED
/// only if it could not, which `lb-bench` treats as a failed measurement.
#[xdp]
pub fn lb_xdp_bench_restore(ctx: XdpContext) -> u32 {
    if try_restore(&ctx).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the tail call does not return on success; on failure (empty
    // slot) execution continues here.
    unsafe { TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// The floor: what an XDP program costs that does nothing but return.
#[xdp]
pub fn lb_xdp_bench_verdict(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_restore(ctx: &XdpContext) -> Result<(), ()> {
    let frame = FRAME.get_ptr_mut(0).ok_or(())?;
    // SAFETY: a valid pointer to the map value, for this one read.
    let len = unsafe { (*frame).len };
    // verifier: bound len before passing it as the helper's size.
    if len == 0 || len > FRAME_MAX as u32 {
        return Err(());
    }
    // SAFETY: the map value holds FRAME_MAX bytes and len <= FRAME_MAX; the
    // helper checks len against the packet.
    let bytes = unsafe { core::ptr::addr_of_mut!((*frame).bytes) };
    // SAFETY: as above; ctx.ctx is the program's own context.
    if unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, bytes.cast(), len) } != 0 {
        return Err(());
    }
    // SAFETY: one read and one write of the map value's counter. Not atomic:
    // one test run at a time uses this map.
    let counter = unsafe { (*frame).counter };
    unsafe { (*frame).counter = counter.wrapping_add(1) };
    // SAFETY: one read of each of the map value's fields.
    let (vary, seed) = unsafe { ((*frame).vary, (*frame).embryo == EMBRYO_SEED) };
    match vary {
        VARY_V4_SOURCE => {
            let (addr, port) = v4_source(counter);
            store(ctx, V4_SRC_ADDR_OFFSET, addr.to_be_bytes())?;
            store(ctx, V4_SRC_PORT_OFFSET, port.to_be_bytes())?;
            if seed {
                seed_embryo(&v4_flow(ctx)?)?;
            }
        }
        VARY_V6_SOURCE => {
            store(ctx, V6_SRC_ADDR_LOW_OFFSET, counter.to_be_bytes())?;
            if seed {
                seed_embryo(&v6_flow(ctx)?)?;
            }
        }
        _ => {}
    }
    // The L4 checksum now disagrees with the varied source; `lb_xdp` never
    // verifies checksums (it updates them incrementally), so it takes the
    // same path as for a correct one.
    Ok(())
}

/// Writes the SYN of `flow` into its `EMBRYOS` slot, dated
/// `EMBRYO_AGE_NS` ago, exactly as `lb_xdp` writes a SYN it forwards.
#[inline(always)]
fn seed_embryo(flow: &FlowKey) -> Result<(), ()> {
    let slot = EMBRYOS.get_ptr_mut(embryo::slot(flow)).ok_or(())?;
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid map value; one test run at a time.
    unsafe { *slot = embryo::entry(flow, now.wrapping_sub(EMBRYO_AGE_NS)) };
    Ok(())
}

/// The 5-tuple of the IPv4 frame (no options) as `lb_xdp` keys it.
#[inline(always)]
fn v4_flow(ctx: &XdpContext) -> Result<FlowKey, ()> {
    let ip: [u8; 24] = load(ctx, V4_IP_OFFSET)?;
    Ok(FlowKey {
        src_be: [word(&ip, 12), 0, 0, 0],
        dst_be: [word(&ip, 16), 0, 0, 0],
        src_port_be: u16::from_ne_bytes([ip[20], ip[21]]),
        dst_port_be: u16::from_ne_bytes([ip[22], ip[23]]),
        proto: ip[9],
        family: FAMILY_V4,
        _pad: [0; 2],
    })
}

/// The 5-tuple of the IPv6 frame (no extension headers) as `lb_xdp` keys it.
#[inline(always)]
fn v6_flow(ctx: &XdpContext) -> Result<FlowKey, ()> {
    let ip: [u8; 44] = load(ctx, V6_IP_OFFSET)?;
    Ok(FlowKey {
        src_be: [word(&ip, 8), word(&ip, 12), word(&ip, 16), word(&ip, 20)],
        dst_be: [word(&ip, 24), word(&ip, 28), word(&ip, 32), word(&ip, 36)],
        src_port_be: u16::from_ne_bytes([ip[40], ip[41]]),
        dst_port_be: u16::from_ne_bytes([ip[42], ip[43]]),
        proto: ip[6],
        family: FAMILY_V6,
        _pad: [0; 2],
    })
}

/// The 4 bytes at `at`, as the program reads an address word off the wire.
#[inline(always)]
fn word<const N: usize>(bytes: &[u8; N], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// `N` bytes at `offset` of the packet, bounds-checked.
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<[u8; N], ()> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return Err(());
    }
    // SAFETY: within the packet, checked just above.
    Ok(unsafe { ((start + offset) as *const [u8; N]).read_unaligned() })
}

/// Writes `bytes` at `offset` of the packet, bounds-checked.
#[inline(always)]
fn store<const N: usize>(ctx: &XdpContext, offset: usize, bytes: [u8; N]) -> Result<(), ()> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return Err(());
    }
    // SAFETY: within the packet, checked just above.
    unsafe { ((start + offset) as *mut [u8; N]).write_unaligned(bytes) };
    Ok(())
}

#[cfg(not(test))]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
