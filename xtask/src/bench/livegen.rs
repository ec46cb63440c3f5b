//! A packet generator: BPF_PROG_TEST_RUN in live-frame mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`, kernel 5.18+) of a tiny XDP program that
//! returns `XDP_TX`, which is what xdp-trafficgen does (Debian's xdp-tools
//! 1.3.1 fails on kernel 6.18: it needs the BTF of a tracepoint newer
//! kernels removed).
//!
//! In live-frame mode the kernel runs the program on a frame as if it had
//! arrived on `ingress_ifindex`, and turns `XDP_TX` into a redirect out of
//! that same device (net/bpf/test_run.c, `xdp_test_run_batch`): on the
//! client's veth the frames go to its peer, the gateway's client-side veth,
//! through the peer's NAPI (which it has with an XDP program attached or GRO
//! on; without it a redirected frame silently vanishes). No socket, no skb on the sending side: a few tens of
//! nanoseconds per frame, so the gateway is the bottleneck.
//!
//! The program writes the frame's headers from a template compiled into its
//! instructions (pages are recycled without being reset, and the gateway
//! rewrites them in place), with a pseudo-random UDP source port out of
//! [`FLOWS`], so the flows spread over the backends. The UDP checksum is 0
//! ("none", RFC 768), which stays valid whatever the port.
//!
//! Raw `bpf(2)` through libc rather than aya: aya 0.14 can issue a live-frame
//! test run (`TestRunAttrs::xdp_live_frames`), but only on programs it loaded
//! from an ELF object, and this program is 26 instructions generated for
//! each testbed (its MAC addresses are in them). Building a second
//! eBPF crate (nightly, bpf-linker) or writing an ELF image to feed aya costs
//! far more than the two syscalls here, and xtask would need aya besides.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Flows (distinct UDP source ports) the generator cycles through at random;
/// a power of two (the program masks).
pub const FLOWS: u16 = 64;
/// First UDP source port of the flows.
pub const FIRST_PORT: u16 = 40000;
/// Frame length without FCS: Ethernet's minimum, the worst case per byte.
pub const FRAME_LEN: usize = 60;
/// Frames per test-run call: the call runs to completion, so this bounds
/// how late the generator notices its deadline.
const CHUNK: u32 = 1 << 18;
/// Frames the kernel processes per batch (its default, NAPI_POLL_WEIGHT).
const BATCH: u32 = 64;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_DROP: i32 = 1;
const XDP_TX: i32 = 3;
/// bpf_get_prandom_u32's helper id.
const HELPER_GET_PRANDOM_U32: i32 = 7;
/// Offset of the UDP source port: Ethernet 14 + IPv4 20.
const UDP_SPORT_OFFSET: i16 = 34;
/// Bytes the program must be able to read: up to the end of the UDP header.
const HEADERS_LEN: i32 = 42;

/// One eBPF instruction, as the kernel's `struct bpf_insn`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | dst, off, imm }
}

