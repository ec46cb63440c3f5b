//! End to end: UDP datagrams larger than the path's MTU, through the real
//! agent. The client's kernel fragments each request, the gateway balances
//! the first piece and sends the rest after it, the backend reassembles and
//! answers with a datagram as large, fragmented by its own kernel, whose
//! pieces the gateway translates back. Without fragment tracking the later
//! pieces are dropped and nothing comes back. Needs root.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};

/// Three pieces each way on 1500-byte links.
const DATAGRAM: usize = 4000;

/// Sends one `DATAGRAM`-byte datagram from a socket connected to `vip` and
/// returns the answering backend's name, after checking the echo is whole.
fn exchange(vip: SocketAddr, seed: u8) -> Result<String, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(vip).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let payload: Vec<u8> = (0..DATAGRAM).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    socket.send(&payload).map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65536];
    let n = socket.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
    let answer = &buf[..n];
    let text_end = answer.iter().position(|&b| b == b' ').ok_or("no backend name")?;
    let name = String::from_utf8_lossy(&answer[..text_end]).trim_start_matches("backend=").to_owned();
    if answer[text_end + 1..] != payload[..] {
        return Err(format!("echo from {name} is not the datagram sent ({} bytes back)", n));
    }
    Ok(name)
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn udp_datagrams_larger_than_the_mtu_are_balanced_whole_both_ways() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("testbed");
    let mut agent = Agent::start(&testbed, &agent::config_for(&testbed, HealthCheck::default())).expect("lb");
    agent.wait_health("echo", &["up"; 3], Duration::from_secs(10)).expect("echo backends up");
    let vip = testbed.vip_udp();
    let mut backends = BTreeSet::new();
    for seed in 0..20u8 {
        let name = testbed
            .client()
            .enter(move || exchange(vip, seed))
            .expect("client ns")
            .unwrap_or_else(|e| panic!("datagram {seed}: {e}"));
        backends.insert(name);
    }
    // Each datagram is a new flow (a new source port): they spread, and
    // every piece of each went where its first went.
    assert!(backends.len() >= 2, "20 flows all went to {backends:?}");
    let followed = agent.verdict("redirect_fragment");
    assert!(followed >= 2 * 20 * 2, "{followed} later pieces followed their first, of 80");
    assert_eq!(agent.verdict("drop_fragment"), 0);
}
