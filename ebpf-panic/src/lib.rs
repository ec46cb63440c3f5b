//! The panic handler of the eBPF programs (`lb-ebpf`, `lb-bench-ebpf`), as
//! aya's own `ebpf-panic` crate provides one.
//!
//! A `no_std` binary must have a panic handler, but eBPF cannot panic: this
//! one loops forever, and the verifier rejects a program in which it is
//! reachable ("last insn is not an exit or jmp", or an infinite loop), so a
//! possible panic fails the load instead of the data path. Link it with
//! `use lb_ebpf_panic as _;`. On other targets it is empty, so the crate
//! builds on the host like any other.
#![no_std]

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