/// The generator program for frames like `template` (at least
/// [`HEADERS_LEN`] bytes). Registers: r1 = ctx on entry; r6 keeps it across
/// the helper call (which clobbers r1-r5).
///
/// It writes the whole Ethernet, IPv4 and UDP header from `template` into
/// every frame before setting the source port: a frame's page comes back to
/// the generator after the gateway rewrote it in place (lb's XDP program and
/// the kernel's NAT both rewrite addresses, ports, TTL and checksums), and
/// sent again as it is it would no longer be addressed to the VIP.
fn program(template: &[u8]) -> Vec<Insn> {
    const ALU64_MOV_X: u8 = 0xbf;
    const ALU64_MOV_K: u8 = 0xb7;
    const ALU64_AND_K: u8 = 0x57;
    const ALU64_ADD_K: u8 = 0x07;
    const ALU_END_TO_BE: u8 = 0xdc;
    const LDX_W: u8 = 0x61;
    const ST_W: u8 = 0x62;
    const ST_H: u8 = 0x6a;
    const STX_H: u8 = 0x6b;
    const JMP_JGT_X: u8 = 0x2d;
    const JMP_CALL: u8 = 0x85;
    const JMP_EXIT: u8 = 0x95;
    let header = &template[..HEADERS_LEN as usize];
    let mut stores: Vec<Insn> = header
        .chunks_exact(4)
        .enumerate()
        // A 32-bit store writes its immediate in host (little-endian) order.
        .map(|(k, w)| insn(ST_W, 2, 0, (4 * k) as i16, i32::from_le_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    let tail = header.len() / 4 * 4;
    if let [a, b] = header[tail..] {
        stores.push(insn(ST_H, 2, 0, tail as i16, i32::from(u16::from_le_bytes([a, b]))));
    }
    stores.push(insn(STX_H, 2, 0, UDP_SPORT_OFFSET, 0)); // udp->source = r0
    stores.push(insn(ALU64_MOV_K, 0, 0, 0, XDP_TX)); // return XDP_TX
    stores.push(insn(JMP_EXIT, 0, 0, 0, 0));
    let mut prog = vec![
        insn(ALU64_MOV_X, 6, 1, 0, 0),                   // r6 = ctx
        insn(JMP_CALL, 0, 0, 0, HELPER_GET_PRANDOM_U32), // r0 = random
        insn(ALU64_AND_K, 0, 0, 0, FLOWS as i32 - 1),    // r0 %= FLOWS
        insn(ALU64_ADD_K, 0, 0, 0, FIRST_PORT as i32),   // r0 += FIRST_PORT
        insn(ALU_END_TO_BE, 0, 0, 0, 16),                // r0 = htons(r0)
        insn(LDX_W, 2, 6, 0, 0),                         // r2 = ctx->data
        insn(LDX_W, 3, 6, 4, 0),                         // r3 = ctx->data_end
        insn(ALU64_MOV_X, 4, 2, 0, 0),                   // r4 = data
        insn(ALU64_ADD_K, 4, 0, 0, HEADERS_LEN),         // r4 += headers
        // verifier: if r4 > data_end skip the stores and drop
        insn(JMP_JGT_X, 4, 3, stores.len() as i16, 0),
    ];
    prog.extend(stores);
    prog.push(insn(ALU64_MOV_K, 0, 0, 0, XDP_DROP));
    prog.push(insn(JMP_EXIT, 0, 0, 0, 0));
    prog
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`; the
/// kernel zero-fills the fields after the size passed.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The kernel's `struct xdp_md`, the test run's context.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// The loaded generator program.
pub struct Generator {
    prog: OwnedFd,
}

impl Generator {
    /// Loads the program for frames like `template` (needs CAP_BPF or root).
    pub fn load(template: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(template.len() >= HEADERS_LEN as usize, "frame template shorter than its headers");
        let insns = program(template);
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..10].copy_from_slice(b"bench_xdtx");
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: BPF_XDP,
        };
        // SAFETY: attr points at valid instructions, license and log buffer for the call.
        let fd = unsafe { bpf(BPF_PROG_LOAD, (&raw const attr).cast(), size_of::<ProgLoadAttr>()) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!("loading the generator program: {e}; verifier log:\n{}", String::from_utf8_lossy(&log[..end]));
        }
        // SAFETY: a new descriptor we own.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { prog })
    }

    /// Transmits up to `frames` copies of `frame` out of interface `ifindex`
    /// (of the calling thread's network namespace), stopping at `deadline`
    /// between chunks. Returns the frames sent.
    pub fn send(&self, ifindex: u32, frame: &[u8], frames: u64, deadline: Instant) -> anyhow::Result<u64> {
        let mut sent = 0;
        while sent < frames && Instant::now() < deadline {
            let chunk = u32::try_from((frames - sent).min(u64::from(CHUNK))).unwrap_or(CHUNK);
            self.run(ifindex, frame, chunk)?;
            sent += u64::from(chunk);
        }
        Ok(sent)
    }

    fn run(&self, ifindex: u32, frame: &[u8], repeat: u32) -> anyhow::Result<()> {
        let ctx = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        let mut attr = TestRunAttr {
            prog_fd: self.prog.as_raw_fd().cast_unsigned(),
            retval: 0,
            data_size_in: frame.len() as u32,
            data_size_out: 0,
            data_in: frame.as_ptr() as u64,
            data_out: 0,
            repeat,
            duration: 0,
            ctx_size_in: size_of::<XdpMd>() as u32,
            ctx_size_out: 0,
            ctx_in: (&raw const ctx) as u64,
            ctx_out: 0,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            cpu: 0,
            batch_size: BATCH,
            _pad: 0,
        };
        // SAFETY: attr points at the frame and context, valid for the call.
        let rc = unsafe { bpf(BPF_PROG_TEST_RUN, (&raw mut attr).cast(), size_of::<TestRunAttr>()) };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("BPF_PROG_TEST_RUN in live-frame mode");
        }
        Ok(())
    }
}

/// bpf(2).
///
/// # Safety
/// `attr` must point at a valid attribute union of `size` bytes for `cmd`.
unsafe fn bpf(cmd: libc::c_long, attr: *const libc::c_void, size: usize) -> libc::c_long {
    // SAFETY: forwarded from the caller.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) }
}

/// A UDP/IPv4 Ethernet frame of [`FRAME_LEN`] bytes, source port
/// [`FIRST_PORT`] (the program rewrites it), UDP checksum 0.
pub fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_LEN);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (FRAME_LEN - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let check = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&FIRST_PORT.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no checksum
    f.resize(FRAME_LEN, 0);
    f
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Pins the calling thread to `cpu`, so two generator threads use both cores.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: an all-zero cpu_set_t is empty; CPU_SET and sched_setaffinity get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// How long to let queued frames drain through the gateway before reading counters.
pub const DRAIN: Duration = Duration::from_millis(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_has_valid_ip_checksum_and_lengths() {
        let f = udp_frame([2; 6], [4; 6], Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 0, 100), 5353);
        assert_eq!(f.len(), FRAME_LEN);
        assert_eq!(ipv4_checksum(&f[14..34]), 0, "a header with its checksum sums to 0xffff");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 46);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 26);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 5353);
    }

    #[test]
    fn program_restores_the_header_and_jumps_to_the_drop() {
        let f = udp_frame([2; 6], [4; 6], Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 18, 0, 100), 5353);
        let p = program(&f);
        assert_eq!(p[0].regs, 0x16, "mov r6, r1: dst 6, src 1");
        let jump = p.iter().position(|i| i.code == 0x2d).expect("the bounds check");
        let target = jump + 1 + p[jump].off as usize;
        assert_eq!((p[target].code, p[target].imm), (0xb7, XDP_DROP));
        assert_eq!(p.iter().filter(|i| i.code == 0x62).count(), 10, "40 bytes as words");
        let first = p.iter().find(|i| i.code == 0x62).expect("a store");
        assert_eq!(first.imm.to_le_bytes(), [4, 4, 4, 4], "destination MAC bytes in order");
        assert_eq!(size_of::<Insn>(), 8);
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert!(i32::from(UDP_SPORT_OFFSET) + 2 <= HEADERS_LEN);
        assert!(FLOWS.is_power_of_two());
    }
}
