//! The documented capacity, through the real control plane into the real
//! maps of the loaded program: 1,024 VIPs (128 addresses × 8 ports) with 4
//! backends each, 4,096 backends in all, parsed from a config, installed by
//! the `Balancer`, and packets to VIPs across the whole range balanced to
//! their own backends. Each VIP's backends listen on a port of their own, so
//! the rewritten destination port names the VIP that was chosen. The
//! harness is in `v4/mod.rs`. Needs root.

mod v4;

use std::{fmt::Write as _, path::Path};

use lb::{
    config::Config,
    control::balancer::Balancer,
    dataplane::{LoadOptions, Program},
};
use lb_common::limits::{MAX_BACKENDS, MAX_VIPS};
use v4::*;

const ADDRESSES: usize = 128;
const PORTS: [u16; 8] = [8000, 9000, 10000, 11000, 12000, 13000, 14000, 15000];
const BACKENDS_PER_VIP: usize = 4;
const RING_SIZE: u32 = 251;

/// VIP `i`'s address and port.
fn vip(i: usize) -> ([u8; 4], u16) {
    ([198, 18, 0, (1 + i / PORTS.len()) as u8], PORTS[i % PORTS.len()])
}

/// The port VIP `i`'s backends listen on.
fn backend_port(i: usize) -> u16 {
    20000 + i as u16
}

fn config_text() -> String {
    let mut toml = format!(
        "[agent]\ninterfaces = [\"lbp-c\", \"lbp-b\"]\nring_size = {RING_SIZE}\nmax_vips = {MAX_VIPS}\nconntrack_capacity = 1024\n"
    );
    for i in 0..ADDRESSES * PORTS.len() {
        let ([a, b, c, d], port) = vip(i);
        let _ = writeln!(
            toml,
            "\n[[vip]]\nname = \"v{i}\"\nlisten = \"{a}.{b}.{c}.{d}:{port}\"\n[vip.health_check]\ntype = \"none\""
        );
        for host in 11..11 + BACKENDS_PER_VIP {
            let _ = writeln!(toml, "[[vip.backend]]\naddress = \"198.18.2.{host}:{}\"", backend_port(i));
        }
    }
    toml
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_thousand_vips_and_four_thousand_backends_are_installed_and_balanced() {
    lb_tests::require_root!();
    let config = Config::parse(&config_text(), Path::new("capacity.toml")).expect("the config is valid");
    let vips = config.vips.len();
    let backends: usize = config.vips.iter().map(|v| v.backends.len()).sum();
    assert_eq!((vips, backends), (MAX_VIPS as usize, 4096));
    assert!(backends < MAX_BACKENDS as usize);
    let ns = Netns::new();
    ns.run(move || {
        let opts = LoadOptions { ring_size: RING_SIZE, max_vips: config.agent.max_vips, conntrack_capacity: 1024 };
        let mut program = Program::load(&opts).unwrap_or_else(|e| panic!("load: {e:?}"));
        let mut maps = program.maps().expect("maps");
        let mut balancer = Balancer::new(&config).expect("balancer");
        balancer.install(&mut maps).expect("install");
        let mut lb =
            Lb { program, maps, client_if: ifindex("lbp-c"), backend_if: ifindex("lbp-b"), ring: [0; RING as usize] };
        for i in (0..vips).step_by(37).chain([vips - 1]) {
            let (addr, port) = vip(i);
            let syn = Tcp { dst: addr, dport: port, ..Tcp::client_to_vip(40000) }.build();
            let (action, out) = lb.run(&syn, lb.client_if);
            assert!(action == XDP_REDIRECT || action == XDP_PASS, "vip {i}: action {action}");
            let (dst, dport) = (&out[30..34], u16::from_be_bytes([out[36], out[37]]));
            assert_eq!(dport, backend_port(i), "vip {i} went to another VIP's backend");
            assert!(
                (11..11 + BACKENDS_PER_VIP as u8).contains(&dst[3]) && dst[..3] == [198, 18, 2],
                "vip {i}: {dst:?}"
            );
            assert_checksums_valid(&out);
        }
    });
}
